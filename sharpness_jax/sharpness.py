"""Sharpness: λ_max(H), tr(H), batch sharpness, GNI and edge-of-stability ratios.

Notation (means over the n examples of ``batch``, as everywhere in this library):
L(θ) = (1/n) Σ_p ℓ_p(θ), ḡ = ∇L, H = ∇²L, g_p = ∇ℓ_p, h_p = ∇²ℓ_p, δ_p = g_p − ḡ,
C = (1/n) Σ_p δ_p δ_pᵀ (the SGD-noise covariance of one example).
A mini-batch B of size b is a multiset of b indices; its loss is the MEAN
L_B = (1/b) Σ_{p∈B} ℓ_p, with gradient g_B and Hessian H_B. Batches are drawn as a training
sampler draws them:

* ``replace=True``: b i.i.d. uniform indices (sampling with replacement);
* ``replace=False``: a uniformly random b-subset of the n examples (sampling without
  replacement; every batch of a shuffled epoch has this law).

The Monte-Carlo estimators draw batches of that law in one of these ways (``sampling``):

* ``"independent"``: every batch on its own key;
* ``"partition"``: in i.i.d. groups, a group being the first k blocks of b entries of one
  uniformly random permutation of the n examples (k ≤ n // b): disjoint batches that together
  cover most of the data, like the batches of one shuffled epoch. With replacement each block
  is turned into b i.i.d. indices that repeat only the block's own entries. Each batch has the
  law above, so the mean over a group is unbiased; the standard error comes from the spread of
  the group means. The part of a per-batch quantity that is a sum over the batch's examples
  (nearly) cancels within a group: for batch sharpness on an MLP on MNIST (n = 1024, b = 32)
  this cut the batches needed for a given standard error by a factor of about 1.5; on random
  MLPs with n = 12–16 examples it needed up to 15% more.
* ``"auto"``: ``"partition"`` with whole groups (k = n // b) when ten groups fit in
  ``max_draws``, ``"independent"`` otherwise: partial groups cancel little, and the ten-group
  minimum (for a usable standard error) would cost most of the budget.

==========================================  ==================================================
function                                    quantity
==========================================  ==================================================
hessian_top_k                               top-k eigenpairs of H (λ_max = values[0]); Lanczos
                                            with a tolerance and warm start
hessian_trace_exact                         tr(H) exactly (P Hessian-vector products)
hessian_trace_hutchinson / _xtrace          tr(H) stochastic, with a standard error
gradient_rayleigh_quotient                  ḡᵀHḡ / ‖ḡ‖²
batch_sharpness                             E_B[g_Bᵀ H_B g_B / ‖g_B‖²]  (Monte-Carlo)
batch_sharpness_ratio_of_expectations       E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²]  (exact)
gradient_noise_interaction                  E_B[g_Bᵀ H g_B] / ‖ḡ‖²  (exact)
expected_batch_lambda_max                   E_B[λ_max(H_B)]  (Monte-Carlo)
gradient_hessian_moments / batch_expectations  the per-example sums behind the exact ones
stability_threshold / stability_ratios      2/η (and its momentum variants), q / (2/η)
==========================================  ==================================================

Batch sharpness (Andreyev & Beneventano 2024, Definition 3) is the expectation of the ratio;
under SGD it settles at 2/η while λ_max(H) stays below it. For the full batch (b = n without
replacement) it is ḡᵀHḡ/‖ḡ‖² ≤ λ_max(H).

Cost is counted in gradient-equivalents: a Hessian-vector product (forward-over-reverse)
costs about 2–2.5 gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpness_jax import linalg, operators, subsets
from sharpness_jax.linalg import Eigen, Estimate
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any

__all__ = [
    "DEFAULT_LANCZOS_ITERS",
    "DEFAULT_LANCZOS_TOL",
    "BatchEstimate",
    "BatchExpectations",
    "GradientHessianMoments",
    "batch_expectations",
    "batch_sharpness",
    "batch_sharpness_ratio_of_expectations",
    "expected_batch_lambda_max",
    "gradient_hessian_moments",
    "gradient_noise_interaction",
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

#: The ways of drawing the batches of the Monte-Carlo estimators (see the module docstring).
_SAMPLINGS = ("auto", "partition", "independent")
#: ``sampling="partition"`` runs at least this many groups (fewer only when ``min_draws`` or
#: ``max_draws`` is below it), so that the standard error of the group means rests on several
#: degrees of freedom. On the MNIST MLP, stopping at 1% after at least 10 groups gave z-scores
#: with standard deviation 1.15 (1.05 with 20 groups, at about 30% more batches).
_MIN_GROUPS = 10


class BatchEstimate(NamedTuple):
    """A Monte-Carlo average over random mini-batches.

    Attributes:
      value: the mean over the draws.
      stderr: its standard error, sqrt(sample variance / count) over the count i.i.d. units:
        the draws, or the group means when the batches are drawn in groups.
      num_draws: the number of batches drawn (an int32 array; data-dependent).
    """

    value: jax.Array
    stderr: jax.Array
    num_draws: jax.Array


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


# ------------------------------------------------------------------------------ checks


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be >= {low}{upper}, got {value}")
    return int(value)


def _check_batch_size(batch_size: Any, n: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be an int, got {batch_size!r}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must lie in [1, n] with n = {n} examples, got {batch_size}")
    return int(batch_size)


def _check_replace(replace: Any) -> bool:
    if not isinstance(replace, bool):
        raise ValueError(f"replace must be True or False, got {replace!r}")
    return replace


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
    if not (isinstance(sampling, str) and sampling in _SAMPLINGS):
        raise ValueError(f"sampling must be one of {_SAMPLINGS}, got {sampling!r}")
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


def _sample_indices(key: jax.Array, n: int, b: int, replace: bool) -> jax.Array:
    """b indices in [0, n): i.i.d. uniform (``replace``) or a uniform b-subset."""
    if replace:
        return jax.random.randint(key, (b,), 0, n, dtype=jnp.int32)
    return jax.random.permutation(key, n)[:b].astype(jnp.int32)


def _coupled_with_replacement(block: jax.Array, r: jax.Array) -> jax.Array:
    """b i.i.d. uniform indices in [0, n) built from b distinct ones.

    ``block`` holds b distinct indices in uniformly random order (the first b entries of a
    uniform permutation); ``r`` holds b i.i.d. uniform integers in [0, n). Slot s, with D
    distinct indices placed so far (``block[:D]``), takes ``block[r_s]`` (a repeat) if
    r_s < D and the next new index ``block[D]`` otherwise. Given the earlier slots, each
    placed index then has probability 1/n (r_s = its position) and each of the n − D others
    probability (1 − D/n)/(n − D) = 1/n (``block[D]`` is uniform over them and independent of
    r): the slots are i.i.d. uniform. Batches built from disjoint blocks share no new index,
    so a group of them covers the data almost as a partition does.
    """

    def slot(placed, r_s):
        return placed + (r_s >= placed).astype(jnp.int32), block[jnp.minimum(r_s, placed)]

    _, idx = jax.lax.scan(slot, jnp.int32(0), r)
    return idx


def _gather(batch: PyTree, idx: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), batch)


def _draw_key(key: jax.Array, draw: jax.Array) -> jax.Array:
    """The key of draw (or group) number ``draw``: a function of (key, draw) only, so the
    batches do not depend on how many are evaluated together, on chunking or on devices."""
    return jax.random.fold_in(key, draw)


class _Design(NamedTuple):
    """How the batches are grouped: ``group_size`` batches per i.i.d. group, between
    ``min_groups`` and ``max_groups`` groups."""

    group_size: int
    min_groups: int
    max_groups: int


def _resolve(n: int, b: int, sampling: str, max_draws: int) -> str:
    """``"auto"``: whole partitions (k = n // b ≥ 2 batches) when ``max_draws`` allows ten of
    them, independent draws otherwise (a partial group cancels little and the ten-group floor
    would cost most of ``max_draws``)."""
    if sampling != "auto":
        return sampling
    k = n // b
    return "partition" if k >= 2 and _MIN_GROUPS * k <= max_draws else "independent"


def _design(n: int, b: int, sampling: str, min_draws: int, max_draws: int) -> _Design:
    """Independent draws are groups of one. A partition group holds k = min(n // b,
    max_draws // 10) batches (at least one), so that ``max_draws`` allows ten groups; the loop
    runs at least ceil(min_draws / k) and min(10, min_draws) groups and at most
    max_draws // k."""
    sampling = _resolve(n, b, sampling, max_draws)
    if sampling == "independent":
        return _Design(1, min_draws, max_draws)
    k = max(1, min(n // b, max_draws // _MIN_GROUPS))
    max_groups = max_draws // k
    min_groups = max(-(-min_draws // k), min(_MIN_GROUPS, min_draws))
    return _Design(k, min(min_groups, max_groups), max_groups)


def _batch_indices(
    key: jax.Array, units: jax.Array, *, n: int, b: int, replace: bool, sampling: str, k: int
) -> tuple[jax.Array, jax.Array]:
    """The batches of draws (``independent``) or groups (``partition``) ``units``.

    Returns ``(idx, keys)``: ``idx`` of shape (len(units) · k, b), group after group, and one
    auxiliary key per batch (for randomness the estimator needs besides the batch). Batch j of
    group u depends only on (key, u, j).
    """
    unit_keys = jax.vmap(lambda u: _draw_key(key, u))(units)
    if sampling == "independent":
        idx = jax.vmap(lambda kk: _sample_indices(kk, n, b, replace))(unit_keys)
        return idx, jax.vmap(lambda kk: jax.random.fold_in(kk, 1))(unit_keys)

    def group(gkey):
        perm = jax.random.permutation(jax.random.fold_in(gkey, 0), n).astype(jnp.int32)
        blocks = perm[: k * b].reshape(k, b)
        slots = jnp.arange(k, dtype=jnp.int32)
        keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(gkey, 2), j))(slots)
        if not replace:
            return blocks, keys

        def with_replacement(block, j):
            r = jax.random.randint(
                jax.random.fold_in(jax.random.fold_in(gkey, 1), j), (b,), 0, n, dtype=jnp.int32
            )
            return _coupled_with_replacement(block, r)

        return jax.vmap(with_replacement)(blocks, slots), keys

    idx, keys = jax.vmap(group)(unit_keys)
    return idx.reshape(-1, b), keys.reshape(-1, *keys.shape[2:])


def _monte_carlo(
    batch_value: Callable[[jax.Array, jax.Array], jax.Array],
    key: jax.Array,
    dtype,
    *,
    n: int,
    b: int,
    replace: bool,
    sampling: str,
    rel_stderr: float,
    min_draws: int,
    max_draws: int,
    draws_per_step: int,
) -> BatchEstimate:
    """Mean and standard error of ``batch_value(idx, key)`` over random batches ``idx``.

    The batches come in i.i.d. groups (:func:`_design`; single draws for ``independent``);
    each ``lax.while_loop`` step evaluates max(1, draws_per_step // k) groups of k batches,
    ``draws_per_step`` batches at a time (vmapped), and merges the group means into a running
    (count, mean, M2) by Chan et al.'s pairwise update (stable in float32). Stops after the
    first step at which count ≥ min_groups and stderr ≤ rel_stderr · |mean|, or
    count = max_groups.
    """
    sampling = _resolve(n, b, sampling, max_draws)
    k, min_groups, max_groups = _design(n, b, sampling, min_draws, max_draws)
    per_step = max(1, draws_per_step // k)

    def group_means(units):
        idx, keys = _batch_indices(key, units, n=n, b=b, replace=replace, sampling=sampling, k=k)
        if idx.shape[0] <= draws_per_step:
            values = jax.vmap(batch_value)(idx, keys)
        else:
            values = jax.lax.map(lambda a: batch_value(*a), (idx, keys), batch_size=draws_per_step)
        return jnp.mean(values.astype(dtype).reshape(per_step, k), axis=1)

    def step(state):
        i, count, mean, m2 = state
        units = i * per_step + jnp.arange(per_step, dtype=jnp.int32)
        values = group_means(units)
        valid = units < max_groups
        m = jnp.sum(valid.astype(dtype))
        step_mean = jnp.sum(jnp.where(valid, values, 0)) / m
        step_m2 = jnp.sum(jnp.where(valid, jnp.square(values - step_mean), 0))
        total = count.astype(dtype) + m
        delta = step_mean - mean
        mean = mean + delta * m / total
        m2 = m2 + step_m2 + jnp.square(delta) * count.astype(dtype) * m / total
        return i + 1, count + jnp.sum(valid, dtype=jnp.int32), mean, m2

    def stderr(count, m2):
        c = jnp.maximum(count, 2).astype(dtype)
        return jnp.sqrt(jnp.maximum(m2, 0) / (c - 1) / c)

    def cond(state):
        _, count, mean, m2 = state
        noisy = stderr(count, m2) > rel_stderr * jnp.abs(mean)
        return (count < min_groups) | ((count < max_groups) & noisy)

    zero = jnp.zeros((), dtype)
    init = (jnp.int32(0), jnp.int32(0), zero, zero)
    _, count, mean, m2 = jax.lax.while_loop(cond, step, init)
    return BatchEstimate(mean, stderr(count, m2), count * k)


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
    objective, params, batch, _ = _restricted(objective, params, batch, chunk_size, subset)
    matvec = operators.hessian(objective, params, batch, chunk_size=chunk_size)
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
    objective, params, batch, _ = _restricted(objective, params, batch, chunk_size, subset)
    matvec = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    return linalg.trace_exact(matvec, params, chunk_size=basis_chunk)


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

    Args:
      key: PRNG key of the probes.
      num_probes: m.
      probe_chunk: probes evaluated together (default all).
      chunk_size: examples per chunk in each product.
      subset: restrict to these parameter leaves.
    """
    objective, params, batch, _ = _restricted(objective, params, batch, chunk_size, subset)
    matvec = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    return linalg.hutchinson_trace(
        matvec, params, key=key, num_probes=num_probes, probe_chunk=probe_chunk
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
    objective, params, batch, _ = _restricted(objective, params, batch, chunk_size, subset)
    matvec = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    return linalg.xtrace(matvec, params, key=key, num_probes=num_probes)


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


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num/den, NaN where den = 0 (an undefined ratio)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.nan)


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
    b-subset, the law of each batch of a shuffled epoch).

    ``sampling`` says how the batches are drawn; each batch has that law either way.

    * ``"auto"`` (default): ``"partition"`` with whole groups (k = n // b ≥ 2) when
      ``max_draws`` ≥ 10 k, ``"independent"`` otherwise.
    * ``"partition"``: in i.i.d. groups of k = min(n // b, max_draws // 10) batches
      (at least one), the consecutive blocks of b entries of one uniformly random permutation
      of the n examples (with ``replace``, each block turned into b i.i.d. indices that reuse
      only its own entries). The estimate is the mean of the group means and its standard
      error their spread / sqrt(number of groups). Disjoint batches that cover the data make
      the part of the ratio that adds up over examples cancel within a group; on an MLP on
      MNIST (n = 1024, b = 32) a 1% standard error took about 1.5 times fewer batches than
      with independent draws. The loop runs whole groups: at least ceil(``min_draws`` / k)
      groups and min(10, ``min_draws``) groups, at most ``max_draws`` // k groups, so
      ``num_draws`` is a multiple of k.
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
    b = _check_batch_size(batch_size, n)
    replace = _check_replace(replace)
    sampling = _check_scheme(sampling)
    rel_stderr, min_draws, max_draws, draws_per_step = _check_stopping(
        rel_stderr, min_draws, max_draws, draws_per_step
    )
    chunked = chunk_size is not None and chunk_size < b

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

    return _monte_carlo(
        draw,
        key,
        _float_dtype(params),
        n=n,
        b=b,
        replace=replace,
        sampling=sampling,
        rel_stderr=rel_stderr,
        min_draws=min_draws,
        max_draws=max_draws,
        draws_per_step=draws_per_step,
    )


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
    b = _check_batch_size(batch_size, n)
    replace = _check_replace(replace)
    sampling = _check_scheme(sampling)
    tol = _check_tol(tol)
    rel_stderr, min_draws, max_draws, draws_per_step = _check_stopping(
        rel_stderr, min_draws, max_draws, draws_per_step
    )

    def draw(idx, aux_key):
        sub = _gather(batch, idx)
        matvec = operators.hessian(objective, params, sub, chunk_size=chunk_size)
        eig = linalg.lanczos_top_k(
            matvec,
            params,
            k=1,
            num_iters=num_iters,
            key=aux_key,
            init=init,
            tol=tol,
        )
        return eig.values[0]

    return _monte_carlo(
        draw,
        key,
        _float_dtype(params),
        n=n,
        b=b,
        replace=replace,
        sampling=sampling,
        rel_stderr=rel_stderr,
        min_draws=min_draws,
        max_draws=max_draws,
        draws_per_step=draws_per_step,
    )


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
    objective, params, batch, n = _restricted(objective, params, batch, chunk_size, subset)
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


def _sampling_coefficients(n: int, b: int, replace: bool) -> tuple[float, float]:
    """(κ₂, κ₃): the second and third central-moment factors of a batch mean.

    For zero-sum per-example quantities (Σ_p δ_p = 0, Σ_p (h_p − H) = 0), with
    δ_B = (1/b) Σ_{s} δ_{i_s} and Δ_B = (1/b) Σ_{s} (h_{i_s} − H):

      E[δ_B δ_Bᵀ] = κ₂ C,    E[δ_Bᵀ Δ_B δ_B] = κ₃ (1/n) Σ_p δ_pᵀ (h_p − H) δ_p,
      E[ḡᵀ Δ_B δ_B] = κ₂ (1/n) Σ_p ḡᵀ h_p δ_p.

    With replacement κ₂ = 1/b, κ₃ = 1/b². Without replacement, from the inclusion probabilities
    π₁ = b/n, π₂ = b(b−1)/(n(n−1)), π₃ = b(b−1)(b−2)/(n(n−1)(n−2)) and the zero sums,
    κ₂ = (n/b²)(π₁ − π₂) = (n−b)/(b(n−1)) and
    κ₃ = (n/b³)(π₁ − 3π₂ + 2π₃) = (n−b)(n−2b)/(b²(n−1)(n−2)).
    """
    if replace:
        return 1.0 / b, 1.0 / b**2
    pi1 = b / n
    pi2 = b * (b - 1) / (n * (n - 1)) if b >= 2 else 0.0
    pi3 = b * (b - 1) * (b - 2) / (n * (n - 1) * (n - 2)) if b >= 3 else 0.0
    return n * (pi1 - pi2) / b**2, n * (pi1 - 3 * pi2 + 2 * pi3) / b**3


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
    (see :func:`_sampling_coefficients`). Altogether

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
    b = _check_batch_size(batch_size, n)
    replace = _check_replace(replace)
    k2, k3 = _sampling_coefficients(n, b, replace)
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
    _, _, _, n = _restricted(objective, params, batch, chunk_size, subset)
    _check_batch_size(batch_size, n)
    _check_replace(replace)
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
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """GNI = E_B[g_Bᵀ H g_B] / ‖ḡ‖² with the full-batch H, exactly.

    E_B[g_Bᵀ H g_B] = ḡᵀHḡ + tr(H Cov(g_B)), Cov(g_B) = C/b with replacement and
    C (n−b)/(b(n−1)) without; tr(HC) = (1/n) Σ_p δ_pᵀ H δ_p from chunked Hessian-vector
    products of the centred per-example gradients (n full-batch products, see
    :func:`gradient_hessian_moments`). NaN when ḡ = 0.
    """
    _, _, _, n = _restricted(objective, params, batch, chunk_size, subset)
    _check_batch_size(batch_size, n)
    _check_replace(replace)
    moments = gradient_hessian_moments(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    e = batch_expectations(moments, batch_size=batch_size, replace=replace)
    return _safe_ratio(e.grad_hessian_grad, moments.grad_norm_sq)


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
