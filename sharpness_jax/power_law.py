"""Power laws y ≈ c · x^γ: the least-squares fit on log-log pairs with a bootstrap interval
(:func:`fit_power_law`), and the two fits of the noise–curvature relation, C_ii ∝ H_ii^γ over
the coordinates (:func:`diagonal_power_law`) and v_iᵀ C v_i ∝ λ_i^γ over the top Hessian
eigenpairs (:func:`eigenbasis_power_law`), each also against E_p[h_p²] instead of C.

C is the SGD-noise covariance (:mod:`sharpness_jax.noise`), E_p[h_p²] the per-example Hessian
second moment (:mod:`sharpness_jax.second_moment`), H the Hessian; all means over the n
examples of the batch, restricted to ``subset`` where one is given. Zhang, Yang & Tu (2026)
report 1 ≤ γ ≤ 2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, linalg, noise, operators, second_moment, subsets
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "PowerLawFit",
    "diagonal_power_law",
    "eigenbasis_power_law",
    "fit_power_law",
]


# --------------------------------------------------------------------------------- helpers


def _hessian(objective, params, batch, chunk_size, subset):
    """``(matvec, template)`` of the exact Hessian of the (restricted) objective."""
    h = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    template = operators.prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)[1]
    return h, template


# ------------------------------------------------------------------------------ power laws


class PowerLawFit(NamedTuple):
    """Least-squares fit of log y = intercept + γ log x (natural logs) over the pairs with
    x > 0 and y > 0, with a bootstrap confidence interval for γ.

    Attributes:
      gamma: the slope γ.
      intercept: log c in y ≈ c x^γ.
      r2: coefficient of determination of the log-log fit.
      ci_low, ci_high: percentile-bootstrap confidence interval for γ.
      num_used: pairs used in the fit.
      num_excluded: pairs excluded (x or y not a positive finite number).
      num_excluded_x: pairs whose x is not a positive finite number.
      num_excluded_y: pairs whose y is not a positive finite number (a pair may count in both).
    """

    gamma: jax.Array
    intercept: jax.Array
    r2: jax.Array
    ci_low: jax.Array
    ci_high: jax.Array
    num_used: jax.Array
    num_excluded: jax.Array
    num_excluded_x: jax.Array
    num_excluded_y: jax.Array


def _weighted_line(lx, ly, w):
    """Weighted least squares of ly on lx: (slope, intercept, r2)."""
    sw = jnp.sum(w)
    mx, my = jnp.sum(w * lx) / sw, jnp.sum(w * ly) / sw
    dx, dy = lx - mx, ly - my
    sxx, syy, sxy = jnp.sum(w * dx * dx), jnp.sum(w * dy * dy), jnp.sum(w * dx * dy)
    slope = sxy / sxx
    return slope, my - slope * mx, sxy * sxy / (sxx * syy)


def fit_power_law(
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    num_resamples: int = 1000,
    level: float = 0.95,
    resample_chunk: int | None = 256,
) -> PowerLawFit:
    """Fits y ≈ c · x^γ by ordinary least squares on (log x, log y).

    Pairs where x or y is not a positive finite number are excluded and counted. The
    confidence interval is the percentile bootstrap: the used pairs are resampled with
    replacement ``num_resamples`` times, γ refitted on each, and the (1 ∓ level)/2 quantiles
    taken (resamples whose log x are all equal are ignored). With fewer than two distinct
    used x the fit is NaN. Works on any data; jit-compatible.

    Args:
      x, y: 1-D arrays of one shape and floating dtype.
      key: PRNG key for the bootstrap.
      num_resamples: bootstrap resamples (≥ 2).
      level: confidence level in (0, 1).
      resample_chunk: resamples evaluated together (bounds memory; None: all).

    Returns:
      :class:`PowerLawFit`.

    Raises:
      ValueError / TypeError: on bad shapes, dtypes, level or resample count.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of one shape, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"a power-law fit needs at least 2 pairs, got {x.size}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) and x.dtype == y.dtype):
        raise TypeError(f"x and y need one floating dtype, got {x.dtype} and {y.dtype}")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 2:
        raise ValueError(f"num_resamples must be an int ≥ 2, got {num_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    checks.check_positive_int("resample_chunk", resample_chunk, optional=True)

    ok_x = jnp.isfinite(x) & (x > 0)
    ok_y = jnp.isfinite(y) & (y > 0)
    valid = ok_x & ok_y
    size = x.size
    num_used = jnp.sum(valid, dtype=jnp.int32)
    lx = jnp.log(jnp.where(valid, x, 1))
    ly = jnp.log(jnp.where(valid, y, 1))
    gamma, intercept, r2 = _weighted_line(lx, ly, valid.astype(x.dtype))

    order = jnp.argsort(~valid, stable=True)  # the used pairs first
    first = (jnp.arange(size, dtype=jnp.int32) < num_used).astype(x.dtype)

    def resample(k):
        pick = order[jax.random.randint(k, (size,), 0, jnp.maximum(num_used, 1), dtype=jnp.int32)]
        return _weighted_line(lx[pick], ly[pick], first)[0]

    keys = jax.random.split(key, num_resamples)
    batch = num_resamples if resample_chunk is None else min(resample_chunk, num_resamples)
    slopes = jax.lax.map(resample, keys, batch_size=batch)
    slopes = jnp.where(jnp.isfinite(slopes), slopes, jnp.nan)
    lo, hi = jnp.nanquantile(slopes, jnp.array([(1 - level) / 2, (1 + level) / 2], x.dtype))
    return PowerLawFit(
        gamma,
        intercept,
        r2,
        lo,
        hi,
        num_used,
        jnp.int32(size) - num_used,
        jnp.sum(~ok_x, dtype=jnp.int32),
        jnp.sum(~ok_y, dtype=jnp.int32),
    )


_AGAINST = ("covariance", "second_moment")


def _check_against(against: str) -> None:
    if against not in _AGAINST:
        raise ValueError(f"against must be one of {_AGAINST}, got {against!r}")


def diagonal_power_law(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    against: str = "covariance",
    num_resamples: int = 1000,
    level: float = 0.95,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> PowerLawFit:
    """γ in C_ii ∝ H_ii^γ over the coordinates (or E_p[h_p²]_ii ∝ H_ii^γ), exactly computed
    diagonals fitted by :func:`fit_power_law`.

    Coordinates with H_ii ≤ 0 (or a non-positive C_ii / E_p[h_p²]_ii) are excluded and
    counted.

    Args:
      against: ``"covariance"`` (y = diag C, x = diag H by :func:`linalg.diagonal_exact`,
        P Hessian-vector products) or ``"second_moment"`` (y = diag E_p[h_p²], the
        prediction of the activity–weight duality; x and y from one pass over per-example
        Hessian rows).
      restricted: for ``"second_moment"`` with a subset, see
        :func:`second_moment.hessian_second_moment_diagonal`.
    """
    _check_against(against)
    if against == "covariance":
        y = noise.gradient_covariance_diagonal(
            objective, params, batch, chunk_size=chunk_size, subset=subset
        )
        h, template = _hessian(objective, params, batch, chunk_size, subset)
        x = linalg.diagonal_exact(h, template, chunk_size=basis_chunk_size)
    else:
        y, x = second_moment.second_moment_and_hessian_diagonals(
            objective,
            params,
            batch,
            chunk_size=chunk_size,
            basis_chunk_size=basis_chunk_size,
            subset=subset,
            restricted=restricted,
        )
    return fit_power_law(
        ravel_pytree(x)[0], ravel_pytree(y)[0], key=key, num_resamples=num_resamples, level=level
    )


def eigenbasis_power_law(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_eigen: int | None = None,
    eigen: linalg.Eigen | None = None,
    against: str = "covariance",
    num_iters: int | None = None,
    tol: float | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> PowerLawFit:
    """γ in v_iᵀ C v_i ∝ λ_i^γ over the top Hessian eigenpairs (H v_i = λ_i v_i), as in the
    noise–curvature code (per layer: the top eigendirections of one layer's Hessian block).

    The eigenpairs are ``eigen`` if given (eigenpairs of the Hessian of the objective
    restricted to ``subset``, vectors shaped like the sub-params: computed with the template
    ``subsets.select(params, subset)``), else the top ``num_eigen`` by
    :func:`linalg.lanczos_top_k` on the exact Hessian (``num_iters`` default
    min(P, 2·num_eigen + 20)). v_iᵀ C v_i is :func:`noise.gradient_covariance_quadratic_forms`, or
    v_iᵀ E_p[h_p²] v_i (:func:`second_moment.hessian_second_moment_quadratic_forms`) with
    ``against="second_moment"``. Eigenpairs with λ_i ≤ 0 are excluded and counted.
    """
    _check_against(against)
    if (eigen is None) == (num_eigen is None):
        raise ValueError("give exactly one of num_eigen (compute the eigenpairs) and eigen")
    key, lanczos_key = jax.random.split(key)
    if eigen is None:
        checks.check_positive_int("num_eigen", num_eigen)
        h, template = _hessian(objective, params, batch, chunk_size, subset)
        size = sum(a.size for a in jax.tree_util.tree_leaves(template))
        iters = min(size, 2 * num_eigen + 20) if num_iters is None else num_iters
        eigen = linalg.lanczos_top_k(
            h, template, k=num_eigen, num_iters=iters, key=lanczos_key, tol=tol
        )
    if against == "covariance":
        y = noise.gradient_covariance_quadratic_forms(
            objective, params, batch, eigen, chunk_size=chunk_size, subset=subset
        )
    else:
        y = second_moment.hessian_second_moment_quadratic_forms(
            objective,
            params,
            batch,
            eigen,
            chunk_size=chunk_size,
            subset=subset,
            restricted=restricted,
        )
    return fit_power_law(eigen.values, y, key=key, num_resamples=num_resamples, level=level)
