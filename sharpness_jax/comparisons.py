"""How two symmetric matrices relate, and how the SGD-noise covariance C relates to the
Hessian H: the relative commutator ‖AB − BA‖_F / ‖AB‖_F (dense, or estimated from matvecs),
its baseline under Haar-random rotations, and the alignment tr(AB) / (‖A‖_F ‖B‖_F).

C = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ (:mod:`sharpness_jax.noise`) and H = (1/n) Σ_p ∇²ℓ_p, as
means over the n examples of the batch; with ``subset`` the diagonal blocks C_SS, H_SS.

Studied in Zhang, Yang & Tu (2026), "SGD noise vs curvature": C and H nearly commute,
measured by ‖CH − HC‖_F / ‖CH‖_F against a Haar-random rotation of H.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, linalg, noise, operators, subsets
from sharpness_jax.noise import _flat, _matmul
from sharpness_jax.objective import Batch, Objective

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "Commutation",
    "RotationBaseline",
    "alignment",
    "haar_orthogonal",
    "noise_curvature_alignment",
    "noise_curvature_commutation",
    "noise_curvature_commutation_estimate",
    "relative_commutator",
    "relative_commutator_estimate",
    "rotation_baseline",
]


# --------------------------------------------------------------------------------- helpers


def _sq_norm(tree: PyTree) -> jax.Array:
    return sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------- commutation


class RotationBaseline(NamedTuple):
    """The relative commutator with B replaced by Q B Qᵀ, Q Haar-random orthogonal.

    Attributes:
      values: ``(R,)`` one value per rotation.
      stderr: ``(R,)`` their standard errors (0 when computed exactly).
      mean: mean over the R rotations.
      std: sample standard deviation over the rotations (ddof = 1; NaN for R = 1).
    """

    values: jax.Array
    stderr: jax.Array
    mean: jax.Array
    std: jax.Array


class Commutation(NamedTuple):
    """‖CH − HC‖_F / ‖CH‖_F and its random-rotation baseline.

    Attributes:
      relative: the relative commutator (an array when exact, an :class:`linalg.Estimate`
        when estimated).
      baseline: :class:`RotationBaseline`, the same with H → Q H Qᵀ.
    """

    relative: Any
    baseline: RotationBaseline


def _check_square(name: str, a: jax.Array) -> None:
    if jnp.ndim(a) != 2 or jnp.shape(a)[0] != jnp.shape(a)[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {jnp.shape(a)}")


def relative_commutator(a: jax.Array, b: jax.Array, *, symmetric: bool = False) -> jax.Array:
    """‖AB − BA‖_F / ‖AB‖_F for dense square matrices (0 iff A and B commute).

    Args:
      a, b: the matrices.
      symmetric: the caller guarantees A = Aᵀ and B = Bᵀ (covariances, Hessians), so that
        BA = (AB)ᵀ and one matrix product instead of two gives ‖AB − (AB)ᵀ‖_F (equal up to
        rounding).

    Raises:
      ValueError: if the matrices are not square of one size.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_square("a", a)
    _check_square("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}")
    ab = _matmul(a, b)
    ba = ab.T if symmetric else _matmul(b, a)
    return jnp.linalg.norm(ab - ba) / jnp.linalg.norm(ab)


def haar_orthogonal(key: jax.Array, size: int, *, dtype=None) -> jax.Array:
    """A Haar-distributed random orthogonal ``size × size`` matrix.

    QR of a standard Gaussian matrix G = QR, then Q·diag(sign(diag R)) (Mezzadri 2007), which
    makes the distribution exactly Haar (plain QR is not, since its sign convention depends on
    G).
    """
    checks.check_positive_int("size", size)
    g = jax.random.normal(key, (size, size), dtype or jnp.result_type(float))
    q, r = jnp.linalg.qr(g)
    signs = jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(q.dtype)
    return q * signs[None, :]


def _baseline_summary(values: jax.Array, stderr: jax.Array) -> RotationBaseline:
    num = values.shape[0]
    std = jnp.std(values, ddof=1) if num > 1 else jnp.full((), jnp.nan, values.dtype)
    return RotationBaseline(values, stderr, jnp.mean(values), std)


def rotation_baseline(
    a: jax.Array,
    b: jax.Array,
    *,
    key: jax.Array,
    num_rotations: int = 5,
    symmetric: bool = False,
) -> RotationBaseline:
    """‖AB' − B'A‖_F / ‖AB'‖_F for B' = Q B Qᵀ over ``num_rotations`` Haar rotations Q.

    B' has B's spectrum in a random eigenbasis, so this is the commutator to expect when the
    eigenbases of A and B are unrelated. ``symmetric`` as in :func:`relative_commutator` (B'
    is then symmetric too): three matrix products per rotation instead of four.
    """
    checks.check_positive_int("num_rotations", num_rotations)
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_square("b", b)

    def one(k):
        q = haar_orthogonal(k, b.shape[0], dtype=b.dtype)
        rotated = _matmul(_matmul(q, b), q.T)
        if symmetric:
            rotated = (rotated + rotated.T) / 2  # symmetric up to rounding before
        return relative_commutator(a, rotated, symmetric=symmetric)

    values = jax.lax.map(one, jax.random.split(key, num_rotations))
    return _baseline_summary(values, jnp.zeros_like(values))


def relative_commutator_estimate(
    a_matvec: MatVec,
    b_matvec: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
) -> linalg.Estimate:
    """Estimates ‖AB − BA‖_F / ‖AB‖_F from matvecs.

    With Rademacher probes z_j (E zzᵀ = I), α_j = ‖(AB − BA) z_j‖² and β_j = ‖AB z_j‖² are
    unbiased for ‖AB − BA‖_F² and ‖AB‖_F²; both use the same probes (4 matvecs per probe).
    The estimate is ρ̂ = √(ᾱ / β̄) (ratio estimator, bias O(1/m)); its standard error is the
    delta method: SE(ρ̂²)² = (s_α² − 2ρ̂² s_αβ + ρ̂⁴ s_β²) / (m β̄²) with sample (co)variances,
    and SE(ρ̂) = SE(ρ̂²) / (2ρ̂).

    Args:
      a_matvec, b_matvec: the operators.
      template: pytree of the vector space.
      key: PRNG key; num_probes: m (≥ 2 for a finite SE); probe_chunk: probes at a time.

    Returns:
      :class:`linalg.Estimate`.
    """
    checks.check_positive_int("num_probes", num_probes)
    checks.check_positive_int("probe_chunk", probe_chunk, optional=True)
    flat, unravel = ravel_pytree(template)

    def probe(k):
        z = unravel(jax.random.rademacher(k, flat.shape, flat.dtype))
        abz = a_matvec(b_matvec(z))
        baz = b_matvec(a_matvec(z))
        return _sq_norm(jax.tree_util.tree_map(jnp.subtract, abz, baz)), _sq_norm(abz)

    keys = jax.random.split(key, num_probes)
    alpha, beta = jax.lax.map(probe, keys, batch_size=min(probe_chunk or num_probes, num_probes))
    return _ratio_estimate(alpha, beta)


def _ratio_estimate(alpha: jax.Array, beta: jax.Array) -> linalg.Estimate:
    """√(mean α / mean β) with a delta-method standard error (see above)."""
    m = alpha.shape[0]
    a_bar, b_bar = jnp.mean(alpha), jnp.mean(beta)
    rho_sq = a_bar / b_bar
    rho = jnp.sqrt(rho_sq)
    if m < 2:
        return linalg.Estimate(rho, jnp.full_like(rho, jnp.inf), m)
    da, db = alpha - a_bar, beta - b_bar
    var_a = jnp.sum(da * da) / (m - 1)
    var_b = jnp.sum(db * db) / (m - 1)
    cov = jnp.sum(da * db) / (m - 1)
    var_ratio = (var_a - 2 * rho_sq * cov + rho_sq**2 * var_b) / (m * b_bar**2)
    se_sq = jnp.sqrt(jnp.maximum(var_ratio, 0))
    positive = rho > 0
    se = jnp.where(positive, se_sq / (2 * jnp.where(positive, rho, 1)), jnp.sqrt(se_sq))
    return linalg.Estimate(rho, se, m)


def _covariance_and_hessian(objective, params, batch, chunk_size, subset):
    c = operators.gradient_covariance(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    h = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    template = operators.prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)[1]
    return c, h, template


def noise_curvature_commutation(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_rotations: int = 5,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Commutation:
    """‖CH − HC‖_F / ‖CH‖_F exactly from dense C and H (small P), with the baseline for H
    replaced by Q H Qᵀ over ``num_rotations`` Haar rotations (:func:`rotation_baseline`).

    C is :func:`noise.gradient_covariance_dense`; H is :func:`linalg.dense` of the exact
    Hessian (``basis_chunk_size`` basis vectors at a time). Memory O(P²).
    """
    checks.check_positive_int("num_rotations", num_rotations)
    c = noise.gradient_covariance_dense(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    _, h_mv, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
    h = linalg.dense(h_mv, template, chunk_size=basis_chunk_size)
    return Commutation(
        relative_commutator(c, h),
        rotation_baseline(c, h, key=key, num_rotations=num_rotations),
    )


def noise_curvature_commutation_estimate(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_probes: int,
    num_rotations: int = 0,
    probe_chunk: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Commutation:
    """‖CH − HC‖_F / ‖CH‖_F estimated from exact C and H matvecs
    (:func:`relative_commutator_estimate`, ratio estimator with a delta-method SE).

    With ``num_rotations`` > 0 the baseline uses H' v = Q H Qᵀ v with a dense Haar Q
    (memory P², so only for moderate P), each with the same number of probes; otherwise the
    baseline arrays are empty.
    """
    if isinstance(num_rotations, bool) or not isinstance(num_rotations, int) or num_rotations < 0:
        raise ValueError(f"num_rotations must be a non-negative int, got {num_rotations!r}")
    c, h, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
    key, rot_key = jax.random.split(key)
    kwargs = dict(num_probes=num_probes, probe_chunk=probe_chunk)
    relative = relative_commutator_estimate(c, h, template, key=key, **kwargs)
    if num_rotations == 0:
        empty = jnp.zeros((0,), relative.value.dtype)
        nan = jnp.full((), jnp.nan, relative.value.dtype)
        return Commutation(relative, RotationBaseline(empty, empty, nan, nan))
    flat, unravel = ravel_pytree(template)

    def one(k):
        q_key, probe_key = jax.random.split(k)
        q = haar_orthogonal(q_key, flat.size, dtype=flat.dtype)

        def rotated(v):
            w = unravel(_matmul(q.T, _flat(v)))
            return unravel(_matmul(q, _flat(h(w))))

        est = relative_commutator_estimate(c, rotated, template, key=probe_key, **kwargs)
        return est.value, est.stderr

    values, stderr = jax.lax.map(one, jax.random.split(rot_key, num_rotations))
    return Commutation(relative, _baseline_summary(values, stderr))


# ------------------------------------------------------------------------------ alignment


def alignment(a: jax.Array, b: jax.Array) -> jax.Array:
    """tr(AB) / (‖A‖_F ‖B‖_F) for dense symmetric matrices (the cosine between them)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_square("a", a)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}")
    return jnp.sum(a * b.T) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def noise_curvature_alignment(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array | None = None,
    num_probes: int | None = None,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array | linalg.Estimate:
    """Noise–Hessian alignment tr(HC) / (‖H‖_F ‖C‖_F), without forming C or H.

    tr(HC) is :func:`noise.hessian_covariance_trace` (exact), ‖C‖_F² = ‖K‖_F² from the Gram
    matrix (exact). ‖H‖_F² is :func:`linalg.frobenius_squared_exact` (P Hessian-vector products,
    ``basis_chunk_size`` at a time) unless ``key`` and ``num_probes`` are given; then it is the
    stochastic :func:`linalg.frobenius_squared` and the result is an :class:`linalg.Estimate`
    with the delta-method SE  SE(a) = a · SE(‖H‖_F²) / (2‖H‖_F²).
    """
    if (key is None) != (num_probes is None):
        raise ValueError("give both key and num_probes (stochastic ‖H‖_F) or neither (exact)")
    trace_hc = noise.hessian_covariance_trace(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    c_fro = jnp.sqrt(
        noise.gradient_covariance_frobenius_squared(
            objective, params, batch, chunk_size=chunk_size, subset=subset
        )
    )
    _, h, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
    if key is None:
        h_sq = linalg.frobenius_squared_exact(h, template, chunk_size=basis_chunk_size)
        return trace_hc / (jnp.sqrt(h_sq) * c_fro)
    est = linalg.frobenius_squared(h, template, key=key, num_probes=num_probes)
    value = trace_hc / (jnp.sqrt(est.value) * c_fro)
    return linalg.Estimate(value, jnp.abs(value) * est.stderr / (2 * est.value), num_probes)
