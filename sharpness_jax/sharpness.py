"""Sharpness: λ_max(H), tr(H), batch sharpness, E_B[λ_max(H_B)] and edge-of-stability ratios.

Notation (means over the n examples of ``batch``, as everywhere in this library):
L(θ) = (1/n) Σ_p ℓ_p(θ), ḡ = ∇L, H = ∇²L, g_p = ∇ℓ_p, h_p = ∇²ℓ_p.
A mini-batch B of size b is a multiset of b indices; its loss is the MEAN
L_B = (1/b) Σ_{p∈B} ℓ_p, with gradient g_B and Hessian H_B. Batches are drawn as a training
sampler draws them (``replace``), in one of the ways ``sampling`` names ("independent",
"partition" groups of disjoint batches, or "auto"): see :mod:`sharpness_jax.minibatch`.

==========================================  ==================================================
function                                    quantity
==========================================  ==================================================
hessian_top_k                               top-k eigenpairs of H (λ_max = values[0]); Lanczos
                                            with a tolerance and warm start
hessian_trace_exact                         tr(H) exactly (P Hessian-vector products)
hessian_trace_hutchinson / _xtrace          tr(H) stochastic, with a standard error
gradient_rayleigh_quotient                  ḡᵀHḡ / ‖ḡ‖²
batch_sharpness                             E_B[g_Bᵀ H_B g_B / ‖g_B‖²]  (Monte-Carlo)
expected_batch_lambda_max                   E_B[λ_max(H_B)]  (Monte-Carlo)
stability_threshold / stability_ratios      2/η (and its momentum variants), q / (2/η)
==========================================  ==================================================

The exact mini-batch expectations (E_B[g_BᵀH_Bg_B] / E_B[‖g_B‖²], GNI) are in
:mod:`sharpness_jax.batch_moments`.

Batch sharpness (Andreyev & Beneventano 2024, Definition 3) is the expectation of the ratio;
under SGD it settles at 2/η while λ_max(H) stays below it. For the full batch (b = n without
replacement) it is ḡᵀHḡ/‖ḡ‖² ≤ λ_max(H).

Cost is counted in gradient-equivalents: a Hessian-vector product (forward-over-reverse)
costs about 2–2.5 gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpness_jax import hessian_forms, linalg, minibatch, operators, subsets
from sharpness_jax.batch_moments import _safe_ratio
from sharpness_jax.linalg import Eigen, Estimate
from sharpness_jax.minibatch import BatchEstimate
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "DEFAULT_LANCZOS_ITERS",
    "DEFAULT_LANCZOS_TOL",
    "batch_sharpness",
    "expected_batch_lambda_max",
    "gradient_rayleigh_quotient",
    "hessian_top_k",
    "hessian_trace_exact",
    "hessian_trace_hutchinson",
    "hessian_trace_xtrace",
    "stability_ratios",
    "stability_threshold",
]


#: Lanczos stops once every wanted Ritz pair has residual ‖Hu − θu‖ ≤ tol·|θ|. The eigenvalue
#: error is then about tol²·θ²/gap: a relative error ≤ 1e-3 whenever the relative gap
#: (λ_1 − λ_2)/λ_1 exceeds 1%, and never more than about tol itself.
DEFAULT_LANCZOS_TOL = 3e-3

#: Maximum Krylov dimension (memory O(num_iters · P)).
DEFAULT_LANCZOS_ITERS = 64


# ------------------------------------------------------------------------------ checks


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be >= {low}{upper}, got {value}")
    return int(value)


def _check_stopping(
    rel_stderr: Any, min_draws: Any, max_draws: Any, draws_per_step: Any
) -> tuple[float, int, int, int]:
    if isinstance(rel_stderr, bool) or not isinstance(rel_stderr, int | float | np.floating):
        raise ValueError(f"rel_stderr must be a number in (0, 1), got {rel_stderr!r}")
    if not 0.0 < float(rel_stderr) < 1.0:
        raise ValueError(f"rel_stderr must lie in (0, 1), got {rel_stderr}")
    min_draws = _check_int("min_draws", min_draws, low=2)
    max_draws = _check_int("max_draws", max_draws, low=min_draws)
    draws_per_step = _check_int("draws_per_step", draws_per_step, low=1)
    return float(rel_stderr), min_draws, max_draws, draws_per_step


def _check_scheme(sampling: Any) -> str:
    if not (isinstance(sampling, str) and sampling in minibatch.SAMPLINGS):
        raise ValueError(f"sampling must be one of {minibatch.SAMPLINGS}, got {sampling!r}")
    return sampling


def _check_tol(tol: Any) -> float | None:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, int | float | np.floating):
        raise ValueError(f"tol must be a positive number or None, got {tol!r}")
    if not 0.0 < float(tol) < 1.0:
        raise ValueError(f"tol must lie in (0, 1), got {tol}")
    return float(tol)


def _concrete(x: Any) -> float | None:
    """float(x) when x is a concrete number, None when it is a tracer."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    except TypeError as err:
        raise ValueError(f"expected a real number, got {x!r}") from err


def _checked_law(
    batch_size, n, replace, sampling, rel_stderr, min_draws, max_draws, draws_per_step
) -> dict[str, Any]:
    """The validated batch law and stopping rule, as keywords of :func:`minibatch.monte_carlo`."""
    b = minibatch.check_batch_size(batch_size, n)
    replace = minibatch.check_replace(replace)
    sampling = _check_scheme(sampling)
    rel_stderr, min_draws, max_draws, draws_per_step = _check_stopping(
        rel_stderr, min_draws, max_draws, draws_per_step
    )
    return dict(
        n=n,
        b=b,
        replace=replace,
        sampling=sampling,
        rel_stderr=rel_stderr,
        min_draws=min_draws,
        max_draws=max_draws,
        draws_per_step=draws_per_step,
    )


# ----------------------------------------------------------------------------- helpers


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return optax.tree.vdot(a, b)


def _restricted(objective, params, batch, chunk_size, subset):
    """(objective, params, batch, n) after validation and the subset restriction."""
    if not isinstance(batch, Batch) and isinstance(batch, tuple) and len(batch) == 2:
        batch = Batch(*batch)
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    return objective, params, batch, n


def _restricted_hessian(objective, params, batch, chunk_size, subset):
    """``(matvec, params)``: the Hessian operator of the (restricted) objective and its params."""
    objective, params, batch, _ = _restricted(objective, params, batch, chunk_size, subset)
    return operators.hessian(objective, params, batch, chunk_size=chunk_size), params


def _gather(batch: PyTree, idx: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), batch)


def _float_dtype(params: PyTree):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


# ------------------------------------------------------------------ λ_max and the trace


def hessian_top_k(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    k: int = 1,
    num_iters: int = DEFAULT_LANCZOS_ITERS,
    tol: float | None = DEFAULT_LANCZOS_TOL,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Eigen:
    """Top-k eigenpairs of the full-batch Hessian H = (1/n) Σ_p ∇²ℓ_p; λ_max = ``values[0]``.

    Lanczos with partial reorthogonalisation (:func:`sharpness_jax.linalg.lanczos_top_k`) on
    exact Hessian-vector products. It stops when every one of the top k Ritz pairs (θ, u) has
    residual ‖Hu − θu‖ ≤ tol·|θ|; the eigenvalue error is then about ‖r‖²/gap
    (≤ tol²·θ²/(λ_1 − λ_2) for k = 1) and at most about ‖r‖. The default ``tol = 3e-3``
    gives a relative error ≤ 1e-3 when the relative gap (λ_1 − λ_2)/λ_1 exceeds 1%.

    For tracking during training pass the previous call's ``vectors`` as ``init``: when the
    Hessian has moved little, a few matvecs suffice. A warm start trusts the previous
    eigenvector; if the top eigenvalues cross, it may lock onto the formerly-top one, so use
    k ≥ 2 or a cold start now and then. Each matvec costs about 2–2.5 gradients;
    ``num_matvecs`` reports the count. Tracking at ``tol = 1e-2`` saves about a third of the
    matvecs; its relative error bound tol²·λ_1/(λ_1 − λ_2) is below 1e-3 where a cold run
    with k = 2 shows a relative gap (λ_1 − λ_2)/λ_1 above 10% (on the MLP of the benchmark,
    gap 8.6%: 7 matvecs instead of 10 after an SGD step, relative error 2.3e-4).

    Args:
      objective, params, batch: the mean loss and where to take its Hessian.
      k: number of eigenpairs.
      num_iters: maximum Krylov dimension (memory O(num_iters · P)).
      tol: relative residual tolerance (``None``: run all ``num_iters`` iterations).
      key: PRNG key for the start vector (default ``PRNGKey(0)``).
      init: warm start: one vector or k stacked vectors shaped like ``params`` (or like the
        subset's ``{path: leaf}`` dict when ``subset`` is set), e.g. a previous result's
        ``vectors``.
      chunk_size: examples per chunk in each Hessian-vector product.
      subset: restrict to these parameter leaves (the diagonal block of H).

    Returns:
      :class:`~sharpness_jax.linalg.Eigen`: values (descending), vectors, residual bounds and
      the number of Hessian-vector products.
    """
    tol = _check_tol(tol)
    matvec, params = _restricted_hessian(objective, params, batch, chunk_size, subset)
    return linalg.lanczos_top_k(
        matvec, params, k=k, num_iters=num_iters, key=key, init=init, tol=tol
    )


def hessian_trace_exact(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    basis_chunk: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """tr(H) = Σ_i e_iᵀ H e_i exactly, by P Hessian-vector products (for small P).

    Args:
      chunk_size: examples per chunk in each product.
      basis_chunk: basis vectors multiplied together (``None``: all P at once; memory grows
        with ``basis_chunk`` × ``chunk_size``).
      subset: restrict to these parameter leaves (the trace of that diagonal block).
    """
    matvec, params = _restricted_hessian(objective, params, batch, chunk_size, subset)
    return linalg.trace(matvec, params, method="exact", basis_chunk=basis_chunk).value


def hessian_trace_hutchinson(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Estimate:
    """tr(H) ≈ (1/m) Σ_j z_jᵀ H z_j with m Rademacher probes; returns value ± standard error.

    Each z_jᵀ H z_j is a forward-over-forward second directional derivative
    (:func:`sharpness_jax.hessian_forms.hessian_quadratic_form`, about one gradient instead of
    the two of a Hessian-vector product); the probes are those of
    ``linalg.hutchinson_trace(hessian, ...)`` with the same key, and so is the value (to
    rounding).

    Args:
      key: PRNG key of the probes.
      num_probes: m.
      probe_chunk: probes evaluated together under one ``vmap`` sharing the primal pass
        (default all).
      chunk_size: examples per chunk in each product.
      subset: restrict to these parameter leaves.
    """
    form = hessian_forms.hessian_quadratic_form(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    template = _restricted(objective, params, batch, chunk_size, subset)[1]
    return linalg.quadratic_form_trace(
        form, template, key=key, num_probes=num_probes, probe_chunk=probe_chunk
    )


def hessian_trace_xtrace(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_probes: int,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Estimate:
    """tr(H) by XTrace (low-rank capture of the top spectrum + leave-one-out Hutchinson).

    Far lower variance than Hutchinson when the spectrum decays, as Hessians' do. Memory
    O(num_probes · P); the standard error is that of the leave-one-out estimates.
    """
    matvec, params = _restricted_hessian(objective, params, batch, chunk_size, subset)
    return linalg.trace(matvec, params, method="xtrace", key=key, num_probes=num_probes)


def gradient_rayleigh_quotient(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """ḡᵀ H ḡ / ‖ḡ‖²: the curvature along the full-batch gradient (≤ λ_max(H)).

    The full-batch (b = n, without replacement) batch sharpness. NaN when ḡ = 0.
    """
    objective, params, batch, _ = _restricted(objective, params, batch, chunk_size, subset)
    g = operators.gradient(objective, params, batch, chunk_size=chunk_size)
    hg = operators.hessian(objective, params, batch, chunk_size=chunk_size)(g)
    return _safe_ratio(_vdot(g, hg), _vdot(g, g))


# --------------------------------------------------------------- batch sharpness (MC)


def batch_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    batch_size: int,
    key: jax.Array,
    replace: bool = False,
    sampling: str = "auto",
    rel_stderr: float = 0.005,
    min_draws: int = 20,
    max_draws: int = 1000,
    draws_per_step: int = 20,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> BatchEstimate:
    """Batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²] by Monte-Carlo over random batches.

    Andreyev & Beneventano (2024), Definition 3: the expectation of the ratio. g_B and H_B are
    the gradient and Hessian of the batch MEAN loss L_B = (1/b) Σ_{p∈B} ℓ_p. Batches of size
    ``batch_size`` are drawn as the training sampler draws them (``replace``; default a uniform
    b-subset, the law of each batch of a shuffled epoch), in the way ``sampling`` says
    (:mod:`sharpness_jax.minibatch`); each batch has that law either way.

    * ``"auto"`` (default): ``"partition"`` with whole groups (k = n // b ≥ 2) when
      ``max_draws`` ≥ 10 k, ``"independent"`` otherwise.
    * ``"partition"``: in i.i.d. groups of k = min(n // b, max_draws // 10) batches
      (at least one), the consecutive blocks of b entries of one uniformly random permutation
      of the n examples (with ``replace``, each block turned into b i.i.d. indices that reuse
      only its own entries). The estimate is the mean of the group means and its standard
      error their spread / sqrt(number of groups); the part of the ratio that adds up over
      examples cancels within a group. Whole groups run, at least ceil(``min_draws`` / k) and
      min(10, ``min_draws``), so ``num_draws`` is a multiple of k (:func:`minibatch.design`).
    * ``"independent"``: every batch on its own key; the estimate is the mean over the draws,
      between ``min_draws`` and ``max_draws`` of them.

    Each draw gathers its batch, computes g_B (one gradient) and then
    g_Bᵀ H_B g_B = d²/dt² L_B(θ + t g_B) at t = 0 by forward-over-forward differentiation
    (``jax.jvp`` of ``jax.jvp``; on an MLP on MNIST a draw cost about 0.55 times a gradient
    plus a Hessian-vector product); with ``chunk_size`` < b, by a chunked gradient and a
    chunked Hessian-vector product instead. A batch with g_B = 0 contributes 0 (its SGD step
    is zero). Each ``lax.while_loop`` step evaluates max(1, ``draws_per_step`` // k) groups,
    ``draws_per_step`` batches at a time (vmapped); the loop stops after the first step at
    which the minimum is reached and the standard error is ≤ ``rel_stderr`` · |mean|, or at
    the maximum. The batches depend only on ``key`` and their index (draw d, or batch j of
    group g) and, for ``"partition"``, on k: the same key gives the same batches whatever
    ``draws_per_step``, ``chunk_size`` or device layout, and the same batches as
    :func:`expected_batch_lambda_max` with the same ``replace``, ``sampling`` and k. Jittable
    (``batch_size`` and the options are static).

    Memory: ``draws_per_step`` × min(b, ``chunk_size``) examples' activations at a time.

    Args:
      objective, params, batch: the training objective and the n training examples.
      batch_size: b, 1 ≤ b ≤ n.
      key: PRNG key of the batch draws.
      replace: sample with replacement (b i.i.d. indices) instead of a uniform b-subset.
      sampling: ``"auto"``, ``"partition"`` (groups of disjoint batches) or
        ``"independent"``.
      rel_stderr: target relative standard error, in (0, 1) (default 0.5%).
      min_draws: batches before the target may stop the loop (≥ 2; whole groups, see above).
      max_draws: at most this many batches.
      draws_per_step: batches evaluated together (vmapped).
      chunk_size: examples per chunk within one batch.
      subset: restrict H_B and g_B to these parameter leaves.

    Returns:
      :class:`BatchEstimate` (value, stderr, num_draws).

    Raises:
      ValueError: on a batch size outside [1, n] or bad sampling options.
    """
    objective, params, batch, n = _restricted(objective, params, batch, chunk_size, subset)
    law = _checked_law(
        batch_size, n, replace, sampling, rel_stderr, min_draws, max_draws, draws_per_step
    )
    chunked = chunk_size is not None and chunk_size < law["b"]
    draw = _sharpness_draw(objective, params, batch, chunk_size, chunked)
    return minibatch.monte_carlo(draw, key, _float_dtype(params), **law)


def _sharpness_draw(objective, params, batch, chunk_size, chunked):
    """``draw(idx, aux_key)``: g_Bᵀ H_B g_B / ‖g_B‖² of the batch ``idx`` (0 where g_B = 0)."""

    def batch_loss(p, sub):
        return jnp.mean(objective.batch_losses(p, sub))

    def draw(idx, aux_key):
        del aux_key
        sub = _gather(batch, idx)
        if chunked:
            g = operators.gradient(objective, params, sub, chunk_size=chunk_size)
            hg = operators.hessian(objective, params, sub, chunk_size=chunk_size)(g)
            ghg = _vdot(g, hg)
        else:
            g = jax.grad(batch_loss)(params, sub)

            def slope(p):
                return jax.jvp(lambda q: batch_loss(q, sub), (p,), (g,))[1]

            ghg = jax.jvp(slope, (params,), (g,))[1]
        g2 = _vdot(g, g)
        ok = g2 > 0
        return jnp.where(ok, ghg / jnp.where(ok, g2, 1), 0)

    return draw


def expected_batch_lambda_max(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    batch_size: int,
    key: jax.Array,
    replace: bool = False,
    sampling: str = "independent",
    rel_stderr: float = 0.005,
    min_draws: int = 20,
    max_draws: int = 1000,
    draws_per_step: int = 4,
    num_iters: int = DEFAULT_LANCZOS_ITERS,
    tol: float | None = DEFAULT_LANCZOS_TOL,
    init: PyTree | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> BatchEstimate:
    """E_B[λ_max(H_B)] by Monte-Carlo over random batches, H_B = (1/b) Σ_{p∈B} ∇²ℓ_p.

    Batches are drawn exactly as in :func:`batch_sharpness` (the same key, ``replace``,
    ``sampling`` and group size give the same batches), but by default independently:
    ``sampling="partition"`` runs at least min(10, ``min_draws``) groups of up to n // b
    batches, a floor that is costly at one Lanczos run per batch. Each draw runs Lanczos
    (:func:`hessian_top_k` settings ``num_iters``, ``tol``; optional warm start ``init``, e.g.
    the full-batch top eigenvector, shared by all draws) on H_B; the loop stops as in
    :func:`batch_sharpness`. Memory: ``draws_per_step`` × ``num_iters`` × P for the Krylov
    bases.

    Args:
      objective, params, batch: the training objective and the n training examples.
      batch_size: b, 1 ≤ b ≤ n.
      key: PRNG key of the batch draws (and of the Lanczos start vectors).
      replace: sample with replacement instead of a uniform b-subset.
      sampling: ``"independent"``, ``"partition"`` or ``"auto"`` (see
        :func:`batch_sharpness`).
      rel_stderr, min_draws, max_draws, draws_per_step: the stopping rule and grouping.
      num_iters, tol, init: Lanczos settings per draw.
      chunk_size: examples per chunk within one batch.
      subset: restrict H_B to these parameter leaves.

    Returns:
      :class:`BatchEstimate` (value, stderr, num_draws).
    """
    objective, params, batch, n = _restricted(objective, params, batch, chunk_size, subset)
    tol = _check_tol(tol)
    law = _checked_law(
        batch_size, n, replace, sampling, rel_stderr, min_draws, max_draws, draws_per_step
    )

    def draw(idx, aux_key):
        sub = _gather(batch, idx)
        matvec = operators.hessian(objective, params, sub, chunk_size=chunk_size)
        eig = linalg.lanczos_top_k(
            matvec, params, k=1, num_iters=num_iters, key=aux_key, init=init, tol=tol
        )
        return eig.values[0]

    return minibatch.monte_carlo(draw, key, _float_dtype(params), **law)


# --------------------------------------------------------------------- stability


def stability_threshold(
    learning_rate: float, *, momentum: float = 0.0, nesterov: bool = False
) -> float | jax.Array:
    """The largest curvature at which (momentum) gradient descent is stable on a quadratic.

    On ½ λ x², gradient descent x ← x − η λ x converges iff 0 < ηλ < 2, i.e. λ < 2/η.
    Heavy-ball momentum β (v ← βv + ∇, x ← x − ηv): λ < (2 + 2β)/η. Nesterov momentum in
    the form of optax / PyTorch (x ← x − η(∇ + β v)): λ < (2 + 2β)/((1 + 2β)η).

    Args:
      learning_rate: η > 0.
      momentum: β in [0, 1).
      nesterov: Nesterov instead of heavy-ball momentum.

    Returns:
      The threshold (a float, or an array when η is traced).

    Raises:
      ValueError: if η ≤ 0 or β is outside [0, 1).
    """
    lr = _concrete(learning_rate)
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning_rate must be positive and finite, got {learning_rate}")
    beta = _concrete(momentum)
    if beta is not None and not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
    if nesterov:
        return (2.0 + 2.0 * momentum) / ((1.0 + 2.0 * momentum) * learning_rate)
    return (2.0 + 2.0 * momentum) / learning_rate


def stability_ratios(
    quantities: Mapping[str, Any],
    /,
    *,
    learning_rate: float,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> dict[str, jax.Array]:
    """Each curvature quantity divided by the stability threshold (2/η for plain GD).

    A ratio of 1 is the edge of stability: λ_max(H)·η/2 → 1 under full-batch GD (Cohen et
    al. 2021), batch sharpness·η/2 → 1 under SGD (Andreyev & Beneventano 2024).

    Args:
      quantities: name → value. A value may be a number or array, a :class:`BatchEstimate`
        or :class:`~sharpness_jax.linalg.Estimate` (its ``value`` is used) or an
        :class:`~sharpness_jax.linalg.Eigen` (its top eigenvalue ``values[0]``).
      learning_rate, momentum, nesterov: as in :func:`stability_threshold`.

    Returns:
      name → value / threshold.
    """
    threshold = stability_threshold(learning_rate, momentum=momentum, nesterov=nesterov)

    def value(q):
        if isinstance(q, Eigen):
            return q.values[0]
        if isinstance(q, BatchEstimate | Estimate):
            return q.value
        return q

    return {name: jnp.asarray(value(q)) / threshold for name, q in quantities.items()}
