"""The loss curvature on the quotient of a shallow net: reduced and generalised spectra, and
the regular set where they are defined (Dong & Cheng 2026).

The vertical space V, the horizontal space W (with its ``metric=``), its orthonormal basis B and
the realisation metric G = JᵀJ/n are those of :mod:`sharpness_jax.quotient`; H = ∇²L is the
Hessian of the MEAN loss. :func:`quotient_spectra` gives the ambient spectrum eig(H), the
reduced one eig(Bᵀ H B) and the generalised one Bᵀ H B y = λ Bᵀ G B y; :func:`regularity`
checks that θ lies in the regular set (ker J = V).

Which spectra are invariant under the symmetries, and why
---------------------------------------------------------
Let φ(θ) = D_c θ be a rescaling (D_c diagonal: c_i^{−k} on a_i, c_i on w_i and b_i). Then
L∘φ = L and F_X∘φ = F_X, so, with θ' = D_c θ,

    H(θ) = D_c H(θ') D_c,   G(θ) = D_c G(θ') D_c,   V(θ') = D_c V(θ).

Since D_c is not orthogonal,

* the ambient spectrum of H is NOT invariant (λ_max can change by orders of magnitude), and
* the spectrum of Bᵀ H B with B Euclidean-orthonormal (``QuotientSpectra.reduced``) is NOT
  invariant either: the Euclidean metric is not preserved by D_c. What it does guarantee: at a
  critical point (∇L = 0) Bᵀ H B has none of the m "false flat" zero eigenvalues of H along the
  orbit (H v_i = 0 there), and spec(H) = spec(Bᵀ H B) ∪ {0}^m.
* The generalised spectrum of the pencil (Bᵀ H B, Bᵀ G B), i.e. Bᵀ H B y = λ Bᵀ G B y
  (``QuotientSpectra.generalised``), is the curvature of the loss as a function on the quotient
  measured in the realisation metric; it does not depend on the basis B of W. It is invariant
  whenever W moves with the symmetry, W(θ') = D_c W(θ) (then B' = D_c B gives
  B'ᵀ H(θ') B' = Bᵀ H(θ) B and likewise for G):
    - ``metric="scale_invariant"``: N_{θ'} = D_c^{−1} N_θ D_c^{−1}, so W(θ') = D_c W(θ) and
      the generalised spectrum is invariant at EVERY regular point;
    - ``metric="euclidean"``: W(θ') = D_c^{−1} W(θ), not D_c W(θ). Differentiating
      ⟨∇L(θ), v_i(θ)⟩ = 0 gives H v_i = −A_i ∇L (A_i = d v_i/dθ, diagonal), so at a critical
      point H and G both vanish on V, the pencil on ANY complement of V is the same, and the
      generalised spectrum is invariant; away from critical points it is not.
  For ½‖f − y‖² at an interpolating minimum H = G, so every generalised eigenvalue is 1. The
  same holds at EVERY critical point (with all a_i ≠ 0) of ½‖f − y‖² for piecewise-linear σ
  (ReLU, leaky ReLU) with scalar outputs: ∇²f_p has only a_i–(w_i, b_i) cross blocks, and their
  residual-weighted sum (1/n) Σ_p r_p σ'(z_pi) (x_p, 1) equals ∇_{(w_i, b_i)}L / a_i = 0. A
  non-trivial pencil needs K ≥ 2, a curved σ, or another loss.
  Permutations of units are orthogonal and map V and W to themselves: every spectrum here is
  permutation invariant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sharpness_jax import checks, linalg, operators, quotient
from sharpness_jax.objective import Batch, Loss, Objective
from sharpness_jax.shallow import check_shallow, get_activation, shallow_predict

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "QuotientSpectra",
    "Regularity",
    "horizontal_hessian",
    "quotient_spectra",
    "reduced_hessian",
    "reduced_realisation_metric",
    "regularity",
    "shallow_objective",
]


class Regularity(NamedTuple):
    """Checks of the regular set (where the quotient is a manifold and ker J = V).

    Attributes:
      a_nonzero: ``(m,)`` ‖a_i‖ > rtol_units · max_j ‖a_j‖.
      w_nonzero: ``(m,)`` ‖w_i‖ > rtol_units · max_j ‖w_j‖.
      duplicated: ``(m,)`` unit i computes the same function as another unit up to the
        symmetries (see :func:`regularity`).
      singular_values: singular values of J = ∂F_X/∂θ, descending.
      rank: numerical rank of J, #{s_j > rank_rtol · s_1}.
      expected_rank: P − dim V.
      is_regular: all units non-zero, none duplicated and rank == expected_rank.
    """

    a_nonzero: jax.Array
    w_nonzero: jax.Array
    duplicated: jax.Array
    singular_values: jax.Array
    rank: jax.Array
    expected_rank: jax.Array
    is_regular: jax.Array


class QuotientSpectra(NamedTuple):
    """Dense spectra of the loss Hessian, ambient and symmetry-reduced (all descending).

    Attributes:
      ambient: ``(P,)`` eigenvalues of H = ∇²L.
      reduced: ``(P − m_V,)`` eigenvalues of Bᵀ H B, B an orthonormal basis of W. Not
        invariant under rescalings (see the module docstring).
      generalised: ``(P − m_V,)`` generalised eigenvalues of Bᵀ H B y = λ (Bᵀ G B + ε I) y,
        G = JᵀJ/n, ε = ``damping``: the quotient curvature in the realisation metric,
        invariant under rescalings (``scale_invariant``: everywhere; ``euclidean``: at
        critical points).
      vertical_dim: m_V, the number of removed (vertical) directions.
    """

    ambient: jax.Array
    reduced: jax.Array
    generalised: jax.Array
    vertical_dim: int


def regularity(
    params: PyTree,
    inputs: jax.Array,
    *,
    activation: str,
    rank_rtol: float | None = None,
    unit_rtol: float | None = None,
    duplicate_tol: float | None = None,
    chunk_size: int | None = None,
) -> Regularity:
    """Checks that θ lies in the regular set for the inputs X.

    * a_i ≠ 0 and w_i ≠ 0: norms above ``unit_rtol`` times the largest over units
      (default 100 · eps).
    * no duplicated units: with u_i = (w_i, b_i), unit i duplicates j ≠ i when
      ‖û_i − û_j‖ ≤ tol (û = u/‖u‖) for ReLU / leaky ReLU (same direction ⇒ proportional
      functions), min(‖û_i − û_j‖, ‖û_i + û_j‖) ≤ tol for the even quadratic, and
      min(‖u_i − u_j‖, ‖u_i + u_j‖) ≤ tol · max(‖u_i‖, ‖u_j‖) for the odd tanh (no rescaling).
      Default tol = √eps.
    * rank J = P − dim V with the numerical rank #{s_j > rank_rtol · s_1} of the singular
      values of the dense J (default rank_rtol = max(nK, P) · eps, numpy's choice).

    Returns:
      :class:`Regularity`.
    """
    m, k = check_shallow(params, activation=activation)
    dtype = jnp.result_type(params["w"])
    eps = float(jnp.finfo(dtype).eps)
    unit_rtol = 100.0 * eps if unit_rtol is None else unit_rtol
    duplicate_tol = float(np.sqrt(eps)) if duplicate_tol is None else duplicate_tol
    jac = quotient.realisation_jacobian(
        params, inputs, activation=activation, chunk_size=chunk_size
    )
    rank_rtol = max(jac.shape) * eps if rank_rtol is None else rank_rtol

    a_norm = jnp.linalg.norm(params["a"], axis=1)
    w_norm = jnp.linalg.norm(params["w"], axis=1)
    a_nonzero = a_norm > unit_rtol * jnp.max(a_norm)
    w_nonzero = w_norm > unit_rtol * jnp.max(w_norm)

    u = params["w"]
    if "b" in params:
        u = jnp.concatenate([u, params["b"][:, None]], axis=1)
    u_norm = jnp.linalg.norm(u, axis=1)
    if k is not None:
        u = u / jnp.where(u_norm > 0, u_norm, 1.0)[:, None]
        scale = jnp.ones((m, m), dtype)
    else:
        scale = jnp.maximum(u_norm[:, None], u_norm[None, :])
    diff = jnp.linalg.norm(u[:, None, :] - u[None, :, :], axis=2)
    if get_activation(activation).parity is not None:  # odd or even σ: u and −u alike
        diff = jnp.minimum(diff, jnp.linalg.norm(u[:, None, :] + u[None, :, :], axis=2))
    close = (diff <= duplicate_tol * scale) & ~jnp.eye(m, dtype=bool)
    duplicated = jnp.any(close, axis=1)

    singular_values = jnp.linalg.svd(jac, compute_uv=False)
    rank = jnp.sum((singular_values > rank_rtol * singular_values[0]).astype(jnp.int32))
    valid = quotient.vertical_basis(params, activation=activation, rtol=100.0 * eps).valid
    expected = jac.shape[1] - jnp.sum(valid.astype(jnp.int32))
    is_regular = jnp.all(a_nonzero) & jnp.all(w_nonzero) & ~jnp.any(duplicated) & (rank == expected)
    return Regularity(a_nonzero, w_nonzero, duplicated, singular_values, rank, expected, is_regular)


# --------------------------------------------------------------- symmetry-reduced Hessian


def shallow_objective(loss: Loss, *, activation: str) -> Objective:
    """The :class:`Objective` of the shallow net with this activation and per-example loss.

    The loss-dependent functions below take an objective whose ``predict`` must be this
    shallow net with the SAME activation as their ``activation`` argument.
    """
    get_activation(activation)
    return Objective(functools.partial(shallow_predict, activation=activation), loss)


def horizontal_hessian(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    activation: str,
    metric: str = "euclidean",
    rtol: float | None = None,
    chunk_size: int | None = None,
) -> MatVec:
    """Q H Q v, the loss Hessian H = ∇²L (mean over examples) restricted to W, matrix-free.

    Q is ``quotient.horizontal_projector``. Its spectrum is the reduced spectrum (that of Bᵀ H B)
    plus dim V zeros, so Lanczos on it returns the top reduced eigenvalues directly.
    """
    check_shallow(params, activation=activation)
    proj = quotient.horizontal_projector(params, activation=activation, metric=metric, rtol=rtol)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    return lambda v: proj(hvp(proj(v)))


def _dense_hessian(objective, params, batch, chunk_size):
    return linalg.dense(operators.hessian(objective, params, batch, chunk_size=chunk_size), params)


def reduced_hessian(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    activation: str,
    metric: str = "euclidean",
    rtol: float | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Dense Bᵀ H B, ``(P − m_V, P − m_V)``, B = ``quotient.horizontal_basis``, H = ∇²L (mean)."""
    basis = quotient.horizontal_basis(params, activation=activation, metric=metric, rtol=rtol)
    return basis.T @ _dense_hessian(objective, params, batch, chunk_size) @ basis


def reduced_realisation_metric(
    params: PyTree,
    inputs: jax.Array,
    *,
    activation: str,
    metric: str = "euclidean",
    rtol: float | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Dense Bᵀ G B with G = JᵀJ/n; positive definite on the regular set."""
    basis = quotient.horizontal_basis(params, activation=activation, metric=metric, rtol=rtol)
    return _reduced_metric(params, inputs, basis, activation, chunk_size)


def _reduced_metric(params, inputs, basis, activation, chunk_size):
    """Bᵀ G B with G = JᵀJ/n, J the realisation Jacobian on ``inputs``."""
    jac = quotient.realisation_jacobian(
        params, inputs, activation=activation, chunk_size=chunk_size
    )
    jb = jac @ basis
    return jb.T @ jb / checks.num_examples(inputs)


def _descending_eigvalsh(a: jax.Array) -> jax.Array:
    return jnp.linalg.eigvalsh(0.5 * (a + a.T))[::-1]


def _generalised_eigvalsh(a: jax.Array, b: jax.Array) -> jax.Array:
    """Eigenvalues of a y = λ b y (b positive definite) via b = LLᵀ: eig(L⁻¹ a L⁻ᵀ)."""
    chol = jnp.linalg.cholesky(0.5 * (b + b.T))
    x = jax.scipy.linalg.solve_triangular(chol, a, lower=True)
    c = jax.scipy.linalg.solve_triangular(chol, x.T, lower=True)
    return _descending_eigvalsh(c)


def quotient_spectra(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    activation: str,
    metric: str = "euclidean",
    damping: float = 0.0,
    rtol: float | None = None,
    chunk_size: int | None = None,
) -> QuotientSpectra:
    """Ambient, reduced and generalised (realisation-metric) spectra of the loss Hessian.

    H = ∇²L with L the MEAN loss, G = JᵀJ/n, B = ``quotient.horizontal_basis``:

    * ambient: eig(H), P values;
    * reduced: eig(Bᵀ H B), P − m_V values — no "false flat" zeros along orbits at critical
      points, but NOT rescaling invariant;
    * generalised: Bᵀ H B y = λ (Bᵀ G B + ε I) y — rescaling invariant (with ε = 0; for
      ``"scale_invariant"`` at every regular point, for ``"euclidean"`` at critical points;
      see the module docstring). Bᵀ G B must be positive definite (regular set, nK ≥ P − m_V);
      otherwise the values are NaN unless ``damping`` ε > 0.

    Dense: P Hessian-vector products and O(P³) work, for small shallow nets.

    Returns:
      :class:`QuotientSpectra`.
    """
    m, k = check_shallow(params, activation=activation)
    if not damping >= 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    if not isinstance(batch, Batch):
        batch = Batch(*batch)
    basis = quotient.horizontal_basis(params, activation=activation, metric=metric, rtol=rtol)
    hess = _dense_hessian(objective, params, batch, chunk_size)
    h_red = basis.T @ hess @ basis
    g_red = _reduced_metric(params, batch.inputs, basis, activation, chunk_size)
    if damping:
        g_red = g_red + damping * jnp.eye(g_red.shape[0], dtype=g_red.dtype)
    return QuotientSpectra(
        ambient=_descending_eigvalsh(hess),
        reduced=_descending_eigvalsh(h_red),
        generalised=_generalised_eigvalsh(h_red, g_red),
        vertical_dim=0 if k is None else m,
    )
