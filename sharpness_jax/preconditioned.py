"""Preconditioned sharpness λ_max(P⁻¹H) and the gradient of λ_max.

* Preconditioned sharpness. An adaptive method's step is θ ← θ − η P⁻¹ m with a diagonal
  preconditioner P; its stability is governed by λ_max(P⁻¹H) = λ_max(P^{-1/2} H P^{-1/2})
  (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"). For Adam,
  P = diag(√ν̂ + ε) with ν̂ = ν/(1 − β₂ᵗ) the bias-corrected second-moment estimate, and with
  momentum β₁ the preconditioned sharpness equilibrates at the adaptive edge of stability
  (2 + 2β₁)/((1 − β₁) η) = 38/η for β₁ = 0.9 (:func:`adaptive_stability_threshold`).
  :func:`adam_preconditioner` reads P from an optax state, :func:`preconditioned_lambda_max`
  runs Lanczos on the symmetric operator P^{-1/2} H P^{-1/2}.
* The gradient of λ_max. For a simple top eigenvalue with unit eigenvector u,
  ∇_θ λ_max = ∇_θ (uᵀ H(θ) u) with u held fixed (Hellmann–Feynman): the third derivative of L
  contracted twice with u, one reverse pass over a Hessian-vector product
  (:func:`lambda_max_gradient`). Self-stabilisation (Damian et al. 2023) moves θ along
  −∇λ_max.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpness_jax import checks, linalg, operators, sharpness
from sharpness_jax.linalg import Eigen
from sharpness_jax.linear_operator import operator
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "LambdaMaxGradient",
    "adam_preconditioner",
    "adaptive_stability_threshold",
    "lambda_max_gradient",
    "preconditioned_lambda_max",
]


def adaptive_stability_threshold(learning_rate: float, b1: float) -> float:
    """(2 + 2β₁)/((1 − β₁) η): where Adam's preconditioned sharpness settles (Cohen et al.
    2022, §3; 38/η for β₁ = 0.9)."""
    checks.check_positive_scalar("learning_rate", learning_rate)
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"b1 must be in [0, 1), got {b1!r}")
    return (2.0 + 2.0 * b1) / ((1.0 - b1) * learning_rate)


def _find_adam_state(state: Any) -> optax.ScaleByAdamState | None:
    if isinstance(state, optax.ScaleByAdamState):
        return state
    if isinstance(state, tuple | list):
        for s in state:
            found = _find_adam_state(s)
            if found is not None:
                return found
    inner = getattr(state, "inner_state", None)
    return None if inner is None else _find_adam_state(inner)


def adam_preconditioner(
    opt_state: Any, *, b2: float = 0.999, eps: float = 1e-8, bias_correction: bool = True
) -> PyTree:
    """diag(P) = √ν̂ + ε from the ``optax.scale_by_adam`` state inside ``opt_state``.

    Args:
      opt_state: an optax state holding a ``ScaleByAdamState`` (``optax.adam``, a chain).
      b2, eps: the optimiser's β₂ and ε (optax does not keep them in the state).
      bias_correction: divide ν by 1 − β₂ᵗ as Adam's update does.

    Raises:
      ValueError: when the state holds no Adam second-moment estimate.
    """
    adam = _find_adam_state(opt_state)
    if adam is None:
        raise ValueError(
            "opt_state holds no optax.ScaleByAdamState (build the optimiser with optax.adam "
            "or optax.scale_by_adam)"
        )
    count = adam.count
    correction = 1.0 - b2 ** count.astype(jnp.float32) if bias_correction else 1.0

    def diag(nu):
        return jnp.sqrt(nu / jnp.asarray(correction, nu.dtype)) + eps

    return jax.tree_util.tree_map(diag, adam.nu)


def _whitened(h, inv_sqrt, v):
    scaled = jax.tree_util.tree_map(jnp.multiply, inv_sqrt, v)
    return jax.tree_util.tree_map(jnp.multiply, inv_sqrt, h(scaled))


def preconditioned_lambda_max(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    preconditioner: PyTree,
    *,
    k: int = 1,
    num_iters: int = sharpness.DEFAULT_LANCZOS_ITERS,
    tol: float | None = sharpness.DEFAULT_LANCZOS_TOL,
    init: PyTree | None = None,
    chunk_size: int | None = None,
) -> Eigen:
    """Top eigenpairs of P⁻¹H through the symmetric P^{-1/2} H P^{-1/2}.

    Args:
      preconditioner: diag(P) > 0, shaped like ``params`` (e.g. :func:`adam_preconditioner`).

    Returns:
      :class:`~sharpness_jax.linalg.Eigen` of P^{-1/2} H P^{-1/2}: the values are those of
      P⁻¹H; an eigenvector w of the symmetric form gives P⁻¹H's as P^{-1/2} w.
    """
    checks.check_vector(preconditioner, params, name="preconditioner")
    leaves = jax.tree_util.tree_leaves(preconditioner)
    concrete = [checks.concrete_value(a) for a in leaves]
    if all(c is not None for c in concrete) and not all((c > 0).all() for c in concrete):
        raise ValueError("the preconditioner diag(P) must be positive everywhere")
    h = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    inv_sqrt = jax.tree_util.tree_map(lambda p: 1.0 / jnp.sqrt(p), preconditioner)
    return linalg.lanczos_top_k(
        operator(_whitened, h, inv_sqrt), params, k=k, num_iters=num_iters, tol=tol, init=init
    )


class LambdaMaxGradient(NamedTuple):
    """λ_max(H), its gradient ∇_θ λ_max (a pytree like θ) and the unit eigenvector used."""

    value: jax.Array
    gradient: PyTree
    eigenvector: PyTree


def _rayleigh_gradient(objective, params, batch, u, *, chunk_size):

    def rayleigh(p):
        hu = operators._hessian_product(
            objective, p, batch, u, chunk_size=chunk_size, method="fwd_rev"
        )
        return optax.tree.vdot(u, hu)

    return jax.value_and_grad(rayleigh)(params)


_rayleigh_gradient_jit = jax.jit(_rayleigh_gradient, static_argnames=("chunk_size",))


def lambda_max_gradient(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    eigenvector: PyTree | None = None,
    num_iters: int = 100,
    tol: float | None = 1e-8,
    chunk_size: int | None = None,
) -> LambdaMaxGradient:
    """∇_θ λ_max(H(θ)) = ∇_θ (uᵀH(θ)u) at the top unit eigenvector u (held fixed).

    Exact when λ_max is simple and u is its eigenvector; the eigenvector comes from a tight
    Lanczos run unless given. Costs one reverse pass over a Hessian-vector product (about two
    HVPs).

    Args:
      eigenvector: u, shaped like ``params`` (normalised here); default: computed.
      num_iters, tol: Lanczos settings for u.
    """
    batch = operators._as_batch(batch)
    operators.prepare(objective, params, batch, chunk_size=chunk_size)
    if eigenvector is None:
        eig = sharpness.hessian_top_k(
            objective, params, batch, k=1, num_iters=num_iters, tol=tol, chunk_size=chunk_size
        )
        eigenvector = jax.tree_util.tree_map(lambda a: a[0], eig.vectors)
    checks.check_vector(eigenvector, params, name="eigenvector")
    u = optax.tree.scale(1.0 / optax.tree.norm(eigenvector), eigenvector)
    value, grad = _rayleigh_gradient_jit(objective, params, batch, u, chunk_size=chunk_size)
    return LambdaMaxGradient(value, grad, u)
