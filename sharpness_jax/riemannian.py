"""Riemannian sharpness: the loss curvature H = ∇²L measured in the Fisher metric F.

Riemannian sharpness measures the loss curvature in the metric of the Fisher information F
instead of the Euclidean one (study 1, "standard form"):

    S_R = tr(F⁻¹H),        λ_max(F⁻¹H) = max{λ : H v = λ F v}.

Under a linear, function-preserving change of coordinates θ' = T θ (layer or unit rescaling
of a ReLU net, a permutation of hidden units, a gauge of a linear net; see
:mod:`sharpness_jax.symmetries`) both matrices transform by congruence, H' = T⁻ᵀ H T⁻¹ and
F' = T⁻ᵀ F T⁻¹, so tr(F⁻¹H) and the generalised eigenvalues do not change, while tr(H) and
λ_max(H) do.

* :func:`riemannian_sharpness_from_matrices` / :func:`riemannian_sharpness_dense`: dense
  generalised eigenproblem for small models, with damping and a pseudo-inverse option;
* :func:`whitened_hessian`, :func:`riemannian_trace`, :func:`riemannian_top_k`: matrix-free,
  for any metric given by its inverse square root F^{-1/2} (see
  ``fisher_metrics.diagonal_inverse_sqrt``, ``kfac.kfac_fisher_inverse_sqrt``), on the
  whitened operator F^{-1/2} H F^{-1/2};
* :func:`diagonal_riemannian_sharpness`: the estimator of the paper's experiments,
  Ŝ_R = Σ_i H_ii / (F_ii + ε) with the diagonal empirical Fisher, which is
  :func:`riemannian_trace` in the diagonal metric;
* :func:`kfac_riemannian_sharpness`: tr and λ_max of F_KFAC⁻¹ H, matrix-free;
* :func:`trace_estimate`: tr(A) exactly, by XTrace or by Hutchinson (``TRACE_ESTIMATORS``).

Every sharpness of one net at once: :mod:`sharpness_jax.net_sharpness`.

A singular Fisher. For a network with homogeneous hidden units the full F is ALWAYS
singular: the generator of every unit's rescaling lies in the kernel of every J_p. The
``pinv`` option restricts the problem to the range of F; the result is invariant under
reparametrisation when ker F ⊆ ker H, which holds at a critical point (H annihilates the
symmetry generators there) and for the softmax shift directions of cross-entropy. Damping
(F + εI) is the other option; it is not invariant. The diagonal and K-FAC metrics are
typically invertible away from critical points too (K-FAC with cross-entropy up to the
softmax shift, which ``pinv`` handles), and their undamped sharpness is exactly invariant
under unit rescaling and permutations. The damping used is always reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, fisher_metrics, hessian_forms, kfac, linalg, operators, subsets
from sharpness_jax.objective import Batch, Objective

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

# The estimators of :func:`trace_estimate`.
TRACE_ESTIMATORS = ("exact", "xtrace", "hutchinson")

__all__ = [
    "TRACE_ESTIMATORS",
    "DenseRiemannianSharpness",
    "DiagonalRiemannianSharpness",
    "KFACRiemannianSharpness",
    "diagonal_riemannian_sharpness",
    "kfac_riemannian_sharpness",
    "riemannian_sharpness_dense",
    "riemannian_sharpness_from_matrices",
    "riemannian_top_k",
    "riemannian_trace",
    "trace_estimate",
    "whitened_hessian",
]


def _template(params: PyTree, subset: subsets.Selector | None) -> PyTree:
    return params if subset is None else subsets.select(params, subset)


class DenseRiemannianSharpness(NamedTuple):
    """tr and spectrum of (F + εI)⁻¹ H from dense matrices.

    Attributes:
      trace: tr((F + εI)⁻¹ H), on the range of F + εI with ``pinv``.
      lambda_max: the top generalised eigenvalue of H v = λ (F + εI) v.
      eigenvalues: all generalised eigenvalues, descending; with ``pinv`` only the first
        ``rank`` are real and the rest are NaN.
      damping: ε used.
      rank: numerical rank of F + εI (eigenvalues > rcond · max); rank < P means F is
        singular and, without ``pinv`` or damping, the other fields are meaningless.
      condition_number: max/min eigenvalue of F + εI (over the kept ones with ``pinv``).
    """

    trace: jax.Array
    lambda_max: jax.Array
    eigenvalues: jax.Array
    damping: jax.Array
    rank: jax.Array
    condition_number: jax.Array


def riemannian_sharpness_from_matrices(
    hessian_matrix: jax.Array,
    fisher_matrix: jax.Array,
    *,
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
) -> DenseRiemannianSharpness:
    """Generalised eigenproblem H v = λ (F + εI) v from dense symmetric matrices.

    With F + εI = U diag(μ) Uᵀ, the whitened matrix M = W ᵀ H W, W = U diag(μ^{-1/2}), has the
    generalised eigenvalues as its eigenvalues and tr M = tr((F + εI)⁻¹ H).

    ``pinv`` restricts to the range of F + εI: eigenvalues μ ≤ rcond · max μ are dropped
    (W keeps only the other columns), so M is the r × r matrix Λ_r^{-1/2} U_rᵀ H U_r Λ_r^{-1/2}
    and tr M = tr((F + εI)⁺ H). This is invariant under function-preserving linear
    reparametrisations when ker F ⊆ ker H (e.g. at a critical point, where H annihilates the
    rescaling generators that span ker F for ReLU nets); otherwise it depends on the
    (Euclidean) choice of the complement of ker F.

    Args:
      hessian_matrix: ``(P, P)`` H.
      fisher_matrix: ``(P, P)`` F (positive semi-definite).
      damping: ε ≥ 0.
      pinv: restrict to the range of F + εI instead of inverting it.
      rcond: relative eigenvalue cutoff for ``rank`` and ``pinv`` (default P × machine eps).

    Returns:
      :class:`DenseRiemannianSharpness`.
    """
    h = jnp.asarray(hessian_matrix)
    f = jnp.asarray(fisher_matrix)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or f.shape != h.shape:
        raise ValueError(
            f"need two square matrices of the same shape, got H {h.shape} and F {f.shape}"
        )
    checks.check_nonnegative_scalar("damping", damping)
    size = h.shape[0]
    h = (h + h.T) / 2
    mu, u = jnp.linalg.eigh((f + f.T) / 2)
    mu = mu + damping
    cut = (size * jnp.finfo(mu.dtype).eps if rcond is None else rcond) * jnp.max(mu)
    above = mu > cut
    rank = jnp.sum(above, dtype=jnp.int32)
    keep = above if pinv else jnp.ones_like(above)
    w = u * jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, mu, 1)), 0)[None, :]
    m = w.T @ h @ w
    m = (m + m.T) / 2
    trace = jnp.trace(m)
    # Dropped directions are decoupled rows of zeros; push them below the spectrum.
    sentinel = 1 + 2 * size * jnp.max(jnp.abs(m))
    values = jnp.linalg.eigvalsh(m - jnp.diag(jnp.where(keep, 0, sentinel)))[::-1]
    if pinv:
        values = jnp.where(jnp.arange(size, dtype=jnp.int32) < rank, values, jnp.nan)
    kept_mu = jnp.where(keep, mu, jnp.nan)
    lo = jnp.nanmin(kept_mu)
    condition = jnp.where(lo > 0, jnp.nanmax(kept_mu) / jnp.where(lo > 0, lo, 1), jnp.inf)
    return DenseRiemannianSharpness(
        trace, values[0], values, jnp.asarray(damping, mu.dtype), rank, condition
    )


def riemannian_sharpness_dense(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    fisher: str = "true",
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    probe_chunk: int | None = None,
) -> DenseRiemannianSharpness:
    """tr((F + εI)⁻¹ H) and the generalised spectrum with dense H and F (small P only).

    H = ``operators.hessian`` and F = ``operators.fisher`` (``fisher="true"``, the exact true
    Fisher = GGN for CE/SE) or ``operators.empirical_fisher`` (``"empirical"``), materialised
    with P matvecs each; then :func:`riemannian_sharpness_from_matrices`. Networks with
    homogeneous hidden units have a singular F (check ``rank``): use ``pinv`` or damping.

    Args:
      fisher: ``"true"`` or ``"empirical"``.
      damping, pinv, rcond: see :func:`riemannian_sharpness_from_matrices`.
      chunk_size: examples per chunk.
      subset: restrict H and F to a parameter subset (their diagonal blocks).
      probe_chunk: basis vectors per batched matvec when materialising.
    """
    builders = {"true": operators.fisher, "empirical": operators.empirical_fisher}
    if fisher not in builders:
        raise ValueError(f"fisher must be one of {sorted(builders)}, got {fisher!r}")
    template = _template(params, subset)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    fvp = builders[fisher](objective, params, batch, chunk_size=chunk_size, subset=subset)
    h = linalg.dense(hvp, template, chunk_size=probe_chunk)
    f = linalg.dense(fvp, template, chunk_size=probe_chunk)
    return riemannian_sharpness_from_matrices(h, f, damping=damping, pinv=pinv, rcond=rcond)


def whitened_hessian(hvp: MatVec, inverse_sqrt: MatVec) -> MatVec:
    """v -> F^{-1/2} H F^{-1/2} v, the Hessian whitened by a metric's inverse square root.

    Its trace is tr(F⁻¹H) and its eigenvalues are the generalised eigenvalues of
    H v = λ F v (eigenvectors u ↦ v = F^{-1/2} u). With a diagonal metric,
    ``inverse_sqrt = fisher_metrics.diagonal_inverse_sqrt(D, damping=ε)``, it is
    v -> s ⊙ H(s ⊙ v) with s_i = (D_ii + ε)^{-1/2} (0 where D_ii + ε = 0).

    Args:
      hvp: v -> H v.
      inverse_sqrt: v -> F^{-1/2} v; it carries the damping.
    """
    return lambda v: inverse_sqrt(hvp(inverse_sqrt(v)))


def riemannian_trace(
    hvp: MatVec,
    inverse_sqrt: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array | None = None,
    num_probes: int | None = None,
    probe_chunk: int | None = None,
) -> linalg.Estimate:
    """tr(F⁻¹H) = tr(F^{-1/2} H F^{-1/2}) for a metric given by its inverse square root.

    Exact (P matvecs of the whitened operator, ``stderr`` 0, ``num_probes`` 0) when ``key``
    and ``num_probes`` are None; Hutchinson with Rademacher probes and a standard error
    otherwise.

    Args:
      hvp: v -> H v.
      inverse_sqrt: v -> F^{-1/2} v (e.g. ``fisher_metrics.diagonal_inverse_sqrt``,
        ``kfac.kfac_fisher_inverse_sqrt``); it carries the damping.
      template: pytree of the vector space.
      key, num_probes: both for the stochastic estimate, neither for the exact one.
      probe_chunk: probes / basis vectors per batched matvec.
    """
    whitened = whitened_hessian(hvp, inverse_sqrt)
    if (key is None) != (num_probes is None):
        raise ValueError("pass both key and num_probes (Hutchinson) or neither (exact)")
    return trace_estimate(
        whitened,
        template,
        estimator="exact" if key is None else "hutchinson",
        key=key,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
    )


def trace_estimate(
    matvec: MatVec, template: PyTree, /, *, estimator, key, num_probes, probe_chunk
) -> linalg.Estimate:
    """tr(A) exactly (P matvecs, ``probe_chunk`` basis vectors at a time), by XTrace or by
    Hutchinson, with a standard error: :func:`linalg.trace` with ``method=estimator``."""
    if estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {TRACE_ESTIMATORS}, got {estimator!r}")
    return linalg.trace(
        matvec,
        template,
        method=estimator,
        key=key,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
        basis_chunk=probe_chunk,
    )


def riemannian_top_k(
    hvp: MatVec,
    inverse_sqrt: MatVec,
    template: PyTree,
    /,
    *,
    k: int = 1,
    num_iters: int = 50,
    key: jax.Array | None = None,
    tol: float | None = None,
) -> linalg.Eigen:
    """Top-k generalised eigenpairs of H v = λ F v by Lanczos on F^{-1/2} H F^{-1/2}.

    Returns:
      :class:`linalg.Eigen`: ``values`` the generalised eigenvalues (descending),
      ``vectors`` the generalised eigenvectors v = F^{-1/2} u (F-orthonormal, vᵀ F v = 1, for
      unit Lanczos vectors u), ``residuals`` those of the whitened problem.
    """
    eig = linalg.lanczos_top_k(
        whitened_hessian(hvp, inverse_sqrt), template, k=k, num_iters=num_iters, key=key, tol=tol
    )
    return eig._replace(vectors=jax.vmap(inverse_sqrt)(eig.vectors))


class DiagonalRiemannianSharpness(NamedTuple):
    """Ŝ_R = Σ_i H_ii / (F_ii + ε) over the coordinates with F_ii + ε > 0.

    Attributes:
      value: Ŝ_R.
      stderr: standard error (0 when H's diagonal is exact).
      num_probes: Hutchinson probes (0 when exact).
      damping: ε used.
      num_excluded: coordinates with F_ii + ε = 0 (only possible with ε = 0; there H_ii is
        typically 0 too, e.g. the weights of a dead ReLU unit), left out of the sum.
    """

    value: jax.Array
    stderr: jax.Array
    num_probes: int
    damping: jax.Array
    num_excluded: jax.Array


def diagonal_riemannian_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float = 0.0,
    fisher: str = "empirical",
    key: jax.Array | None = None,
    num_probes: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    probe_chunk: int | None = None,
) -> DiagonalRiemannianSharpness:
    """Ŝ_R = Σ_i H_ii / (F_ii + ε), the diagonal Riemannian sharpness of the experiments.

    F is the diagonal empirical Fisher (1/n) Σ_p g_p² (``fisher="empirical"``, the paper's
    choice) or the true Fisher's diagonal (``"true"``). Exactly invariant under diagonal
    reparametrisations (layer / unit rescaling, and permutations) when ε = 0, not under dense
    ones. Coordinates with F_ii + ε = 0 are excluded and counted (``num_excluded``).

    It is :func:`riemannian_trace` in the diagonal metric D + εI
    (``fisher_metrics.diagonal_inverse_sqrt``): tr((D + εI)^{-1/2} H (D + εI)^{-1/2}) =
    Σ_i H_ii / (D_ii + ε), exactly (P HVPs) when ``key`` and ``num_probes`` are None, otherwise
    by Hutchinson with Rademacher probes z on the whitened operator (zᵀ s ⊙ H(s ⊙ z) with
    s = (D + εI)^{-1/2}), with its standard error. Each probe's (s ⊙ z)ᵀ H (s ⊙ z) is a
    forward-over-forward quadratic form (:mod:`sharpness_jax.hessian_forms`, about one
    gradient; the probes and the value are those of :func:`riemannian_trace` to rounding), and
    the empirical Fisher's diagonal takes the factored route of
    :func:`fisher_metrics.empirical_fisher_diagonal` on networks of Dense layers (about two
    gradients), so an estimate costs about 2 + m gradients.

    Args:
      damping: ε ≥ 0, always reported back.
      fisher: ``"empirical"`` or ``"true"``.
      key, num_probes: both for Hutchinson (large P), neither for the exact diagonal.
      chunk_size: examples per chunk.
      subset: restrict to a parameter subset.
      probe_chunk: basis vectors / probes per batched HVP.

    Returns:
      :class:`DiagonalRiemannianSharpness`.
    """
    builders = {
        "empirical": fisher_metrics.empirical_fisher_diagonal,
        "true": fisher_metrics.fisher_diagonal,
    }
    if fisher not in builders:
        raise ValueError(f"fisher must be one of {sorted(builders)}, got {fisher!r}")
    checks.check_nonnegative_scalar("damping", damping)
    if (key is None) != (num_probes is None):
        raise ValueError("pass both key and num_probes (Hutchinson) or neither (exact)")
    template = _template(params, subset)
    f_diag = builders[fisher](objective, params, batch, chunk_size=chunk_size, subset=subset)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    d = ravel_pytree(f_diag)[0] + damping
    num_excluded = jnp.sum(~(d > 0), dtype=jnp.int32)
    inverse_sqrt = fisher_metrics.diagonal_inverse_sqrt(f_diag, damping=damping)
    if key is None:
        est = riemannian_trace(hvp, inverse_sqrt, template, probe_chunk=probe_chunk)
    else:  # (s ⊙ z)ᵀ H (s ⊙ z) forward over forward: the probes of riemannian_trace
        form = hessian_forms.hessian_quadratic_form(
            objective, params, batch, chunk_size=chunk_size, subset=subset
        )
        est = linalg.quadratic_form_trace(
            lambda z: form(inverse_sqrt(z)),
            template,
            key=key,
            num_probes=num_probes,
            probe_chunk=probe_chunk,
        )
    return DiagonalRiemannianSharpness(
        est.value, est.stderr, est.num_probes, jnp.asarray(damping, d.dtype), num_excluded
    )


class KFACRiemannianSharpness(NamedTuple):
    """tr and λ_max of (F_KFAC + εI)⁻¹ H.

    Attributes:
      trace: tr((F_KFAC + εI)⁻¹ H) (on its range with ``pinv``).
      trace_stderr: standard error of ``trace`` (0 when exact).
      lambda_max: top generalised eigenvalue, by Lanczos.
      damping: ε used.
      num_probes: Hutchinson probes for the trace (0 when exact).
    """

    trace: jax.Array
    trace_stderr: jax.Array
    lambda_max: jax.Array
    damping: jax.Array
    num_probes: int


def kfac_riemannian_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
    num_iters: int = 50,
    tol: float | None = None,
    key: jax.Array | None = None,
    num_probes: int | None = None,
    chunk_size: int | None = None,
    probe_chunk: int | None = None,
) -> KFACRiemannianSharpness:
    """Riemannian sharpness in the K-FAC metric of a network of Dense layers, matrix-free.

    Whitened operator S = (F_KFAC + εI)^{-1/2} H (F_KFAC + εI)^{-1/2}; tr S by
    :func:`riemannian_trace` (exact unless ``num_probes`` is given) and λ_max by Lanczos.
    With ε = 0 it is exactly invariant under per-unit rescaling and permutations of hidden
    units, which act on each Kronecker factor by congruence (A_{l+1} → C A_{l+1} C,
    G_l → C⁻¹ G_l C⁻¹).

    Args:
      damping, pinv, rcond: see ``kfac.kfac_fisher_inverse``; the model as in
        ``kfac.kfac_factors``.
      num_iters, tol: Lanczos budget and early-stopping tolerance.
      key: PRNG key for Lanczos (and for the Hutchinson probes when ``num_probes`` is set).
      num_probes: Hutchinson probes for the trace (None: exact, P matvecs).
      chunk_size: examples per chunk.
      probe_chunk: basis vectors / probes per batched matvec.
    """
    factors = kfac.kfac_factors(objective, params, batch, chunk_size=chunk_size)
    inv_sqrt = kfac.kfac_fisher_inverse_sqrt(factors, damping=damping, pinv=pinv, rcond=rcond)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    key = jax.random.PRNGKey(0) if key is None else key
    lanczos_key, trace_key = jax.random.split(key)
    trace = riemannian_trace(
        hvp,
        inv_sqrt,
        params,
        key=None if num_probes is None else trace_key,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
    )
    eig = linalg.lanczos_top_k(
        whitened_hessian(hvp, inv_sqrt), params, k=1, num_iters=num_iters, key=lanczos_key, tol=tol
    )
    return KFACRiemannianSharpness(
        trace.value,
        trace.stderr,
        eig.values[0],
        jnp.asarray(damping, ravel_pytree(params)[0].dtype),
        trace.num_probes,
    )
