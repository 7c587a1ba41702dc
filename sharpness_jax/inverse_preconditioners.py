"""Preconditioners of the solves (A + λI) x = b of :mod:`sharpness_jax.inverse`.

A preconditioner applies M⁻¹ ≈ (A + λI)⁻¹. Every one here is a :class:`Preconditioner`: the
product v -> M⁻¹ v as an :class:`~sharpness_jax.linear_operator.Operator` (so a solve with it
compiles once) and ``lower`` = λ_min(M⁻¹), the least eigenvalue of M⁻¹, which
:func:`cg_scale` needs.

====================================  ===================================================
constructor                           M
====================================  ===================================================
:func:`diagonal_preconditioner`       diag(|d| + λ), d a diagonal of A (exact or estimated)
:func:`kfac_preconditioner`           per Dense layer A_l ⊗ G_l + λI (K-FAC of the true
                                      Fisher, Martens & Grosse 2015), diag(F) + λ elsewhere
:func:`curvature_preconditioner`      ``"diagonal"`` or ``"kfac"`` of an objective, by name
====================================  ===================================================

Why CG needs λ_min(M⁻¹) (:func:`cg_scale`). lineax 0.1.1's CG declares a breakdown, and
returns NaN, when pᵀ(A + λI)p ≤ 200 ε P · rᵀM⁻¹r (ε the dtype's machine epsilon, P the
size), i.e. when its step length α = rᵀM⁻¹r / pᵀ(A + λI)p exceeds 1/(200 ε P). That test is
not invariant to the scale of the system: in float32 it fires as soon as α > 4.2·10⁴/P,
which for the true Fisher of a tanh MLP with P = 6154 damped by λ = 10⁻² happened within
the first 20 steps, while GMRES on the same system converged. It is no loss of
definiteness: for A ⪰ 0 the step lengths of (preconditioned) CG are bounded,
α ≤ 1/λ_min(M⁻¹(A + λI)) ≤ 1/(λ · λ_min(M⁻¹)). Scaling M⁻¹ by c leaves every iterate x_k
unchanged (z, p and γ scale by c, α by 1/c), so with c = 10 · 200 ε P / (λ · λ_min(M⁻¹))
the test fires only where the computed curvature pᵀ(A + λI)p fell below a tenth of its
exact lower bound: where rounding has destroyed the positive definiteness of A + λI (then
raise λ above ε‖A‖ or solve in float64). The bound assumes A ⪰ 0 (a Fisher, GGN, C); for a
Hessian damped past its most negative eigenvalue it is λ + λ_min(H), and the scale may fall
short. A plain callable preconditioner has no known λ_min(M⁻¹) and is used unscaled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sharpness_jax import checks, dense_factors, fisher_metrics, kfac, operators, subsets
from sharpness_jax.linalg.estimators import Estimate
from sharpness_jax.linear_operator import Operator, operator
from sharpness_jax.objective import Batch, Objective

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

#: The preconditioners an objective's solve selects by name.
PRECONDITIONERS = ("diagonal", "kfac")
#: The damping of the Kronecker blocks of :func:`kfac_preconditioner`.
KFAC_DAMPINGS = ("kronecker", "factored")

__all__ = [
    "KFAC_DAMPINGS",
    "PRECONDITIONERS",
    "Preconditioner",
    "as_preconditioner",
    "cg_scale",
    "curvature_preconditioner",
    "diagonal_preconditioner",
    "kfac_preconditioner",
]


class Preconditioner(NamedTuple):
    """v -> M⁻¹ v, M⁻¹ symmetric positive definite, and its least eigenvalue.

    Attributes:
      apply: the product v -> M⁻¹ v (an Operator: its arrays are leaves).
      lower: λ_min(M⁻¹) (a scalar array).
    """

    apply: Operator
    lower: jax.Array

    def __call__(self, v: PyTree) -> PyTree:
        return self.apply(v)


def _inverse_diagonal(diagonal, damping, v):
    def scale(d, x):
        denom = jnp.abs(d) + damping
        return x / jnp.where(denom > 0, denom, 1)

    return jax.tree_util.tree_map(scale, diagonal, v)


def diagonal_preconditioner(diagonal: PyTree | Estimate, *, damping: float) -> Preconditioner:
    """M⁻¹ = diag(1 / (|d| + λ)) (1 where |d| + λ = 0), d a pytree like the vectors (an
    :class:`Estimate` is taken by its value)."""
    if isinstance(diagonal, Estimate):
        diagonal = diagonal.value
    leaves = jax.tree_util.tree_leaves(diagonal)
    largest = jnp.max(jnp.stack([jnp.max(jnp.abs(d)) for d in leaves]))
    denom = largest + damping
    lower = 1 / jnp.where(denom > 0, denom, 1)
    return Preconditioner(operator(_inverse_diagonal, diagonal, damping), lower)


def as_preconditioner(preconditioner: Any, damping: jax.Array) -> Preconditioner | None:
    """The :class:`Preconditioner` of a solve: as given; a diagonal (pytree or Estimate)
    through :func:`diagonal_preconditioner`; a plain callable v -> M⁻¹ v with ``lower`` NaN
    (unknown: :func:`cg_scale` then leaves it as it is)."""
    if preconditioner is None or isinstance(preconditioner, Preconditioner):
        return preconditioner
    if callable(preconditioner):
        return Preconditioner(preconditioner, jnp.full((), jnp.nan, jnp.result_type(damping)))
    return diagonal_preconditioner(preconditioner, damping=damping)


def cg_scale(
    preconditioner: Preconditioner | None, damping: jax.Array, size: int, dtype
) -> jax.Array:
    """c = max(1, 10 · 200 ε P / (λ · λ_min(M⁻¹))): the factor on M⁻¹ (or on I) that keeps
    lineax's CG breakdown test from firing on a positive definite system (module
    docstring); 1 where λ = 0 or λ_min(M⁻¹) is unknown."""
    lower = jnp.ones((), dtype) if preconditioner is None else preconditioner.lower
    bound = damping * lower
    ok = jnp.isfinite(bound) & (bound > 0)
    need = 2000 * jnp.finfo(dtype).eps * size / jnp.where(ok, bound, 1)
    return jnp.where(ok, jnp.maximum(need, 1), 1).astype(dtype)


def _covered_paths(objective: Objective, params: PyTree, inputs: PyTree) -> list[str]:
    """Leaf paths of the Dense layers K-FAC can cover: a free kernel named ``…/kernel`` (and
    its bias, ``…/bias``, if free) of a call on one vector per example, used by no other
    call."""
    x0 = jax.tree_util.tree_map(lambda a: a[0], inputs)
    layout = dense_factors.dense_layout(objective, params, x0)
    paths = subsets.leaf_paths(params)
    used = [k for c in layout.calls for k in (c.kernel, c.bias) if k is not None]
    covered = []
    for call in layout.calls:
        if call.kernel is None or call.positions != 1:
            continue
        name = paths[call.kernel].rpartition("/")[0]
        own = [call.kernel] + ([] if call.bias is None else [call.bias])
        named = paths[call.kernel] == f"{name}/kernel" and (
            call.bias is None or paths[call.bias] == f"{name}/bias"
        )
        if named and all(used.count(k) == 1 for k in own):
            covered.extend(paths[k] for k in own)
    return covered


def _block_scales(factor: kfac.KFACFactor, damping, style: str):
    """(U_A, U_G, S) with (block of M)⁻¹ vec(V) = vec(U_A ((U_Aᵀ V U_G) ⊙ S) U_Gᵀ)."""
    la, ua = jnp.linalg.eigh(factor.A)
    lg, ug = jnp.linalg.eigh(factor.G)
    la, lg = jnp.maximum(la, 0), jnp.maximum(lg, 0)
    if style == "kronecker":
        mu = la[:, None] * lg[None, :] + damping
    else:  # (A + π√λ I) ⊗ (G + √λ/π I), π² = (tr A / d_A) / (tr G / d_G)
        mean_a, mean_g = jnp.mean(la), jnp.mean(lg)
        ok = (mean_a > 0) & (mean_g > 0)
        pi = jnp.where(ok, jnp.sqrt(mean_a / jnp.where(ok, mean_g, 1)), 1)
        root = jnp.sqrt(damping)
        mu = (la + pi * root)[:, None] * (lg + root / pi)[None, :]
    return ua, ug, 1 / mu


def _kfac_product(blocks, diagonal, damping, v, *, layers, uncovered):
    """v -> M⁻¹ v: per layer (kernel index, bias index or -1) the Kronecker block, elsewhere
    v / (d + λ)."""
    leaves, treedef = jax.tree_util.tree_flatten(v)
    out = list(leaves)
    for (k, b), (ua, ug, scale) in zip(layers, blocks, strict=True):
        vbar = leaves[k] if b < 0 else jnp.concatenate([leaves[k], leaves[b][None, :]])
        r = ua @ ((ua.T @ vbar @ ug) * scale) @ ug.T
        out[k] = r[: leaves[k].shape[0]]
        if b >= 0:
            out[b] = r[leaves[k].shape[0]]
    for i, d in zip(uncovered, diagonal, strict=True):
        out[i] = leaves[i] / (d + damping)
    return jax.tree_util.tree_unflatten(treedef, out)


def kfac_preconditioner(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float,
    kfac_damping: str = "kronecker",
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Preconditioner:
    """M = blockdiag(A_l ⊗ G_l + λI over the Dense layers l, diag(F) + λI elsewhere).

    A_l, G_l are the exact K-FAC factors of the true Fisher (:func:`kfac.kfac_factors`:
    A_l = (1/n) Σ_p ā_p ā_pᵀ of the layer inputs, G_l = (1/n) Σ_p Σ_k δ_pk δ_pkᵀ of the
    output-gradients under the predictive distribution). ``kfac_damping`` chooses the damped
    block: ``"kronecker"``: A_l ⊗ G_l + λI inverted exactly in the eigenbases of A_l and G_l,
    (U_A ⊗ U_G) diag(1/(a_i g_j + λ)) (U_A ⊗ U_G)ᵀ (as :func:`kfac.kfac_fisher_inverse`);
    ``"factored"``: (A_l + π_l √λ I) ⊗ (G_l + √λ/π_l I) with π_l² = (tr A_l/d_A)/(tr G_l/d_G),
    the factored Tikhonov damping of Martens & Grosse (2015, §6.3). A Dense layer is covered
    when it acts on one vector per example and its kernel is free; every other free leaf
    (convolutions, embeddings, Dense layers over sequences) gets the exact true-Fisher
    diagonal, diag(F)_i + λ (:func:`fisher_metrics.fisher_diagonal`). M is symmetric positive
    definite for λ > 0, and equals F + λI where F is block diagonal with exactly Kronecker
    blocks.

    Args:
      objective, params, batch: the model (its loss must give ``output_fisher_factor``).
      damping: λ > 0, the damping of the solve it preconditions.
      kfac_damping: one of ``KFAC_DAMPINGS``.
      chunk_size: examples per chunk of the factors' sums.
      subset: the solve's parameter subset (vectors like ``subsets.select(params, subset)``).

    Raises:
      ValueError: on λ ≤ 0, an unknown ``kfac_damping``, or a model with no Dense layer K-FAC
        can cover (use ``"diagonal"``).
    """
    checks.check_positive_scalar("damping", damping)
    if kfac_damping not in KFAC_DAMPINGS:
        raise ValueError(f"kfac_damping must be one of {KFAC_DAMPINGS}, got {kfac_damping!r}")
    objective, params, _ = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    covered = _covered_paths(objective, params, batch[0])
    if not covered:
        raise ValueError(
            "the K-FAC preconditioner covers flax Dense layers acting on one vector per "
            "example, and this model has none among its free parameters; use "
            "preconditioner='diagonal'"
        )
    paths = subsets.leaf_paths(params)
    leaf = jax.tree_util.tree_leaves(params)[0]
    lam = jnp.asarray(damping, jnp.result_type(leaf))
    kobj, kparams = subsets.restrict(objective, params, covered)
    factors = kfac.kfac_factors(kobj, kparams, batch, chunk_size=chunk_size)
    layers, blocks = [], []
    for name, factor in factors.items():
        bias = f"{name}/bias"
        layers.append((paths.index(f"{name}/kernel"), paths.index(bias) if bias in kparams else -1))
        blocks.append(_block_scales(factor, lam, kfac_damping))
    rest = [p for p in paths if p not in covered]
    diagonal = []
    if rest:
        diag = fisher_metrics.fisher_diagonal(
            objective, params, batch, chunk_size=chunk_size, subset=rest
        )
        diagonal = [diag[p] for p in rest]
    lows = [jnp.min(s) for _, _, s in blocks] + [1 / (jnp.max(d) + lam) for d in diagonal]
    apply = operator(
        _kfac_product,
        tuple(blocks),
        tuple(diagonal),
        lam,
        layers=tuple(layers),
        uncovered=tuple(paths.index(p) for p in rest),
    )
    return Preconditioner(apply, jnp.min(jnp.stack(lows)))


def curvature_preconditioner(
    name: str,
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float,
    fisher: str = "true",
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Preconditioner:
    """A preconditioner of a solve with a curvature of ``objective``, by name.

    ``"diagonal"``: diag(|d| + λ) with d the exact diagonal of the true Fisher
    (``fisher="true"``, :func:`fisher_metrics.fisher_diagonal`) or of the empirical Fisher
    (``"empirical"``, :func:`fisher_metrics.empirical_fisher_diagonal`); ``"kfac"``:
    :func:`kfac_preconditioner` (K-FAC of the true Fisher, for either). For a Hessian solve
    (influence) both approximate H by the true Fisher (the Gauss–Newton part of H for
    softmax cross-entropy and squared error).
    """
    if name not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {name!r}")
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    kw = dict(chunk_size=chunk_size, subset=subset)
    if name == "kfac":
        return kfac_preconditioner(objective, params, batch, damping=damping, **kw)
    diag_fn = {
        "true": fisher_metrics.fisher_diagonal,
        "empirical": fisher_metrics.empirical_fisher_diagonal,
    }[fisher]
    diag = diag_fn(objective, params, batch, **kw)
    leaf = jax.tree_util.tree_leaves(diag)[0]
    return diagonal_preconditioner(diag, damping=jnp.asarray(damping, jnp.result_type(leaf)))
