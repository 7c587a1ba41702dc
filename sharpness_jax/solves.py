"""Solves (A + λI) x = b for any symmetric operator of the library, through lineax.

Every solve goes through lineax: the operator is a ``lx.FunctionLinearOperator`` over
pytrees, tagged symmetric (and positive semi-definite for CG), solved with ``throw=False``
so that a solve that does not converge is reported in the :class:`Solution`, never raised.

Methods (``SOLVE_METHODS``): ``"cg"`` (lineax CG, for positive definite A + λI: GGN,
Fisher, C, empirical Fisher, a Hessian damped past its most negative eigenvalue),
``"gmres"`` and ``"bicgstab"`` (for an indefinite H + λI). lineax 0.1.1 has no MINRES, the
usual Krylov method for symmetric indefinite systems; GMRES minimises the same residual
over the same Krylov space (MINRES is GMRES specialised to symmetric operators), at the
cost of storing ``restart`` vectors, and restarts every ``restart`` steps.

Stopping rule (lineax's, with rtol = ``tol`` and atol = ``tol`` · ‖b‖_∞): every component
of the residual r = b − (A + λI) x and of the last step Δx satisfies
|r_i| ≤ tol (‖b‖_∞ + |b_i|) and |Δx_i| ≤ tol (‖b‖_∞ + |x_i|). The reported
``residual_norm`` is the 2-norm ‖b − (A + λI) x‖₂ recomputed from the returned x. A ``tol``
below 10 eps of b's dtype (1.2e-6 in float32: unreachable there) is raised to 10 eps.

A preconditioner M⁻¹ ≈ (A + λI)⁻¹ (positive definite for CG) is the diagonal of A (a
pytree like b, e.g. from ``linalg.diagonal_exact``, or an :class:`Estimate` of it), applied as
diag(1 / (|d| + λ)); a :class:`~sharpness_jax.inverse_preconditioners.Preconditioner` (e.g.
``kfac_preconditioner``); a callable ``v -> M⁻¹ v``; or, where an objective is given, a name:
``"diagonal"`` (the exact Fisher diagonal) or ``"kfac"`` (K-FAC of the true Fisher on the
Dense layers). CG runs with M⁻¹ scaled by ``inverse_preconditioners.cg_scale``, which leaves
its iterates unchanged and keeps lineax's scale-dependent breakdown test (which returned NaN
for a float32 tanh MLP with P = 6154 at λ = 10⁻², where GMRES converged) to genuine losses
of positive definiteness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import lineax as lx
import optax

from sharpness_jax import checks
from sharpness_jax import inverse_preconditioners as preconditioners
from sharpness_jax.linalg.estimators import Estimate
from sharpness_jax.linalg.exact import _check_template
from sharpness_jax.linear_operator import Operator, compiled

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

#: The Krylov methods of :func:`solve`.
SOLVE_METHODS = ("cg", "gmres", "bicgstab")

__all__ = ["SOLVE_METHODS", "Solution", "solve"]


class Solution(NamedTuple):
    """The result of a solve (A + λI) x = b.

    Attributes:
      x: the solution, a pytree like b (with a leading axis when several are solved).
      num_iters: iterations run (CG, BiCGStab: Krylov steps; GMRES: restart cycles of up to
        ``restart`` steps each).
      residual_norm: ‖b − (A + λI) x‖₂, recomputed from x.
      converged: whether lineax met the tolerance within ``max_iters`` and x is finite.
    """

    x: PyTree
    num_iters: jax.Array
    residual_norm: jax.Array
    converged: jax.Array


class _Settings(NamedTuple):
    """The static settings of a solve (hashable, so jit keys on them)."""

    method: str
    tol: float
    max_iters: int | None
    restart: int


def _settings(method: str, tol: float, max_iters: int | None, restart: int) -> _Settings:
    if method not in SOLVE_METHODS:
        raise ValueError(f"method must be one of {SOLVE_METHODS}, got {method!r}")
    checks.check_positive_scalar("tol", tol)
    checks.check_positive_int("max_iters", max_iters, optional=True)
    checks.check_positive_int("restart", restart)
    return _Settings(method, float(tol), max_iters, restart)


def _solver(s: _Settings, atol: jax.Array) -> lx.AbstractLinearSolver:
    if s.method == "cg":
        return lx.CG(rtol=s.tol, atol=atol, max_steps=s.max_iters)
    if s.method == "gmres":
        return lx.GMRES(rtol=s.tol, atol=atol, max_steps=s.max_iters, restart=s.restart)
    return lx.BiCGStab(rtol=s.tol, atol=atol, max_steps=s.max_iters)


def _solve_core(matvec, b, damping, preconditioner, s: _Settings) -> Solution:
    """One lineax solve (A + λI) x = b inside a trace; see :func:`solve`."""
    structure = jax.eval_shape(lambda: b)
    psd = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    tags = psd if s.method == "cg" else (lx.symmetric_tag,)

    def damped(v):
        return optax.tree.add_scale(matvec(v), damping, v)

    op = lx.FunctionLinearOperator(damped, structure, tags)
    pre = preconditioners.as_preconditioner(preconditioner, damping)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(b))
    fn = pre
    if s.method == "cg":  # M⁻¹ scaled by c: the same iterates, no spurious breakdown
        c = preconditioners.cg_scale(pre, damping, optax.tree.size(b), dtype)
        fn = lambda v: optax.tree.scale(c, v if pre is None else pre(v))
    options = {}
    if fn is not None:
        options["preconditioner"] = lx.FunctionLinearOperator(fn, structure, psd)
    b_max = optax.tree.norm(b, ord="inf")
    eps = float(jnp.finfo(dtype).eps)
    s = s._replace(tol=max(s.tol, 10 * eps))  # the least the dtype can meet (module docstring)
    sol = lx.linear_solve(op, b, _solver(s, s.tol * b_max), options=options, throw=False)
    residual = optax.tree.norm(optax.tree.sub(b, damped(sol.value)))
    converged = (sol.result == lx.RESULTS.successful) & jnp.isfinite(residual)
    return Solution(sol.value, sol.stats["num_steps"], residual, converged)


def _damping(damping: float, template: PyTree) -> jax.Array:
    checks.check_nonnegative_scalar("damping", damping)
    leaf = jax.tree_util.tree_leaves(template)[0]
    return jnp.asarray(damping, jnp.result_type(leaf))


def _unwrap_preconditioner(preconditioner: Any, named=None) -> Any:
    """The preconditioner as a solve takes it; a name is built by ``named(name)``."""
    if isinstance(preconditioner, str):
        if named is None:
            raise ValueError(
                f"a named preconditioner ({preconditioner!r}) needs the objective: pass "
                "inverse_preconditioners.kfac_preconditioner(...) or a diagonal instead"
            )
        return named(preconditioner)
    if isinstance(preconditioner, Estimate):
        return preconditioner.value
    return preconditioner


def _dispatch(routine, *operands, **static):
    """``routine`` compiled when every callable operand is an :class:`Operator`, else run as
    it is (a plain function would be a constant of the program; see ``compiled``)."""

    def plain_fn(o):
        if isinstance(o, preconditioners.Preconditioner):
            return not isinstance(o.apply, Operator)
        return callable(o) and not isinstance(o, Operator)

    plain = any(plain_fn(o) for o in operands)
    return (routine.__wrapped__ if plain else routine.jitted)(*operands, **static)


@compiled(static=("s",))
def _solve(matvec, b, damping, preconditioner, *, s):
    return _solve_core(matvec, b, damping, preconditioner, s)


@compiled(static=("s",))
def _solve_stack(matvec, bs, damping, preconditioner, *, s):
    one = lambda b: _solve_core(matvec, b, damping, preconditioner, s)
    return jax.vmap(one)(bs)


def solve(
    matvec: MatVec,
    b: PyTree,
    /,
    *,
    damping: float = 0.0,
    method: str = "cg",
    tol: float = 1e-6,
    max_iters: int | None = None,
    preconditioner: PyTree | MatVec | Estimate | None = None,
    restart: int = 20,
) -> Solution:
    """x = (A + λI)⁻¹ b for a symmetric operator ``matvec: v -> A v`` over pytrees.

    Args:
      matvec: A, an :class:`~sharpness_jax.linear_operator.Operator` (compiled once per rule
        and shapes) or a plain function.
      b: the right-hand side, a pytree of the operator's vector space.
      damping: λ ≥ 0.
      method: one of ``SOLVE_METHODS`` (``"cg"`` needs A + λI positive definite).
      tol: relative tolerance of the stopping rule (module docstring).
      max_iters: iteration cap (None: lineax's 10 · P).
      preconditioner: diag(A) as a pytree (or an :class:`Estimate` of it), a
        :class:`~sharpness_jax.inverse_preconditioners.Preconditioner`, or a callable
        ``v -> M⁻¹ v`` (module docstring).
      restart: GMRES's restart length (vectors stored).

    Returns:
      :class:`Solution`; a solve that does not converge has ``converged`` False.
    """
    s = _settings(method, tol, max_iters, restart)
    _check_template(b)
    pre = _unwrap_preconditioner(preconditioner)
    return _dispatch(_solve, matvec, b, _damping(damping, b), pre, s=s)
