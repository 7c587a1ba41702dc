"""Input–output Jacobian norms over a dataset (MacDonald, Valmadre & Lucey 2023).

For a per-example model ``predict(params, x)`` with outputs g(x) ∈ R^K — the logits f(x)
(``output="logits"``) or the probabilities softmax(f(x)) (``output="softmax"``) — the input
Jacobian of example p is

    J_p = ∂g(x_p)/∂x ∈ R^{K × D},

taken with respect to the FLATTENED input (``ravel_pytree`` order; an image of shape
(H, W, C) has D = H·W·C). Over a dataset of n examples this module returns per-example
norms q_p and their mean (1/n) Σ_p q_p and maximum max_p q_p (the theory of the paper uses the
sample maximum of the spectral norm):

==========================================  =================================================
function                                    q_p
==========================================  =================================================
:func:`jacobian_frobenius_norm`             ‖J_p‖_F, exact (jacfwd if D ≤ K, else jacrev)
:func:`jacobian_frobenius_squared_hutchinson`  estimate of ‖J_p‖_F² = E_z ‖J_p z‖²
                                            (Rademacher z over the inputs) or E_u ‖J_pᵀ u‖²
                                            (over the outputs), with standard errors
:func:`jacobian_spectral_norm`              ‖J_p‖₂ = σ_max(J_p): exact by SVD of the dense
                                            K × D Jacobian, or by power iteration with one
                                            JVP and one VJP per step
==========================================  =================================================

Two terms of the progressive-sharpening argument (MacDonald et al. 2023) live here too:
:func:`curvature_terms` (the output curvature ‖Λ_p‖₂ of the loss and the input-space
Gauss–Newton curvature κ_p = ‖J_pᵀ Λ_p J_p‖₂ ≤ ‖Λ_p‖₂ ‖J_p‖₂²) and
:func:`jacobian_bound_term` (the Jacobian term of their generalisation bound).

Examples are processed ``chunk_size`` at a time (``per_example.map_examples``), so peak memory
is ``chunk_size`` times one example's work (for the dense routes, ``chunk_size · K · D``
numbers); only the n per-example scalars are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import map_examples

PyTree = Any

__all__ = [
    "OUTPUTS",
    "CurvatureTerms",
    "JacobianNorms",
    "curvature_terms",
    "input_jacobians",
    "jacobian_bound_term",
    "jacobian_frobenius_norm",
    "jacobian_frobenius_squared_hutchinson",
    "jacobian_spectral_norm",
]

OUTPUTS = ("logits", "softmax")


class JacobianNorms(NamedTuple):
    """Per-example Jacobian norms q_p reduced over a dataset.

    Attributes:
      mean: (1/n) Σ_p q_p.
      max: max_p q_p (for a stochastic estimate: the maximum of the per-example estimates,
        which is biased upwards by the noise).
      values: ``(n,)`` the q_p, or None unless ``per_example=True``.
      stderr: standard error of ``mean`` (stochastic estimators only, else None):
        (1/n) (Σ_p se_p²)^{1/2}, the probes being independent across examples.
      values_stderr: ``(n,)`` the per-example standard errors se_p (stochastic estimators
        with ``per_example=True`` only).
      num_probes: probes per example (stochastic estimators only).
    """

    mean: jax.Array
    max: jax.Array
    values: jax.Array | None = None
    stderr: jax.Array | None = None
    values_stderr: jax.Array | None = None
    num_probes: int | None = None


# ------------------------------------------------------------------------------ validation


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def _check_inputs(
    predict: Callable[[PyTree, PyTree], jax.Array], params: PyTree, inputs: PyTree
) -> tuple[int, int, int]:
    """Returns (n, K, D); raises on non-float inputs or non-vector outputs."""
    checks.check_params(params)
    n = checks.num_examples(inputs)
    for leaf in jax.tree_util.tree_leaves(inputs):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"input Jacobians need floating-point inputs, got dtype {jnp.result_type(leaf)}"
            )
    example = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), inputs)
    out = jax.eval_shape(predict, params, example)
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) != 1:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"predict must return a vector of shape (K,) per example, got {shape}; use (1,) "
            "for a scalar output"
        )
    size = sum(int(jnp.size(leaf)) // n for leaf in jax.tree_util.tree_leaves(inputs))
    return n, int(out.shape[0]), size


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _example_function(predict, params, example, output):
    """(g, z): g maps the flattened input z ∈ R^D of one example to its outputs ∈ R^K."""
    flat_x, unravel = ravel_pytree(example)

    def g(z):
        out = predict(params, unravel(z))
        return jax.nn.softmax(out) if output == "softmax" else out

    return g, flat_x


def _dense_jacobian(predict, params, output, num_outputs: int, size: int):
    """``example -> J_p`` (K × D, dense): ``jax.jacfwd`` (D JVPs) when D ≤ K, else
    ``jax.jacrev`` (K VJPs)."""
    jac = jax.jacfwd if size <= num_outputs else jax.jacrev

    def jacobian(example):
        g, z = _example_function(predict, params, example, output)
        return jac(g)(z)

    return jacobian


def _power_spectral_norm(g, z, key: jax.Array, *, num_iters: int, tol: float) -> jax.Array:
    """σ_max of the Jacobian of g at z by power iteration (see :func:`jacobian_spectral_norm`).

    On J Jᵀ (K × K) when K ≤ D, else on Jᵀ J (D × D), from a Gaussian start vector drawn
    from ``key``; one JVP and one VJP of a single linearisation per step.
    """
    out, jvp = jax.linearize(g, z)
    vjp = jax.linear_transpose(jvp, z)
    if out.size <= z.size:
        op = lambda u: jvp(vjp(u)[0])  # J Jᵀ on R^K
        v0 = jax.random.normal(key, out.shape, out.dtype)
    else:
        op = lambda v: vjp(jvp(v))[0]  # Jᵀ J on R^D
        v0 = jax.random.normal(key, z.shape, z.dtype)
    tiny = jnp.finfo(v0.dtype).tiny
    v0 = v0 / jnp.linalg.norm(v0)
    av0 = op(v0)
    lam0 = jnp.vdot(v0, av0)

    def cond(state):
        i, _, _, lam, lam_prev = state
        return (i < num_iters) & (jnp.abs(lam - lam_prev) > tol * jnp.abs(lam))

    def step(state):
        i, _, av, lam, _ = state
        v = av / jnp.maximum(jnp.linalg.norm(av), tiny)
        av_new = op(v)
        return i + 1, v, av_new, jnp.vdot(v, av_new), lam

    init = (jnp.int32(1), v0, av0, lam0, lam0 + 1 + jnp.abs(lam0))
    lam = jax.lax.while_loop(cond, step, init)[3]
    return jnp.sqrt(jnp.maximum(lam, 0))


def _with_index(inputs: PyTree, n: int):
    return inputs, jnp.arange(n, dtype=jnp.int32)


def _reduce(values: jax.Array, per_example: bool) -> JacobianNorms:
    return JacobianNorms(
        mean=jnp.mean(values), max=jnp.max(values), values=values if per_example else None
    )


# --------------------------------------------------------------------------------- exact


def input_jacobians(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    output: str = "logits",
    chunk_size: int | None = None,
) -> jax.Array:
    """Dense J_p = ∂g(x_p)/∂x for every example, shape ``(n, K, D)``.

    Per example ``jax.jacfwd`` (D JVPs) when D ≤ K, else ``jax.jacrev`` (K VJPs).

    Args:
      predict: per-example model ``(params, x) -> (K,)``.
      params: its parameters.
      inputs: the examples, leading axis n (any per-example shape, e.g. (H, W, C)).
      output: ``"logits"`` (g = f) or ``"softmax"`` (g = softmax ∘ f).
      chunk_size: examples per chunk.

    Raises:
      ValueError / TypeError: on a bad ``output``, non-float inputs or non-vector outputs.
    """
    _check_output(output)
    _, num_outputs, size = _check_inputs(predict, params, inputs)
    jacobian = _dense_jacobian(predict, params, output, num_outputs, size)
    return map_examples(jacobian, inputs, chunk_size=chunk_size)


def jacobian_frobenius_norm(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    output: str = "logits",
    chunk_size: int | None = None,
    per_example: bool = False,
) -> JacobianNorms:
    """Exact q_p = ‖∂g(x_p)/∂x‖_F = (Σ_kj (J_p)_kj²)^{1/2}; mean and max over the dataset.

    Cost min(K, D) JVPs/VJPs per example; memory ``chunk_size · K · D``.

    Args:
      predict, params, inputs, output, chunk_size: as in :func:`input_jacobians`.
      per_example: also return the n values.

    Returns:
      :class:`JacobianNorms` (no standard errors: exact).
    """
    _check_output(output)
    _, num_outputs, size = _check_inputs(predict, params, inputs)
    jacobian = _dense_jacobian(predict, params, output, num_outputs, size)

    def one(example):
        return jnp.sqrt(jnp.sum(jnp.square(jacobian(example))))

    return _reduce(map_examples(one, inputs, chunk_size=chunk_size), per_example)


def jacobian_spectral_norm(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    output: str = "logits",
    method: str = "svd",
    num_iters: int = 100,
    tol: float = 1e-10,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    per_example: bool = False,
) -> JacobianNorms:
    """q_p = ‖∂g(x_p)/∂x‖₂ = σ_max(J_p); mean and max over the dataset.

    Methods:

    * ``"svd"`` (exact): the largest singular value of the dense K × D Jacobian (cost
      min(K, D) JVPs/VJPs and memory ``chunk_size · K · D``); the right choice for small K.
    * ``"power"``: power iteration on J_p J_pᵀ (K × K) when K ≤ D, else on J_pᵀ J_p (D × D),
      with one JVP and one VJP of a single linearisation per step; it stops after
      ``num_iters`` steps or when the Rayleigh quotient λ changes by at most ``tol · λ``.
      √λ is a lower bound on σ_max that converges to it (error ∝ (σ₂/σ₁)^{2t}). The start
      vector of example p is Gaussian from ``fold_in(key, p)``: results do not depend on
      ``chunk_size``.

    Args:
      predict, params, inputs, output, chunk_size, per_example: as in
        :func:`jacobian_frobenius_norm`.
      method: ``"svd"`` or ``"power"``.
      num_iters: maximum power iterations.
      tol: relative tolerance on the Rayleigh quotient.
      key: PRNG key for the start vectors (default ``PRNGKey(0)``).

    Returns:
      :class:`JacobianNorms` (no standard errors: the methods are deterministic).
    """
    _check_output(output)
    if method not in ("svd", "power"):
        raise ValueError(f"method must be 'svd' or 'power', got {method!r}")
    _check_positive_int("num_iters", num_iters)
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    n, num_outputs, size = _check_inputs(predict, params, inputs)

    if method == "svd":
        jacobian = _dense_jacobian(predict, params, output, num_outputs, size)

        def one_svd(example):
            return jnp.linalg.svd(jacobian(example), compute_uv=False)[0]

        return _reduce(map_examples(one_svd, inputs, chunk_size=chunk_size), per_example)

    key = jax.random.PRNGKey(0) if key is None else key

    def one_power(example_index):
        example, index = example_index
        g, z = _example_function(predict, params, example, output)
        return _power_spectral_norm(
            g, z, jax.random.fold_in(key, index), num_iters=num_iters, tol=tol
        )

    values = map_examples(one_power, _with_index(inputs, n), chunk_size=chunk_size)
    return _reduce(values, per_example)


# ---------------------------------------------------------------------------- stochastic


def jacobian_frobenius_squared_hutchinson(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    key: jax.Array,
    num_probes: int,
    side: str = "output",
    output: str = "logits",
    chunk_size: int | None = None,
    per_example: bool = False,
) -> JacobianNorms:
    """Hutchinson estimates of q_p = ‖∂g(x_p)/∂x‖_F² (the SQUARED norm; unbiased).

    * ``side="input"``: q̂_p = (1/S) Σ_s ‖J_p z_s‖², z_s ∈ {±1}^D Rademacher (one JVP each);
    * ``side="output"``: q̂_p = (1/S) Σ_s ‖J_pᵀ u_s‖², u_s ∈ {±1}^K (one VJP each).

    Both are unbiased since E zzᵀ = I, and tr(J_pᵀJ_p) = tr(J_p J_pᵀ) = ‖J_p‖_F². The variance
    per probe is 2(‖A‖_F² − Σ_i A_ii²) for A = J_pᵀJ_p (input side) or J_p J_pᵀ (output side),
    usually smaller on the smaller side. The probes of example p come from
    ``fold_in(key, p)``, so results do not depend on ``chunk_size``. se_p is the sample
    standard deviation over the S probes divided by √S.

    Args:
      predict, params, inputs, output, chunk_size, per_example: as in
        :func:`jacobian_frobenius_norm`.
      key: PRNG key.
      num_probes: S ≥ 2 probes per example (two are needed for a standard error).
      side: ``"input"`` or ``"output"``.

    Returns:
      :class:`JacobianNorms` with ``mean`` estimating (1/n) Σ_p ‖J_p‖_F² and its ``stderr``.
    """
    _check_output(output)
    _check_positive_int("num_probes", num_probes, minimum=2)
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    n, _, _ = _check_inputs(predict, params, inputs)

    def one(example_index):
        example, index = example_index
        g, z = _example_function(predict, params, example, output)
        out, jvp = jax.linearize(g, z)
        k = jax.random.fold_in(key, index)
        if side == "input":
            probes = jax.random.rademacher(k, (num_probes, *z.shape), z.dtype)
            images = jax.vmap(jvp)(probes)
        else:
            vjp = jax.linear_transpose(jvp, z)
            probes = jax.random.rademacher(k, (num_probes, *out.shape), out.dtype)
            images = jax.vmap(lambda u: vjp(u)[0])(probes)
        samples = jnp.sum(jnp.square(images), axis=1)
        return jnp.mean(samples), jnp.std(samples, ddof=1) / num_probes**0.5

    values, se = map_examples(one, _with_index(inputs, n), chunk_size=chunk_size)
    return JacobianNorms(
        mean=jnp.mean(values),
        max=jnp.max(values),
        values=values if per_example else None,
        stderr=jnp.sqrt(jnp.sum(jnp.square(se))) / n,
        values_stderr=se if per_example else None,
        num_probes=num_probes,
    )


# ---------------------------------------------------------------------------- curvature


class CurvatureTerms(NamedTuple):
    """Per-example terms of the Jacobian–curvature argument, each of shape ``(n,)``.

    Attributes:
      output_curvature: ‖Λ_p‖₂, the top eigenvalue of Λ_p = ∇²_f ℓ(f(x_p), y_p).
      input_gauss_newton: κ_p = ‖J_pᵀ Λ_p J_p‖₂ = ‖Λ_p^{1/2} J_p‖₂², the Gauss–Newton
        curvature of ℓ_p in input space.
      jacobian_spectral_squared: ‖J_p‖₂², so that κ_p ≤ ‖Λ_p‖₂ ‖J_p‖₂².
    """

    output_curvature: jax.Array
    input_gauss_newton: jax.Array
    jacobian_spectral_squared: jax.Array


def curvature_terms(
    objective: Objective, params: PyTree, batch: Batch, *, chunk_size: int | None = None
) -> CurvatureTerms:
    """‖Λ_p‖₂, κ_p = ‖J_pᵀ Λ_p J_p‖₂ and ‖J_p‖₂² for every example (exact).

    J_p = ∂f(x_p)/∂x ∈ R^{K×D} is the Jacobian of the outputs (logits) with respect to the
    flattened input (dense: min(K, D) JVPs/VJPs), Λ_p the loss's closed-form output Hessian.
    With S_p = J_p J_pᵀ (K×K) and Λ_p^{1/2} from its eigendecomposition (negative rounding
    errors clipped), κ_p = λ_max(Λ_p^{1/2} S_p Λ_p^{1/2}) and ‖J_p‖₂² = λ_max(S_p).

    Args:
      objective: the model and its loss (Λ in closed form, or by autodiff).
      params: the parameters.
      batch: the examples (floating-point inputs).
      chunk_size: examples per chunk (memory ``chunk_size · K · D``).

    Returns:
      :class:`CurvatureTerms`.
    """
    checks.check_params(params)
    checks.num_examples(batch)

    def one(example):
        x, y = example
        flat_x, unravel = ravel_pytree(x)
        if not jnp.issubdtype(flat_x.dtype, jnp.floating):
            raise TypeError(f"input Jacobians need floating-point inputs, got {flat_x.dtype}")

        def g(z):
            return objective.predict(params, unravel(z))

        f = g(flat_x)
        jac = (jax.jacfwd if flat_x.size <= f.size else jax.jacrev)(g)(flat_x)
        lam = objective.output_hessian(f, y)
        w, v = jnp.linalg.eigh(0.5 * (lam + lam.T))
        root = (v * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]) @ v.T
        s = jac @ jac.T
        m = root @ s @ root
        return (
            w[-1],
            jnp.linalg.eigvalsh(0.5 * (m + m.T))[-1],
            jnp.linalg.eigvalsh(0.5 * (s + s.T))[-1],
        )

    out = map_examples(one, (batch.inputs, batch.targets), chunk_size=chunk_size)
    return CurvatureTerms(*out)


def jacobian_bound_term(
    jacobian_norm: float, num_examples: int, dimension: int, *, constant: float = 1.0
) -> float:
    """The Jacobian term of the generalisation bound, (standard form) C · M · (log n / n)^{1/d}.

    The paper bounds the generalisation gap of a model through its Lipschitz constant over
    the data distribution, which it approximates by the empirical Jacobian norm
    M = max_p ‖∂f(x_p)/∂x‖₂ over the n training examples; the rate at which the empirical
    measure of n samples approaches a d-dimensional data distribution (in Wasserstein
    distance) gives the decay (log n / n)^{1/d}. The paper's exact constants are not
    reproduced here: ``constant`` C (default 1) stands for them and for the Lipschitz
    constant of the loss in the outputs (√2 for softmax cross-entropy on logits), so the
    term is meant for comparing runs at the same n and d.

    Args:
      jacobian_norm: M ≥ 0, the empirical Jacobian norm.
      num_examples: n ≥ 2.
      dimension: d ≥ 1 (the input dimension, or an intrinsic dimension of the data).
      constant: C > 0.

    Returns:
      C · M · (log n / n)^{1/d}.

    Raises:
      ValueError: for M < 0 (or not finite), n < 2, d < 1 or C ≤ 0.
    """
    if not (math.isfinite(jacobian_norm) and jacobian_norm >= 0):
        raise ValueError(f"jacobian_norm must be finite and >= 0, got {jacobian_norm}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 2:
        raise ValueError(f"num_examples must be an int >= 2, got {num_examples!r}")
    if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
        raise ValueError(f"dimension must be an int >= 1, got {dimension!r}")
    if not constant > 0:
        raise ValueError(f"constant must be positive, got {constant}")
    rate = (math.log(num_examples) / num_examples) ** (1.0 / dimension)
    return float(constant * jacobian_norm * rate)
