"""Inverse-curvature products: (A + λI)⁻¹ b for any operator of the library, and the
quantities built on them.

Every solve is :func:`sharpness_jax.solves.solve` (lineax CG, GMRES or BiCGStab; methods,
stopping rule and preconditioners are described there; K-FAC and diagonal preconditioners
in :mod:`sharpness_jax.inverse_preconditioners`). A solve that does not converge is
reported in its :class:`Solution`, never raised.

==============================  ============================================================
function                        quantity
==============================  ============================================================
solve                           x = (A + λI)⁻¹ b, with iteration count and residual norm
natural_gradient                (F + λI)⁻¹ ḡ, F the true or the empirical Fisher, ḡ = ∇L
influence                       (H + λI)⁻¹ g_p for chosen examples p (or given gradients)
trace_of_inverse_product        tr((A + λI)⁻¹ B), Hutchinson with one solve per probe
takeuchi_information_criterion  tr((H + λI)⁻¹ C), C the centred gradient covariance
riemannian_trace_full           tr((F + λI)⁻¹ H), the full-network Riemannian trace
riemannian_lambda_max           λ_max((F + λI)⁻¹ H) (and the next generalised eigenpairs)
==============================  ============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from matfree import stochtrace

from sharpness_jax import checks, operators, subsets
from sharpness_jax import inverse_preconditioners as preconditioners
from sharpness_jax.linalg.estimators import Estimate, _mean_and_sem, _probe_values
from sharpness_jax.linalg.exact import _check_template
from sharpness_jax.linear_operator import compiled
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import per_example_grads
from sharpness_jax.solves import (  # noqa: F401  (_solve: the compiled solve, for tests)
    SOLVE_METHODS,
    Solution,
    _damping,
    _dispatch,
    _settings,
    _solve,
    _solve_core,
    _solve_stack,
    _unwrap_preconditioner,
    solve,
)

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "FISHER_KINDS",
    "SOLVE_METHODS",
    "GeneralisedEigen",
    "Solution",
    "influence",
    "natural_gradient",
    "riemannian_lambda_max",
    "riemannian_trace_full",
    "solve",
    "takeuchi_information_criterion",
    "trace_of_inverse_product",
]


class GeneralisedEigen(NamedTuple):
    """Top generalised eigenpairs H u = θ M u of a symmetric H and a positive definite M.

    Attributes:
      values: ``(k,)`` Ritz values θ, descending (lower bounds of the true ones).
      vectors: pytree like the template with a leading axis k, M-normalised (uᵀ M u = 1).
      residuals: ``(k,)`` ‖H u − θ M u‖₂, computed.
      num_iters: Lanczos steps taken (one solve with M each).
      converged: whether every inner solve converged.
    """

    values: jax.Array
    vectors: PyTree
    residuals: jax.Array
    num_iters: jax.Array
    converged: jax.Array


#: The Fisher matrices of :func:`natural_gradient`.
FISHER_KINDS = {"true": operators.fisher, "empirical": operators.empirical_fisher}


def _named_preconditioner(objective, params, batch, damping, fisher, chunk_size, subset):
    def build(name):
        return preconditioners.curvature_preconditioner(
            name,
            objective,
            params,
            batch,
            damping=damping,
            fisher=fisher,
            chunk_size=chunk_size,
            subset=subset,
        )

    return build


def natural_gradient(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float,
    fisher: str = "true",
    method: str = "cg",
    tol: float = 1e-6,
    max_iters: int | None = None,
    preconditioner: str | PyTree | MatVec | Estimate | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Solution:
    """The natural-gradient direction (F + λI)⁻¹ ḡ (a descent step is θ − η x).

    F = ``operators.fisher`` (``fisher="true"``: the exact true Fisher,
    (1/n) Σ_p J_pᵀ F_out J_p) or ``operators.empirical_fisher`` (``"empirical"``:
    (1/n) Σ_p g_p g_pᵀ), ḡ = ``operators.gradient`` (the mean gradient). ``preconditioner``
    may also be ``"diagonal"`` (diag of that F, exact) or ``"kfac"``
    (:func:`~sharpness_jax.inverse_preconditioners.kfac_preconditioner`); other arguments as
    in :func:`solve`.
    """
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {tuple(FISHER_KINDS)}, got {fisher!r}")
    kw = dict(chunk_size=chunk_size, subset=subset)
    fvp = FISHER_KINDS[fisher](objective, params, batch, **kw)
    g = operators.gradient(objective, params, batch, **kw)
    named = _named_preconditioner(objective, params, batch, damping, fisher, **kw)
    return solve(
        fvp,
        g,
        damping=damping,
        method=method,
        tol=tol,
        max_iters=max_iters,
        preconditioner=_unwrap_preconditioner(preconditioner, named),
    )


def _example_gradients(objective, params, batch, index_or_grads, subset):
    """``(stacked gradients, single)`` from example indices or given gradients."""
    obj, template, _ = operators.prepare(objective, params, batch, chunk_size=None, subset=subset)
    if checks.is_int(index_or_grads) or (
        hasattr(index_or_grads, "dtype") and jnp.issubdtype(index_or_grads.dtype, jnp.integer)
    ):
        idx = jnp.asarray(index_or_grads, jnp.int32)
        single = idx.ndim == 0
        chosen = jax.tree_util.tree_map(lambda a: a[jnp.atleast_1d(idx)], tuple(batch))
        return per_example_grads(obj, template, Batch(*chosen)), single
    ranks = jax.tree_util.tree_map(lambda g, t: jnp.ndim(g) - jnp.ndim(t), index_or_grads, template)
    ranks = set(jax.tree_util.tree_leaves(ranks))
    if ranks == {0}:
        return jax.tree_util.tree_map(lambda g: g[None], index_or_grads), True
    if ranks == {1}:
        return index_or_grads, False
    raise ValueError("gradients must be shaped like the params, with or without a leading axis")


def influence(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    index_or_grads: int | jax.Array | PyTree,
    *,
    damping: float,
    method: str = "gmres",
    tol: float = 1e-6,
    max_iters: int | None = None,
    preconditioner: str | PyTree | MatVec | Estimate | None = None,
    restart: int = 20,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Solution:
    """Influence-style directions (H + λI)⁻¹ g_p, H the mean-loss Hessian of ``batch``.

    Args:
      index_or_grads: an example index (int), an integer array of indices into ``batch``
        (g_p = ∇θ ℓ_p, per example), or gradients to solve for directly: a pytree like the
        (restricted) params, or one with a leading axis.
      damping: λ ≥ 0; ``method`` defaults to GMRES because H + λI may be indefinite.
      preconditioner: as in :func:`solve`, or ``"diagonal"`` / ``"kfac"``: the true
        Fisher's (Gauss–Newton) diagonal or K-FAC, damped by λ.
      other arguments: as in :func:`solve`.

    Returns:
      :class:`Solution` whose fields carry a leading axis over the examples, except for a
      single index or a single gradient.
    """
    s = _settings(method, tol, max_iters, restart)
    grads, single = _example_gradients(objective, params, batch, index_or_grads, subset)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    named = _named_preconditioner(objective, params, batch, damping, "true", chunk_size, subset)
    pre = _unwrap_preconditioner(preconditioner, named)
    sols = _dispatch(_solve_stack, hvp, grads, _damping(damping, grads), pre, s=s)
    if single:
        return jax.tree_util.tree_map(lambda a: a[0], sols)
    return sols


@compiled(static=("s", "num_probes", "probe_chunk"))
def _inverse_trace(a, b, template, key, damping, preconditioner, *, s, num_probes, probe_chunk):
    def integrand(pair, z):
        sol = _solve_core(pair[0], pair[1](z), damping, preconditioner, s)
        return optax.tree.vdot(z, sol.x), sol.converged

    values, converged = _probe_values(
        integrand, (a, b), template, key, num_probes, probe_chunk, stochtrace.sampler_signs
    )
    mean, sem = _mean_and_sem(values)
    ok = jnp.all(converged)
    return jnp.where(ok, mean, jnp.nan), jnp.where(ok, sem, jnp.nan)


def trace_of_inverse_product(
    a: MatVec,
    b: MatVec,
    template: PyTree,
    /,
    *,
    damping: float,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
    method: str = "cg",
    tol: float = 1e-8,
    max_iters: int | None = None,
    preconditioner: PyTree | MatVec | Estimate | None = None,
    restart: int = 20,
) -> Estimate:
    """tr((A + λI)⁻¹ B) ≈ (1/m) Σ_j z_jᵀ (A + λI)⁻¹ B z_j, Rademacher z_j; SE from the m.

    One solve per probe, ``probe_chunk`` probes vmapped together (``lax.map`` over chunks).
    A is symmetric; B need not be. The value and SE are NaN when any solve did not converge
    (raise ``max_iters`` or the damping).

    Args:
      a, b: the operators A (inverted) and B.
      template: a pytree of the vector space.
      other arguments: as in :func:`solve` and :func:`linalg.hutchinson_trace`.
    """
    s = _settings(method, tol, max_iters, restart)
    _check_template(template)
    pre = _unwrap_preconditioner(preconditioner)
    damping = _damping(damping, template)
    value, sem = _dispatch(
        _inverse_trace,
        a,
        b,
        template,
        key,
        damping,
        pre,
        s=s,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
    )
    return Estimate(value, sem, num_probes)


def _curvature_trace(inverted, other, objective, params, batch, *, chunk_size, subset, **kw):
    """tr((A + λI)⁻¹ B) for A = ``inverted(...)`` and B = ``other(...)`` of the objective."""
    _, template, _ = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    a, b = (
        build(objective, params, batch, chunk_size=chunk_size, subset=subset)
        for build in (inverted, other)
    )
    return trace_of_inverse_product(a, b, template, **kw)


def takeuchi_information_criterion(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
    method: str = "gmres",
    tol: float = 1e-8,
    max_iters: int | None = None,
    restart: int = 20,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Estimate:
    """Takeuchi's information criterion term tr((H + λI)⁻¹ C), stochastically with its SE.

    H = ``operators.hessian`` (mean loss), C = ``operators.gradient_covariance``
    ((1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ, exact); by :func:`trace_of_inverse_product`. GMRES by
    default, as the damped Hessian away from a minimum may be indefinite.
    """
    return _curvature_trace(
        operators.hessian,
        operators.gradient_covariance,
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        subset=subset,
        damping=damping,
        key=key,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
        method=method,
        tol=tol,
        max_iters=max_iters,
        restart=restart,
    )


def riemannian_trace_full(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
    tol: float = 1e-8,
    max_iters: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Estimate:
    """Full-network Riemannian trace tr((F + λI)⁻¹ H), matrix-free, with its SE.

    F = ``operators.fisher`` (exact true Fisher), H = ``operators.hessian``; Hutchinson with
    one CG solve with F + λI per probe (:func:`trace_of_inverse_product`). Needs λ > 0 when F
    is singular (always, for homogeneous hidden units; see :mod:`sharpness_jax.riemannian`).
    """
    return _curvature_trace(
        operators.fisher,
        operators.hessian,
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        subset=subset,
        damping=damping,
        key=key,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
        tol=tol,
        max_iters=max_iters,
    )


def _metric_lanczos(h, m, template, key, damping, *, num_iters, s):
    """Lanczos for H u = θ M̃ u, M̃ = M + λI, in the M̃-inner product, with full
    reorthogonalisation (twice) and a Rayleigh–Ritz step on the stored H Q and M̃ Q.

    Returns ``(Q, HQ, MQ, used, converged)``, rows of Q M̃-orthonormal.
    """
    flat, unravel = ravel_pytree(template)
    size = flat.shape[0]
    hv = lambda x: ravel_pytree(h(unravel(x)))[0]
    mv = lambda x: ravel_pytree(m(unravel(x)))[0] + damping * x
    eps = jnp.finfo(flat.dtype).eps
    q0 = jax.random.normal(key, flat.shape, flat.dtype)
    mq0 = mv(q0)
    norm0 = jnp.sqrt(jnp.vdot(q0, mq0))
    zeros = jnp.zeros((num_iters, size), flat.dtype)
    yes = jnp.asarray(True)
    init = (
        zeros.at[0].set(q0 / norm0),
        zeros,
        zeros.at[0].set(mq0 / norm0),
        jnp.int32(1),
        yes,
        yes,
    )

    def step(j, state):
        q_rows, hq_rows, mq_rows, used, alive, ok = state
        hq = hv(q_rows[j])
        sol = _solve_core(m, unravel(hq), damping, None, s)
        w = ravel_pytree(sol.x)[0]
        before = jnp.sqrt(jnp.maximum(jnp.vdot(w, hq), 0))
        for _ in range(2):  # classical Gram-Schmidt twice in the M̃-inner product
            w = w - q_rows.T @ (mq_rows @ w)
        mw = mv(w)
        beta = jnp.sqrt(jnp.maximum(jnp.vdot(w, mw), 0))
        grow = alive & (j + 1 < num_iters) & (beta > 100 * eps * before)
        nxt = jnp.minimum(j + 1, num_iters - 1)
        scale = jnp.where(grow, 1 / jnp.where(grow, beta, 1), 0)
        q_rows = q_rows.at[nxt].set(jnp.where(grow, w * scale, q_rows[nxt]))
        mq_rows = mq_rows.at[nxt].set(jnp.where(grow, mw * scale, mq_rows[nxt]))
        hq_rows = hq_rows.at[j].set(jnp.where(alive, hq, 0))
        return (
            q_rows,
            hq_rows,
            mq_rows,
            used + grow.astype(jnp.int32),
            grow,
            ok & (sol.converged | ~alive),
        )

    return jax.lax.fori_loop(0, num_iters, step, init)


@compiled(static=("k", "num_iters", "s"))
def _riemannian_lambda_max(h, m, template, key, damping, *, k, num_iters, s):
    q_rows, hq_rows, mq_rows, used, _, ok = _metric_lanczos(
        h, m, template, key, damping, num_iters=num_iters, s=s
    )
    active = jnp.arange(num_iters, dtype=jnp.int32) < used
    projected = q_rows @ hq_rows.T
    projected = (projected + projected.T) / 2
    bound = 1 + 2 * num_iters * jnp.max(jnp.abs(projected))
    projected = projected - jnp.diag(jnp.where(active, 0, bound))
    values, coefficients = jnp.linalg.eigh(projected)
    values, coefficients = values[::-1][:k], coefficients[:, ::-1][:, :k]
    vectors = coefficients.T @ q_rows
    residuals = jnp.linalg.norm(
        coefficients.T @ hq_rows - values[:, None] * (coefficients.T @ mq_rows), axis=1
    )
    _, unravel = ravel_pytree(template)
    return GeneralisedEigen(values, jax.vmap(unravel)(vectors), residuals, used, ok)


def riemannian_lambda_max(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float,
    key: jax.Array,
    k: int = 1,
    num_iters: int = 32,
    tol: float = 1e-10,
    max_iters: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> GeneralisedEigen:
    """λ_max((F + λI)⁻¹ H), with the next k − 1 generalised eigenpairs H u = θ (F + λI) u.

    (F + λI)⁻¹ H is self-adjoint in the inner product ⟨u, v⟩ = uᵀ (F + λI) v, so Lanczos in
    that inner product (equivalently, Lanczos on the symmetric (F + λI)^{-1/2} H
    (F + λI)^{-1/2} without its square root) builds an (F + λI)-orthonormal Krylov basis Q
    of (F + λI)⁻¹ H, one CG solve with F + λI per step; the Ritz pairs come from the
    Rayleigh–Ritz problem Qᵀ H Q s = θ s, with the stored H Q, so they are lower bounds of the
    true θ_i (Courant–Fischer) even for inexact solves, and the residuals
    ‖H u − θ (F + λI) u‖₂ are computed, not bounded. With ``num_iters`` = P the basis spans
    the space and the values are exact. Memory O(num_iters · P).

    Args:
      damping: λ (> 0 when F is singular).
      key: start vector.
      k: eigenpairs returned (≤ ``num_iters``).
      num_iters: Lanczos steps (capped at P).
      tol, max_iters: of each inner CG solve.
    """
    checks.check_positive_int("k", k)
    checks.check_positive_int("num_iters", num_iters)
    s = _settings("cg", tol, max_iters, 20)
    _, template, _ = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    num_iters = min(num_iters, _check_template(template))
    if k > num_iters:
        raise ValueError(f"k={k} exceeds the Lanczos steps {num_iters}")
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    fvp = operators.fisher(objective, params, batch, chunk_size=chunk_size, subset=subset)
    return _riemannian_lambda_max(
        hvp, fvp, template, key, _damping(damping, template), k=k, num_iters=num_iters, s=s
    )
