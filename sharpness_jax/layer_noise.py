"""One layer's SGD noise and curvature, exactly and batched: the dense blocks C_SS and H_SS of a
layer S, E_p[(h_p)_SS²] in the Hessian eigenbasis and the coordinates, the power-law fits of
all of them in one batched call, and the commutator of C and H against its rotation baseline.

Built on :mod:`sharpness_jax.noise` (``gradient_covariance_dense``, the second-moment
diagonal and quadratic forms, ``fit_power_law``, ``relative_commutator``,
``rotation_baseline``); the functions are jit-compatible and not jitted here (a caller jits
them where it runs them, e.g. ``experiments/studies/noise_curvature.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sharpness_jax import comparisons, linalg, noise, operators, power_law, second_moment, subsets
from sharpness_jax.objective import Batch, Objective

__all__ = [
    "FITS",
    "FIT_FIELDS",
    "commutation",
    "fit_pairs",
    "layer_quantities",
    "num_eigen",
    "power_law_fits",
]

PyTree = Any

# The fits of a layer analysis: name -> (x key, y key, description).
FITS = {
    "eigen": ("eigenvalues", "c_eigen", "v_iᵀCv_i ∝ λ_i^γ (top N)"),
    "eigen_second_moment": ("eigenvalues", "e_eigen", "v_iᵀE[h²]v_i ∝ λ_i^γ (top N)"),
    "eigen_c_vs_second_moment": ("e_eigen", "c_eigen", "v_iᵀCv_i ∝ (v_iᵀE[h²]v_i)^γ (top N)"),
    "coordinate": ("h_diag", "c_diag", "C_ii ∝ H_ii^γ"),
    "coordinate_second_moment": ("h_diag", "e_diag", "E[h²]_ii ∝ H_ii^γ"),
    "coordinate_c_vs_second_moment": ("e_diag", "c_diag", "C_ii ∝ (E[h²]_ii)^γ"),
}
FIT_FIELDS = ("gamma", "intercept", "r2", "ci_low", "ci_high", "num_used")


def num_eigen(num_params: int, fraction: float) -> int:
    """N = round(fraction · P), at least 2 (a fit needs two points) and at most P."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"eigen_fraction must lie in (0, 1], got {fraction!r}")
    return int(min(num_params, max(2, round(fraction * num_params))))


def layer_quantities(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    layer: str,
    num_eigen: int,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
) -> dict[str, jax.Array]:
    """C, H and E_p[h_p²] of one layer, exactly, in the Hessian eigenbasis and the coordinates.

    All matrices are those of the objective restricted to ``layer`` (the diagonal blocks
    C_SS, H_SS and E_p[(h_p)_SS²]); means over the n examples of ``batch``. Jit-compatible
    (``objective``, ``layer`` and the sizes static).

    Args:
      objective, params, batch: the trained model and the examples.
      layer: the parameter selector of the layer (see :mod:`sharpness_jax.subsets`).
      num_eigen: N, the Hessian eigenvectors (largest eigenvalues first) for v_iᵀE_p[h_p²]v_i.
      chunk_size: examples per chunk; basis_chunk_size: basis (or eigen-) vectors per chunk.

    Returns:
      ``h`` and ``c`` (the dense P × P matrices, flat ``ravel_pytree`` basis),
      ``eigenvalues`` λ_i (all P, descending), ``c_eigen`` = v_iᵀ C v_i (all P),
      ``e_eigen`` = v_iᵀ E_p[h_p²] v_i = (1/n) Σ_p ‖h_p v_i‖² (top N), and the diagonals
      ``h_diag``, ``c_diag``, ``e_diag`` = (1/n) Σ_p Σ_j (h_p)_ij².
    """
    sub = subsets.select(params, layer)
    h_matvec = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=layer)
    h = linalg.dense(h_matvec, sub, chunk_size=basis_chunk_size)
    h = (h + h.T) / 2  # symmetric up to rounding; eigh reads one triangle
    c = noise.gradient_covariance_dense(
        objective, params, batch, chunk_size=chunk_size, subset=layer
    )
    e_diag = ravel_pytree(
        second_moment.hessian_second_moment_diagonal(
            objective,
            params,
            batch,
            chunk_size=chunk_size,
            basis_chunk_size=basis_chunk_size,
            subset=layer,
        )
    )[0]
    values, vectors = jnp.linalg.eigh(h)
    values, vectors = values[::-1], vectors[:, ::-1]
    c_eigen = jnp.sum(vectors * jnp.matmul(c, vectors, precision=jax.lax.Precision.HIGHEST), 0)
    # v_iᵀ E_p[h_p²] v_i, ``basis_chunk_size`` vectors at a time (memory ~ chunk_size ·
    # basis_chunk_size · P, as for the diagonal); zero vectors pad the last block.
    _, unravel = ravel_pytree(sub)
    block = num_eigen if basis_chunk_size is None else min(basis_chunk_size, num_eigen)
    num_blocks = -(-num_eigen // block)
    top = jnp.zeros((num_blocks * block, values.shape[0]), values.dtype)
    top = top.at[:num_eigen].set(vectors[:, :num_eigen].T)

    def forms(rows):
        return second_moment.hessian_second_moment_quadratic_forms(
            objective, params, batch, jax.vmap(unravel)(rows), chunk_size=chunk_size, subset=layer
        )

    e_eigen = jax.lax.map(forms, top.reshape(num_blocks, block, -1)).reshape(-1)[:num_eigen]
    return {
        "h": h,
        "c": c,
        "eigenvalues": values,
        "c_eigen": c_eigen,
        "e_eigen": e_eigen,
        "h_diag": jnp.diagonal(h),
        "c_diag": jnp.diagonal(c),
        "e_diag": e_diag,
    }


def fit_pairs(
    quantities: dict[str, Any], *, num_eigen: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs of every fit of ``FITS``, stacked and padded with NaN.

    The eigenbasis fits take the top ``num_eigen`` eigenpairs, the coordinate fits all P
    coordinates; each row is padded with NaN to ``length`` ≥ P (default P), which
    :func:`power_law.fit_power_law` excludes, so that one program fits every row of every layer.

    Returns:
      ``(xs, ys)``, each ``(len(FITS), length)``.
    """
    size = int(np.shape(quantities["h_diag"])[0])
    length = size if length is None else length
    if length < size:
        raise ValueError(f"length={length} is below the number of parameters {size}")
    xs = np.full((len(FITS), length), np.nan, np.asarray(quantities["h_diag"]).dtype)
    ys = np.full_like(xs, np.nan)
    for row, (name, (x_name, y_name, _)) in enumerate(FITS.items()):
        count = num_eigen if name.startswith("eigen") else size
        xs[row, :count] = np.asarray(quantities[x_name])[:count]
        ys[row, :count] = np.asarray(quantities[y_name])[:count]
    return xs, ys


def power_law_fits(
    xs: jax.Array, ys: jax.Array, *, key: jax.Array, num_resamples: int
) -> dict[str, jax.Array]:
    """:func:`power_law.fit_power_law` on every row of :func:`fit_pairs`: the fits
    ``power_law.eigenbasis_power_law`` and ``power_law.diagonal_power_law`` make (the NaN padding is
    excluded; the bootstrap draws depend on the padded length).

    Returns:
      ``<fit>/<field>`` for every fit of ``FITS`` and every field of
      :class:`power_law.PowerLawFit` but the exclusion counts.
    """
    fits = jax.vmap(
        lambda x, y, k: power_law.fit_power_law(x, y, key=k, num_resamples=num_resamples)
    )(xs, ys, jax.random.split(key, len(FITS)))
    return {
        f"{name}/{field}": getattr(fits, field)[i]
        for i, name in enumerate(FITS)
        for field in FIT_FIELDS
    }


def commutation(
    c: jax.Array, h: jax.Array, *, key: jax.Array, num_rotations: int
) -> dict[str, jax.Array]:
    """‖CH − HC‖_F / ‖CH‖_F and its Haar-rotation baseline, as
    ``comparisons.noise_curvature_commutation`` computes them, from the dense C and H (both
    symmetric: the products use BA = (AB)ᵀ, ``symmetric=True``)."""
    baseline = comparisons.rotation_baseline(
        c, h, key=key, num_rotations=num_rotations, symmetric=True
    )
    return {
        "relative_commutator": comparisons.relative_commutator(c, h, symmetric=True),
        "baseline_values": baseline.values,
        "baseline_mean": baseline.mean,
        "baseline_std": baseline.std,
    }
