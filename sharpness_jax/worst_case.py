"""Perturbation sharpness: worst-case (SAM-style), adaptive, m-sharpness, average-case, and
the relative flatness of the last layer.

With L the mean loss over the batch and ρ a radius,

* worst-case sharpness  S_ρ = max_{‖ε‖₂ ≤ ρ} L(θ + ε) − L(θ)  (Keskar et al. 2017; the inner
  problem of SAM, Foret et al. 2021), by projected normalised gradient ascent from SAM's
  first-order solution ε₀ = ρ ∇L/‖∇L‖ (:func:`worst_case_sharpness`). The ascent gives a
  lower bound on the maximum; the best value attained over its iterates is reported with the
  steps taken and ‖ε‖.
* adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023): the same with the
  constraint ‖ε ⊘ (|θ| + ξ)‖₂ ≤ ρ. With ξ = 0 it is invariant to the rescalings that leave a
  ReLU network's function unchanged (a layer ×c, the next ×1/c), where S_ρ is not (tested).
* m-sharpness (Foret et al. 2021; Andriushchenko & Flammarion 2022): the mean over disjoint
  batches of m examples of each batch's worst-case sharpness (:func:`m_sharpness`).
* average-case sharpness E_{ε∼N(0, σ²I)}[L(θ + ε)] − L(θ) (optionally σ|θ|-scaled) by Monte
  Carlo with a standard error (:func:`average_sharpness`) — a stochastic estimate, named so.
* relative flatness (Petzka et al. 2021, Def. 3) of a layer with kernel W (columns w_s, the
  weights into unit s): κ = Σ_{s,s'} ⟨w_s, w_s'⟩ tr(H_{s,s'}), H_{s,s'} the Hessian block of
  w_s and w_s' (:func:`relative_flatness`), exact from the layer's Hessian block.

Every loss evaluation is the library's chunked mean loss; the ascent runs in one compiled
program (``lax.fori_loop``) per objective and shapes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpness_jax import checks, linalg, operators, subsets
from sharpness_jax.linalg import Estimate
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "Ascent",
    "average_sharpness",
    "m_sharpness",
    "relative_flatness",
    "worst_case_sharpness",
]


class Ascent(NamedTuple):
    """The result of the projected ascent.

    Attributes:
      sharpness: max over the iterates of L(θ + ε_t) − L(θ) (a lower bound on the maximum).
      loss: L(θ).
      perturbation: the best ε (pytree like θ).
      perturbation_norm: ‖ε‖₂ of the best ε (in the constraint's metric: ‖ε ⊘ scale‖₂).
      num_steps: ascent steps taken after the first-order start.
    """

    sharpness: jax.Array
    loss: jax.Array
    perturbation: PyTree
    perturbation_norm: jax.Array
    num_steps: int


def _norm(tree: PyTree) -> jax.Array:
    return optax.tree.norm(tree)


def _normalised(tree: PyTree, radius) -> PyTree:
    norm = _norm(tree)
    tiny = jnp.finfo(norm.dtype).tiny
    return optax.tree.scale(radius / jnp.maximum(norm, tiny), tree)


def _project(delta: PyTree, rho) -> PyTree:
    """Onto the ball ‖δ‖ ≤ ρ."""
    norm = _norm(delta)
    return optax.tree.scale(
        jnp.minimum(1.0, rho / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)), delta
    )


def _ascent(objective, params, batch, scale, rho, *, num_steps, step_size, chunk_size):
    """Projected normalised ascent on δ with ε = scale ⊙ δ, ‖δ‖ ≤ ρ."""

    def loss(p):
        return operators._mean_loss(objective, p, batch, chunk_size=chunk_size)

    def perturbed(delta):
        return jax.tree_util.tree_map(lambda p, s, d: p + s * d, params, scale, delta)

    def value_and_grad(delta):
        value, g = jax.value_and_grad(lambda d: loss(perturbed(d)))(delta)
        return value, g

    base, g0 = value_and_grad(jax.tree_util.tree_map(jnp.zeros_like, params))
    delta = _normalised(g0, rho)  # SAM's first-order maximiser
    value, g = value_and_grad(delta)
    eta = rho * step_size

    def step(_, state):
        delta, value, g, best_delta, best_value = state
        delta = _project(optax.tree.add_scale(delta, eta, _normalised(g, 1.0)), rho)
        value, g = value_and_grad(delta)
        better = value > best_value
        best_delta = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), delta, best_delta)
        return delta, value, g, best_delta, jnp.maximum(value, best_value)

    state = (delta, value, g, delta, value)
    _, _, _, best_delta, best_value = jax.lax.fori_loop(0, num_steps, step, state)
    epsilon = jax.tree_util.tree_map(lambda s, d: s * d, scale, best_delta)
    return best_value - base, base, epsilon, _norm(best_delta)


_ascent_jit = jax.jit(_ascent, static_argnames=("num_steps", "step_size", "chunk_size"))


def _scale(params: PyTree, adaptive: bool, xi: float) -> PyTree:
    if adaptive:
        return jax.tree_util.tree_map(lambda p: jnp.abs(p) + xi, params)
    return jax.tree_util.tree_map(jnp.ones_like, params)


def _check(objective, params, batch, *, chunk_size, xi, positive, num_steps=0):
    """Validates the inputs (``positive``: name → value of the settings that must be > 0)."""
    batch = operators._as_batch(batch)
    operators.prepare(objective, params, batch, chunk_size=chunk_size)
    for name, value in positive.items():
        checks.check_positive_scalar(name, value)
    checks.check_nonnegative_scalar("xi", xi)
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
    return batch


def worst_case_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    rho: float,
    num_steps: int = 10,
    step_size: float = 0.25,
    adaptive: bool = False,
    xi: float = 0.0,
    chunk_size: int | None = None,
) -> Ascent:
    """max_{‖ε ⊘ c‖ ≤ ρ} L(θ + ε) − L(θ) by projected normalised gradient ascent.

    Args:
      rho: the radius ρ.
      num_steps: ascent steps after the start ε₀ = ρ c ⊙ ∇/‖c ⊙ ∇‖ (0: SAM's one-step value).
      step_size: each step moves δ by ``step_size`` · ρ along the normalised gradient before
        projecting back onto the ball.
      adaptive: c = |θ| + ξ (adaptive sharpness); otherwise c = 1.
      xi: ξ ≥ 0, keeps zero parameters perturbable in the adaptive form (Kwon et al. use 0.01).
    """
    batch = _check(
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        xi=xi,
        num_steps=num_steps,
        positive={"rho": rho, "step_size": step_size},
    )
    scale = _scale(params, adaptive, xi)
    sharp, base, eps, norm = _ascent_jit(
        objective,
        params,
        batch,
        scale,
        jnp.asarray(rho),
        num_steps=num_steps,
        step_size=float(step_size),
        chunk_size=chunk_size,
    )
    return Ascent(sharp, base, eps, norm, num_steps)


def _m_values(objective, params, groups, scale, rho, *, num_steps, step_size):
    def one(group):
        return _ascent(
            objective,
            params,
            Batch(*group),
            scale,
            rho,
            num_steps=num_steps,
            step_size=step_size,
            chunk_size=None,
        )[0]

    return jax.vmap(one)(groups)


_m_values_jit = jax.jit(_m_values, static_argnames=("num_steps", "step_size"))


def m_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    m: int,
    rho: float,
    num_steps: int = 10,
    step_size: float = 0.25,
    adaptive: bool = False,
    xi: float = 0.0,
) -> jax.Array:
    """(1/(n/m)) Σ_batches S_ρ(batch): the worst-case sharpness of each of the n/m disjoint
    batches of m consecutive examples (shuffle first for random batches), averaged; n must be
    a multiple of m. The batches run vmapped in one program."""
    batch = _check(
        objective,
        params,
        batch,
        chunk_size=None,
        xi=xi,
        num_steps=num_steps,
        positive={"rho": rho, "step_size": step_size},
    )
    n = checks.num_examples(batch)
    checks.check_positive_int("m", m)
    if n % m:
        raise ValueError(f"m={m} must divide the number of examples n={n}")
    groups = jax.tree_util.tree_map(lambda a: a.reshape(n // m, m, *a.shape[1:]), batch)
    values = _m_values_jit(
        objective,
        params,
        groups,
        _scale(params, adaptive, xi),
        jnp.asarray(rho),
        num_steps=num_steps,
        step_size=float(step_size),
    )
    return jnp.mean(values)


def _average_samples(objective, params, batch, scale, key, sigma, *, num_samples, chunk_size):
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def one(k):
        keys = jax.random.split(k, len(leaves))
        noise = [
            jax.random.normal(kk, a.shape, a.dtype) for kk, a in zip(keys, leaves, strict=True)
        ]
        eps = jax.tree_util.tree_unflatten(treedef, noise)
        point = jax.tree_util.tree_map(lambda p, s, e: p + sigma * s * e, params, scale, eps)
        return operators._mean_loss(objective, point, batch, chunk_size=chunk_size)

    base = operators._mean_loss(objective, params, batch, chunk_size=chunk_size)
    return jax.lax.map(one, jax.random.split(key, num_samples)) - base


_average_jit = jax.jit(_average_samples, static_argnames=("num_samples", "chunk_size"))


def average_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    sigma: float,
    key: jax.Array,
    num_samples: int = 32,
    adaptive: bool = False,
    xi: float = 0.0,
    chunk_size: int | None = None,
) -> Estimate:
    """E_ε[L(θ + ε)] − L(θ), ε ∼ N(0, σ² diag(c²)) (c = |θ| + ξ when ``adaptive``, else 1):
    a Monte-Carlo estimate over ``num_samples`` draws with its standard error."""
    batch = _check(
        objective, params, batch, chunk_size=chunk_size, xi=xi, positive={"sigma": sigma}
    )
    checks.check_positive_int("num_samples", num_samples)
    if num_samples < 2:
        raise ValueError("num_samples must be >= 2 for a standard error")
    samples = _average_jit(
        objective,
        params,
        batch,
        _scale(params, adaptive, xi),
        key,
        jnp.asarray(sigma),
        num_samples=num_samples,
        chunk_size=chunk_size,
    )
    mean = jnp.mean(samples)
    return Estimate(mean, jnp.std(samples, ddof=1) / jnp.sqrt(num_samples), num_samples)


def relative_flatness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    kernel: str,
    chunk_size: int | None = None,
    max_bytes: float | None = None,
) -> jax.Array:
    """Petzka et al. (2021) relative flatness κ = Σ_{s,s'} ⟨w_s, w_s'⟩ tr(H_{s,s'}) of one
    layer, exactly.

    Args:
      kernel: the path of the layer's kernel (``(in, out)``, e.g. ``"params/Dense_1/kernel"``);
        w_s is its column s, the weights into output unit s.
      max_bytes: refuse when the layer's dense Hessian block would exceed this.
    """
    sub = subsets.select(params, kernel)
    if len(sub) != 1:
        raise ValueError(f"kernel must name one leaf, {kernel!r} selects {sorted(sub)}")
    ((path, w),) = sub.items()
    if w.ndim != 2:
        raise ValueError(f"relative flatness takes a 2-D kernel (in, out); {path} has {w.shape}")
    h = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=path)
    d_in, d_out = w.shape
    block = linalg.dense(h, sub, max_bytes=max_bytes).reshape(d_in, d_out, d_in, d_out)
    traces = jnp.einsum("isit->st", block)  # tr(H_{s,t}) = Σ_i ∂²L/∂W_is ∂W_it
    return jnp.sum((w.T @ w) * traces)
