"""PAC-Bayes bounds with a Fisher-shaped Gaussian posterior (study 1, standard form).

The posterior Q = N(θ, ρ (F + εI)⁻¹) around the trained parameters and a data-independent
prior P = N(μ, σ_p² I) give, with probability ≥ 1 − δ over n examples (McAllester / Maurer,
losses in [0, 1]) and the second-order expansion E_Q[L̂] ≈ L̂ + (ρ/2) S_R,

    L ≤ L̂ + (ρ/2) S_R + sqrt((KL(Q‖P) + ln(2√n/δ)) / (2n)),

with S_R = tr(F⁻¹H) the Riemannian sharpness (:mod:`sharpness_jax.riemannian`).

* :func:`fisher_posterior_kl`: KL(Q‖P) in closed form from the eigenvalues of F;
* :func:`pac_bayes_bound`: the bound's terms from L̂, S_R and the KL;
* :func:`fisher_pac_bayes_bound`: every term computed from the model (small P);
* :func:`pac_bayes_grid` / :func:`pac_bayes_terms`: the bound on a grid of (ρ, σ_p²) with the
  diagonal Fisher, and its terms at the grid point that minimises it (a union bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, fisher_metrics, linalg, operators, riemannian
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "PacBayesBound",
    "fisher_pac_bayes_bound",
    "fisher_posterior_kl",
    "pac_bayes_bound",
    "pac_bayes_grid",
    "pac_bayes_terms",
]


def fisher_posterior_kl(
    params: PyTree,
    fisher_eigenvalues: PyTree,
    *,
    rho: float,
    prior_variance: float,
    damping: float = 0.0,
    prior_mean: PyTree | None = None,
) -> jax.Array:
    """KL(N(θ, ρ (F + εI)⁻¹) ‖ N(μ, σ_p² I)) in closed form.

    With λ_i the eigenvalues of F (for a diagonal F, its diagonal entries) and
    r_i = ρ / (σ_p² (λ_i + ε)) the posterior-to-prior variance ratios,

        KL = ½ [ Σ_i r_i − P − Σ_i ln r_i + ‖θ − μ‖² / σ_p² ].

    It is +∞ when some λ_i + ε ≤ 0 (the posterior covariance does not exist).

    Args:
      params: the posterior mean θ.
      fisher_eigenvalues: the P eigenvalues of F as a flat array, or a pytree of a diagonal
        F's entries (anything that ravels to P numbers).
      rho: ρ > 0, the posterior scale.
      prior_variance: σ_p² > 0.
      damping: ε ≥ 0.
      prior_mean: μ, a pytree like ``params`` (default 0).
    """
    checks.check_positive_scalar("rho", rho)
    checks.check_positive_scalar("prior_variance", prior_variance)
    checks.check_nonnegative_scalar("damping", damping)
    theta = ravel_pytree(params)[0]
    lam = ravel_pytree(fisher_eigenvalues)[0].astype(theta.dtype)
    if lam.shape != theta.shape:
        raise ValueError(f"need P={theta.size} Fisher eigenvalues, got {lam.size}")
    if prior_mean is not None:
        checks.check_vector(prior_mean, params, name="prior_mean")
        theta = theta - ravel_pytree(prior_mean)[0]
    lam = lam + damping
    ok = jnp.all(lam > 0)
    ratio = rho / (prior_variance * jnp.where(lam > 0, lam, 1))
    kl = 0.5 * (
        jnp.sum(ratio) - theta.size - jnp.sum(jnp.log(ratio)) + jnp.sum(theta**2) / prior_variance
    )
    return jnp.where(ok, kl, jnp.inf)


class PacBayesBound(NamedTuple):
    """The terms of L ≤ L̂ + (ρ/2) S_R + sqrt((KL + ln(2√n/δ)) / (2n)).

    Attributes:
      bound: the total.
      empirical_loss: L̂.
      curvature_term: (ρ/2) S_R.
      kl: KL(posterior ‖ prior).
      log_term: ln(2√n/δ).
      complexity_term: sqrt((KL + ln(2√n/δ)) / (2n)).
      sharpness: S_R used.
      rho: ρ.
      damping: ε used for S_R and the KL.
    """

    bound: jax.Array
    empirical_loss: jax.Array
    curvature_term: jax.Array
    kl: jax.Array
    log_term: jax.Array
    complexity_term: jax.Array
    sharpness: jax.Array
    rho: jax.Array
    damping: jax.Array


def _check_bound_args(rho, n, delta) -> None:
    checks.check_positive_scalar("rho", rho)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    val = checks.concrete_value(delta)
    if val is not None and (val.ndim != 0 or not 0 < val < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


def pac_bayes_bound(
    empirical_loss: jax.Array,
    sharpness: jax.Array,
    kl: jax.Array,
    *,
    rho: float,
    n: int,
    delta: float,
    damping: float = 0.0,
) -> PacBayesBound:
    """PAC-Bayes bound with a Fisher-shaped Gaussian posterior (standard form).

    For the posterior Q = N(θ, ρF⁻¹) and a data-independent prior P, with probability
    ≥ 1 − δ over n examples (McAllester / Maurer form, losses in [0, 1]),

        E_Q[L] ≤ E_Q[L̂] + sqrt((KL(Q‖P) + ln(2√n/δ)) / (2n)),

    and the second-order expansion E_Q[L̂] ≈ L̂(θ) + ½ tr(H ρF⁻¹) = L̂ + (ρ/2) S_R gives

        L ≤ L̂ + (ρ/2) S_R + sqrt((KL + ln(2√n/δ)) / (2n)),

    the form implemented here (S_R = tr(F⁻¹H), or the diagonal Ŝ_R for a diagonal posterior).
    The curvature term is a Taylor approximation, so the total is the bound's standard form
    rather than a certified bound.

    Args:
      empirical_loss: L̂.
      sharpness: S_R computed with the same F (and damping) as the KL.
      kl: KL(Q‖P), e.g. from :func:`fisher_posterior_kl`.
      rho: ρ > 0.
      n: number of training examples, ≥ 1.
      delta: confidence δ ∈ (0, 1).
      damping: ε used for S_R and the KL (recorded in the result).

    Returns:
      :class:`PacBayesBound` with every term.
    """
    _check_bound_args(rho, n, delta)
    empirical_loss = jnp.asarray(empirical_loss)
    dtype = jnp.result_type(empirical_loss)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    empirical_loss = empirical_loss.astype(dtype)
    curvature = 0.5 * rho * jnp.asarray(sharpness, dtype)
    kl = jnp.asarray(kl, dtype)
    log_term = jnp.asarray(math.log(2 * math.sqrt(n)), dtype) - jnp.log(jnp.asarray(delta, dtype))
    complexity = jnp.sqrt((kl + log_term) / (2 * n))
    return PacBayesBound(
        empirical_loss + curvature + complexity,
        empirical_loss,
        curvature,
        kl,
        log_term,
        complexity,
        jnp.asarray(sharpness, dtype),
        jnp.asarray(rho, dtype),
        jnp.asarray(damping, dtype),
    )


def fisher_pac_bayes_bound(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    rho: float,
    prior_variance: float,
    delta: float,
    n: int | None = None,
    metric: str = "diagonal",
    damping: float = 0.0,
    prior_mean: PyTree | None = None,
    chunk_size: int | None = None,
    probe_chunk: int | None = None,
) -> PacBayesBound:
    """:func:`pac_bayes_bound` with every term computed from the model (small P).

    L̂ = ``operators.loss_value`` on ``batch``; posterior N(θ, ρ (F + εI)⁻¹), prior
    N(μ, σ_p² I).

    * ``metric="diagonal"``: F = diag of the empirical Fisher (1/n) Σ_p g_p², S_R = Σ_i H_ii /
      (F_ii + ε) with H's exact diagonal (``riemannian.diagonal_riemannian_sharpness``).
    * ``metric="full"``: F the dense true Fisher, S_R = tr((F + εI)⁻¹ H) with dense H.

    A zero Fisher eigenvalue with ε = 0 makes the KL infinite (and so the bound).

    Args:
      rho, prior_variance, delta, prior_mean, damping: see :func:`fisher_posterior_kl` and
        :func:`pac_bayes_bound`.
      n: training-set size in the bound (default: the batch size).
      metric: ``"diagonal"`` or ``"full"``.
      chunk_size: examples per chunk.
      probe_chunk: basis vectors per batched matvec.
    """
    if metric not in ("diagonal", "full"):
        raise ValueError(f"metric must be 'diagonal' or 'full', got {metric!r}")
    _, _, n_batch = operators.prepare(objective, params, batch, chunk_size=chunk_size)
    n = n_batch if n is None else n
    _check_bound_args(rho, n, delta)
    checks.check_positive_scalar("prior_variance", prior_variance)
    checks.check_nonnegative_scalar("damping", damping)
    loss = operators.loss_value(objective, params, batch, chunk_size=chunk_size)
    if metric == "diagonal":
        f_diag = fisher_metrics.empirical_fisher_diagonal(
            objective, params, batch, chunk_size=chunk_size
        )
        sharp = riemannian.diagonal_riemannian_sharpness(
            objective,
            params,
            batch,
            damping=damping,
            chunk_size=chunk_size,
            probe_chunk=probe_chunk,
        ).value
        eigenvalues = f_diag
    else:
        hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)
        fvp = operators.fisher(objective, params, batch, chunk_size=chunk_size)
        h = linalg.dense(hvp, params, chunk_size=probe_chunk)
        f = linalg.dense(fvp, params, chunk_size=probe_chunk)
        sharp = riemannian.riemannian_sharpness_from_matrices(h, f, damping=damping).trace
        eigenvalues = jnp.linalg.eigvalsh((f + f.T) / 2)
    kl = fisher_posterior_kl(
        params,
        eigenvalues,
        rho=rho,
        prior_variance=prior_variance,
        damping=damping,
        prior_mean=prior_mean,
    )
    return pac_bayes_bound(loss, sharp, kl, rho=rho, n=n, delta=delta, damping=damping)


def pac_bayes_grid(
    params, fisher_diagonal, train_loss, sharpness, rhos, variances, *, n, delta, damping
) -> PacBayesBound:
    """:func:`pac_bayes_bound` at every (ρ_j, σ_j²) of the flat grid (jit-friendly; ``n``,
    ``delta`` and ``damping`` static)."""

    def one(rho, variance):
        kl = fisher_posterior_kl(
            params, fisher_diagonal, rho=rho, prior_variance=variance, damping=damping
        )
        return pac_bayes_bound(
            train_loss, sharpness, kl, rho=rho, n=n, delta=delta, damping=damping
        )

    return jax.vmap(one)(rhos, variances)


def pac_bayes_terms(
    params: Any,
    fisher_diagonal: jax.Array,
    *,
    train_loss: float,
    sharpness: float,
    damping: float,
    n: int,
    delta: float,
    rhos: Sequence[float],
    prior_variances: Sequence[float],
) -> dict[str, float]:
    """The PAC-Bayes bound's terms at the (ρ, σ_p²) of the grid that minimises it.

    L ≤ L̂ + (ρ/2) Ŝ_R,ε + sqrt((KL + ln(2√n/δ')) / (2n)), posterior N(θ, ρ (D + εI)⁻¹),
    prior N(0, σ_p² I), δ' = δ / (grid size) (a union bound over the grid).
    """
    dtype = jnp.asarray(fisher_diagonal).dtype
    rho_grid, var_grid = (a.ravel() for a in np.meshgrid(rhos, prior_variances, indexing="ij"))
    delta_grid = delta / rho_grid.size
    grid = jax.jit(pac_bayes_grid, static_argnames=("n", "delta", "damping"))
    bounds = grid(
        params,
        fisher_diagonal,
        jnp.asarray(train_loss, dtype),
        jnp.asarray(sharpness, dtype),
        jnp.asarray(rho_grid, dtype),
        jnp.asarray(var_grid, dtype),
        n=int(n),
        delta=float(delta_grid),
        damping=float(damping),
    )
    best = int(np.nanargmin(np.asarray(bounds.bound)))
    return {
        "bound": float(bounds.bound[best]),
        "empirical_loss": float(bounds.empirical_loss[best]),
        "curvature_term": float(bounds.curvature_term[best]),
        "complexity_term": float(bounds.complexity_term[best]),
        "kl": float(bounds.kl[best]),
        "log_term": float(bounds.log_term[best]),
        "rho": float(rho_grid[best]),
        "prior_variance": float(var_grid[best]),
        "delta_per_grid_point": float(delta_grid),
    }
