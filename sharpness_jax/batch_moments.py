"""Exact expectations over mini-batches, and the quantities built from them: the
ratio-of-expectations batch sharpness and the gradient–noise interaction (GNI).

Notation (means over the n examples of ``batch``, as everywhere in this library):
L(θ) = (1/n) Σ_p ℓ_p(θ), ḡ = ∇L, H = ∇²L, g_p = ∇ℓ_p, h_p = ∇²ℓ_p, δ_p = g_p − ḡ,
C = (1/n) Σ_p δ_p δ_pᵀ (the SGD-noise covariance of one example). A mini-batch B of size b
has the MEAN loss L_B = (1/b) Σ_{p∈B} ℓ_p, with gradient g_B and Hessian H_B; it is drawn
with or without replacement (``replace``) as in :mod:`sharpness_jax.minibatch`.

==========================================  ==================================================
function                                    quantity
==========================================  ==================================================
gradient_hessian_moments                    the per-example sums behind the expectations
batch_expectations                          E_B[g_BᵀH_Bg_B], E_B[‖g_B‖²], E_B[g_BᵀHg_B]
batch_sharpness_ratio_of_expectations       E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²]  (exact)
gradient_noise_interaction                  E_B[g_Bᵀ H g_B] / ‖ḡ‖²  (exact or Hutchinson)
==========================================  ==================================================

The Monte-Carlo counterpart, batch sharpness as the expectation of the ratio, is
:func:`sharpness_jax.sharpness.batch_sharpness`. Cost is counted in gradient-equivalents: a
Hessian-vector product (forward-over-reverse) costs about 2–2.5 gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpness_jax import linalg, minibatch, operators, subsets
from sharpness_jax.linalg import Estimate
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any

__all__ = [
    "GNI_METHODS",
    "BatchExpectations",
    "GradientHessianMoments",
    "batch_expectations",
    "batch_sharpness_ratio_of_expectations",
    "gradient_hessian_moments",
    "gradient_noise_interaction",
]

#: The methods of :func:`gradient_noise_interaction`.
GNI_METHODS = ("exact", "hutchinson")


class GradientHessianMoments(NamedTuple):
    """Per-example sums from which every mini-batch expectation below follows exactly.

    All are means over the n examples; δ_p = g_p − ḡ.

    Attributes:
      num_examples: n (a Python int).
      grad_norm_sq: ‖ḡ‖².
      grad_hessian_grad: ḡᵀ H ḡ.
      trace_c: tr(C) = (1/n) Σ_p ‖δ_p‖².
      trace_hc: tr(H C) = (1/n) Σ_p δ_pᵀ H δ_p.
      cross: (1/n) Σ_p ḡᵀ h_p δ_p.
      self_term: (1/n) Σ_p δ_pᵀ h_p δ_p.
    """

    num_examples: int
    grad_norm_sq: jax.Array
    grad_hessian_grad: jax.Array
    trace_c: jax.Array
    trace_hc: jax.Array
    cross: jax.Array
    self_term: jax.Array


class BatchExpectations(NamedTuple):
    """Exact expectations over mini-batches of size b.

    Attributes:
      grad_batch_hessian_grad: E_B[g_Bᵀ H_B g_B].
      grad_norm_sq: E_B[‖g_B‖²].
      grad_hessian_grad: E_B[g_Bᵀ H g_B] (H the full-batch Hessian).
    """

    grad_batch_hessian_grad: jax.Array
    grad_norm_sq: jax.Array
    grad_hessian_grad: jax.Array


# ----------------------------------------------------------------------------- helpers


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return optax.tree.vdot(a, b)


def _float_dtype(params: PyTree):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num/den, NaN where den = 0 (an undefined ratio)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.nan)


# ------------------------------------------------------- exact mini-batch expectations


def gradient_hessian_moments(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> GradientHessianMoments:
    """The per-example sums of :class:`GradientHessianMoments`, exactly.

    Passes over the data, each chunked (memory: ``chunk_size`` examples' activations and
    ``chunk_size`` × P for the chunk's centred gradients, never n × n; ``chunk_size=None``
    makes the whole batch one chunk, i.e. n × P):

    1. ḡ (one gradient pass) and Hḡ (one Hessian-vector product): ‖ḡ‖², ḡᵀHḡ.
    2. Per example p: (g_p, h_p δ_p) from one linearisation of ∇ℓ_p at δ_p = g_p − ḡ, giving
       ‖δ_p‖², ḡᵀh_pδ_p and δ_pᵀh_pδ_p; then H δ_p by a full-batch Hessian-vector product,
       giving δ_pᵀHδ_p.

    tr(HC) takes n full-batch Hessian-vector products, i.e. O(n²) per-example products
    (≈ 2.5·n epochs of gradient work): exact, and the dominant cost.

    Args:
      objective, params, batch: the objective and the n examples.
      chunk_size: examples per chunk.
      subset: restrict gradients and Hessians to these parameter leaves.

    Returns:
      :class:`GradientHessianMoments`.
    """
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    g_bar = operators.gradient(objective, params, batch, chunk_size=chunk_size)
    hess = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    ghg = _vdot(g_bar, hess(g_bar))
    example_grad = jax.grad(objective.example_loss)
    dtype = _float_dtype(params)

    def chunk_fn(chunk, mask, index):
        del index

        def one(x, y):
            g_p, hvp = jax.linearize(lambda p: example_grad(p, x, y), params)
            d = jax.tree_util.tree_map(jnp.subtract, g_p, g_bar)
            hd = hvp(d)
            return d, jnp.stack([_vdot(d, d), _vdot(g_bar, hd), _vdot(d, hd)])

        d, local = jax.vmap(one)(*chunk)

        def full(item):
            v, keep = item
            return jax.lax.cond(
                keep, lambda u: _vdot(u, hess(u)), lambda u: jnp.zeros((), dtype), v
            )

        d_hess_d = jax.lax.map(full, (d, mask))
        local = jnp.where(mask[:, None], local, 0)
        return jnp.concatenate([jnp.sum(local, axis=0), jnp.sum(d_hess_d)[None]])

    sums = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n
    return GradientHessianMoments(
        num_examples=n,
        grad_norm_sq=_vdot(g_bar, g_bar),
        grad_hessian_grad=ghg,
        trace_c=sums[0],
        trace_hc=sums[3],
        cross=sums[1],
        self_term=sums[2],
    )


def batch_expectations(
    moments: GradientHessianMoments, /, *, batch_size: int, replace: bool = False
) -> BatchExpectations:
    """Exact E_B[g_Bᵀ H_B g_B], E_B[‖g_B‖²] and E_B[g_Bᵀ H g_B] for batches of size b.

    Derivation. Write g_B = ḡ + δ_B and H_B = H + Δ_B with δ_B = (1/b) Σ_s δ_{i_s},
    Δ_B = (1/b) Σ_s (h_{i_s} − H); both have mean zero. Expanding,

      g_Bᵀ H_B g_B = ḡᵀHḡ + 2ḡᵀHδ_B + δ_BᵀHδ_B + ḡᵀΔ_Bḡ + 2ḡᵀΔ_Bδ_B + δ_BᵀΔ_Bδ_B.

    Terms linear in δ_B or Δ_B vanish in expectation. The quadratic ones are sums
    (1/b²) Σ_{s,t} over pairs of batch slots: with replacement only coincident slots s = t
    survive (independent slots give a mean-zero factor), so E = (1/b)·(per-example mean);
    without replacement distinct slots hold a uniformly random pair of distinct examples
    (probability π₂ per pair) and the zero sums turn Σ_{p≠q} into −Σ_{p=q}, giving
    κ₂ = (n−b)/(b(n−1)). The cubic term (1/b³) Σ_{s,t,u} has four coincidence patterns
    (all equal, s = u ≠ t, s = t ≠ u, t = u ≠ s, all distinct); with replacement only
    s = t = u survives (κ₃ = 1/b²), without replacement each pattern's sum over distinct
    examples reduces to −Σ_p or +2Σ_p of the diagonal, weighted by π₁, π₂, π₃
    (see :func:`minibatch.sampling_coefficients`). Altogether

      E[g_Bᵀ H_B g_B] = ḡᵀHḡ + κ₂ (tr(HC) + 2·(1/n)Σ_p ḡᵀh_pδ_p)
                        + κ₃ ((1/n)Σ_p δ_pᵀh_pδ_p − tr(HC)),
      E[‖g_B‖²]       = ‖ḡ‖² + κ₂ tr(C),
      E[g_Bᵀ H g_B]   = ḡᵀHḡ + κ₂ tr(HC)        (the covariance of g_B is κ₂ C).

    Equivalently, in raw (uncentred) per-example sums with A = ḡᵀHḡ,
    F = (1/n)Σ_p g_pᵀHg_p, D = (1/n)Σ_p g_pᵀh_pḡ, E = (1/n)Σ_p g_pᵀh_pg_p: with replacement
    E[g_BᵀH_Bg_B] = [(b−1)(b−2)A + (b−1)(F + 2D) + E]/b²; without replacement
    (1/b³)[π₃(n³A − n²F − 2n²D + 2nE) + π₂(n²F + 2n²D − 3nE) + π₁nE].
    b = 1 gives E for both schemes and b = n without replacement gives ḡᵀHḡ.

    Args:
      moments: from :func:`gradient_hessian_moments`.
      batch_size: b, 1 ≤ b ≤ n.
      replace: sampling with replacement (else a uniform b-subset).

    Returns:
      :class:`BatchExpectations`.

    Raises:
      ValueError: if b is outside [1, n]; TypeError if ``moments.num_examples`` is traced.
    """
    try:
        n = int(moments.num_examples)
    except jax.errors.ConcretizationTypeError as err:
        raise TypeError(
            "moments.num_examples must be a concrete int; do not pass the moments through "
            "jax.jit as an argument (compute them inside the same jitted function instead)"
        ) from err
    b = minibatch.check_batch_size(batch_size, n)
    replace = minibatch.check_replace(replace)
    k2, k3 = minibatch.sampling_coefficients(n, b, replace)
    m = moments
    batch_h = (
        m.grad_hessian_grad + k2 * (m.trace_hc + 2 * m.cross) + k3 * (m.self_term - m.trace_hc)
    )
    return BatchExpectations(
        grad_batch_hessian_grad=batch_h,
        grad_norm_sq=m.grad_norm_sq + k2 * m.trace_c,
        grad_hessian_grad=m.grad_hessian_grad + k2 * m.trace_hc,
    )


def batch_sharpness_ratio_of_expectations(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    batch_size: int,
    replace: bool = False,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²], exactly (no sampling).

    The ratio-of-expectations variant of batch sharpness (Andreyev & Beneventano 2024,
    appendix); the formulas are in :func:`batch_expectations`, the sums (and their O(n²)
    per-example cost) in :func:`gradient_hessian_moments`. NaN when every g_p = 0. To scan
    several batch sizes, call :func:`gradient_hessian_moments` once and
    :func:`batch_expectations` per size.
    """
    n = operators.prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)[2]
    minibatch.check_batch_size(batch_size, n)
    minibatch.check_replace(replace)
    moments = gradient_hessian_moments(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    e = batch_expectations(moments, batch_size=batch_size, replace=replace)
    return _safe_ratio(e.grad_batch_hessian_grad, e.grad_norm_sq)


def gradient_noise_interaction(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    batch_size: int,
    replace: bool = False,
    method: str = "exact",
    key: jax.Array | None = None,
    num_probes: int | None = None,
    probe_chunk: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array | Estimate:
    """GNI = E_B[g_Bᵀ H g_B] / ‖ḡ‖² with the full-batch H, exactly or by Hutchinson.

    E_B[g_Bᵀ H g_B] = ḡᵀHḡ + tr(H Cov(g_B)), Cov(g_B) = C/b with replacement and
    C (n−b)/(b(n−1)) without (κ₂ C, :func:`minibatch.minibatch_noise_scale`). NaN when ḡ = 0.

    * ``method="exact"`` (default): tr(HC) = (1/n) Σ_p δ_pᵀ H δ_p from chunked Hessian-vector
      products of the centred per-example gradients (n full-batch products, see
      :func:`gradient_hessian_moments`); returns an array.
    * ``method="hutchinson"``: tr(HC) = E_z[zᵀ H C z] with ``num_probes`` Rademacher z (one C
      and one H product per probe; :func:`linalg.trace`, ``probe_chunk`` probes at a time);
      returns an :class:`~sharpness_jax.linalg.Estimate` whose standard error is
      κ₂ · SE(tr HC) / ‖ḡ‖².

    ``key``, ``num_probes`` and ``probe_chunk`` are for ``"hutchinson"`` (unused by
    ``"exact"``).

    Raises:
      ValueError: on an unknown method, ``"hutchinson"`` without ``key`` and ``num_probes``,
        or a batch size outside [1, n].
    """
    if method not in GNI_METHODS:
        raise ValueError(f"method must be one of {GNI_METHODS}, got {method!r}")
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    b = minibatch.check_batch_size(batch_size, n)
    replace = minibatch.check_replace(replace)
    if method == "exact":
        moments = gradient_hessian_moments(objective, params, batch, chunk_size=chunk_size)
        e = batch_expectations(moments, batch_size=b, replace=replace)
        return _safe_ratio(e.grad_hessian_grad, moments.grad_norm_sq)
    kappa = minibatch.minibatch_noise_scale(n, b, replacement=replace)
    g = operators.gradient(objective, params, batch, chunk_size=chunk_size)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    cov = operators.gradient_covariance(
        objective, params, batch, chunk_size=chunk_size, mean_gradient=g
    )
    g_sq = _vdot(g, g)
    est = linalg.trace(
        lambda v: hvp(cov(v)),
        params,
        method="hutchinson",
        key=key,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
    )
    value = _safe_ratio(_vdot(g, hvp(g)) + kappa * est.value, g_sq)
    return Estimate(value, _safe_ratio(kappa * est.stderr, g_sq), est.num_probes)
