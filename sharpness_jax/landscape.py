"""Loss-landscape slices: L(θ + αu + βv) on a grid, exactly, along chosen directions.

Directions (pytrees shaped like the params):

* :func:`filter_normalised_direction` — a Gaussian direction rescaled filter by filter to the
  norms of the parameters' filters (Li et al. 2018, "Visualizing the loss landscape of neural
  nets", §4). Rescaling a filter rescales its direction alike, so a function-preserving
  rescaling of whole filters or layers (a ReLU layer's weights ×c and the next layer's ×1/c;
  a filter followed by a normalisation) leaves the slice unchanged, where a fixed direction's
  slice changes (a test checks both).
* :func:`eigen_directions` — the top Hessian eigenvectors (Lanczos).
* :func:`interpolation_direction` — θ_b − θ_a, the straight line between two checkpoints
  (α = 0 at θ_a, α = 1 at θ_b).

Slices (:func:`slice_1d`, :func:`slice_2d`) evaluate the mean loss of the batch at every grid
point: ``grid_chunk`` points at a time are vmapped, and every point sums its examples in
chunks of ``chunk_size`` (the library's one chunked reduction), so memory is bounded by both.
The grid values are exact (no sampling). :func:`plot_1d` / :func:`plot_2d` draw line and
contour plots; :func:`save_slice` writes the grid arrays as ``.npz``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sharpness_jax import checks, linalg, operators
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "Slice",
    "eigen_directions",
    "filter_normalised_direction",
    "interpolation_direction",
    "plot_1d",
    "plot_2d",
    "save_slice",
    "slice_1d",
    "slice_2d",
]


class Slice(NamedTuple):
    """Losses on a grid: ``values[i]`` at ``alphas[i]`` (1-D) or ``values[i, j]`` at
    ``(alphas[i], betas[j])`` (2-D; ``betas`` is None for 1-D)."""

    alphas: jax.Array
    betas: jax.Array | None
    values: jax.Array


def filter_normalised_direction(
    params: PyTree, key: jax.Array, *, ignore_vectors: bool = True
) -> PyTree:
    """A Gaussian direction with each filter rescaled to the norm of the same filter of θ.

    A filter is one output unit: the slice of a kernel along its last axis (flax's ``Dense``
    and ``Conv`` kernels are ``(..., in, out)``). One-dimensional leaves (biases, norm scales)
    get a zero direction when ``ignore_vectors`` (Li et al.'s choice), otherwise they are
    normalised as a whole.
    """
    checks.check_params(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))

    def one(leaf, k):
        d = jax.random.normal(k, leaf.shape, leaf.dtype)
        if leaf.ndim <= 1:
            if ignore_vectors:
                return jnp.zeros_like(leaf)
            return d * jnp.linalg.norm(leaf) / jnp.maximum(jnp.linalg.norm(d), _tiny(d))
        axes = tuple(range(leaf.ndim - 1))
        d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        p_norm = jnp.sqrt(jnp.sum(leaf * leaf, axis=axes, keepdims=True))
        return d * p_norm / jnp.maximum(d_norm, _tiny(d))

    return jax.tree_util.tree_unflatten(
        treedef, [one(a, k) for a, k in zip(leaves, keys, strict=True)]
    )


def _tiny(a: jax.Array) -> jax.Array:
    return jnp.finfo(a.dtype).tiny


def eigen_directions(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    k: int = 2,
    num_iters: int = 50,
    chunk_size: int | None = None,
    key: jax.Array | None = None,
) -> list[PyTree]:
    """The top-k Hessian eigenvectors (unit norm), for slices along the sharpest directions."""
    h = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    eig = linalg.lanczos_top_k(h, params, k=k, num_iters=num_iters, key=key)
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], eig.vectors) for i in range(k)]


def interpolation_direction(params_a: PyTree, params_b: PyTree) -> PyTree:
    """θ_b − θ_a: the slice from θ_a along it passes θ_b at α = 1."""
    if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b):
        raise ValueError("the two checkpoints have different parameter trees")
    return jax.tree_util.tree_map(lambda a, b: b - a, params_a, params_b)


def _check_direction(direction: PyTree, params: PyTree, name: str) -> None:
    checks.check_vector(direction, params, name=name)


def _grid(values: Sequence[float] | jax.Array, name: str, dtype) -> jax.Array:
    grid = jnp.asarray(values, dtype)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of grid points, got {grid.shape}")
    return grid


def _slice_losses(objective, params, batch, directions, coords, *, chunk_size, grid_chunk):
    """Mean loss at θ + Σ_d c_d u_d for every row c of ``coords`` (m, D): (m,) values."""

    def at(c):
        point = jax.tree_util.tree_map(
            lambda p, *us: p + sum(ci * u for ci, u in zip(c, us, strict=True)), params, *directions
        )
        return operators._mean_loss(objective, point, batch, chunk_size=chunk_size)

    return jax.lax.map(at, coords, batch_size=grid_chunk)


_slice_losses_jit = jax.jit(_slice_losses, static_argnames=("chunk_size", "grid_chunk"))


def _evaluate(objective, params, batch, directions, coords, chunk_size, grid_chunk):
    batch = operators._as_batch(batch)
    operators.prepare(objective, params, batch, chunk_size=chunk_size)
    if grid_chunk is not None:
        checks.check_positive_int("grid_chunk", grid_chunk)
    return _slice_losses_jit(
        objective,
        params,
        batch,
        directions,
        coords,
        chunk_size=chunk_size,
        grid_chunk=grid_chunk,
    )


def slice_1d(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    direction: PyTree,
    alphas: Sequence[float] | jax.Array,
    *,
    chunk_size: int | None = None,
    grid_chunk: int | None = 16,
) -> Slice:
    """L(θ + α u) for every α of ``alphas`` (exact mean loss over the batch).

    Args:
      direction: u, shaped like ``params`` (e.g. :func:`filter_normalised_direction`).
      alphas: the grid.
      chunk_size: examples per chunk at each grid point.
      grid_chunk: grid points evaluated together (vmapped); None: all at once.
    """
    _check_direction(direction, params, "direction")
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    a = _grid(alphas, "alphas", dtype)
    values = _evaluate(objective, params, batch, (direction,), a[:, None], chunk_size, grid_chunk)
    return Slice(a, None, values)


def slice_2d(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    directions: tuple[PyTree, PyTree],
    alphas: Sequence[float] | jax.Array,
    betas: Sequence[float] | jax.Array,
    *,
    chunk_size: int | None = None,
    grid_chunk: int | None = 16,
) -> Slice:
    """L(θ + α u + β v) on the grid ``alphas`` × ``betas``; ``values`` has shape (len α, len β).

    Args:
      directions: (u, v), each shaped like ``params``.
    """
    u, v = directions
    _check_direction(u, params, "directions[0]")
    _check_direction(v, params, "directions[1]")
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    a, b = _grid(alphas, "alphas", dtype), _grid(betas, "betas", dtype)
    coords = jnp.stack(jnp.meshgrid(a, b, indexing="ij"), axis=-1).reshape(-1, 2)
    values = _evaluate(objective, params, batch, (u, v), coords, chunk_size, grid_chunk)
    return Slice(a, b, values.reshape(a.size, b.size))


def save_slice(path: str | os.PathLike, result: Slice) -> str:
    """Writes the grid (``alphas``, ``betas`` if 2-D, ``values``) to ``path`` as ``.npz``."""
    arrays = {"alphas": np.asarray(result.alphas), "values": np.asarray(result.values)}
    if result.betas is not None:
        arrays["betas"] = np.asarray(result.betas)
    path = os.fspath(path)
    np.savez(path, **arrays)
    return path if path.endswith(".npz") else path + ".npz"


def plot_1d(result: Slice, *, ax=None, label: str | None = None, title: str = ""):
    """Line plot of a 1-D slice; returns the figure (save with ``sj.plots.save``)."""
    import matplotlib.pyplot as plt

    if result.betas is not None:
        raise ValueError("plot_1d takes a 1-D slice; use plot_2d")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.0, 3.6), constrained_layout=True)
    else:
        fig = ax.figure
    ax.plot(np.asarray(result.alphas), np.asarray(result.values), label=label)
    ax.set_xlabel("α")
    ax.set_ylabel("L(θ + αu)")
    ax.set_title(title)
    if label:
        ax.legend()
    return fig


def plot_2d(result: Slice, *, levels: int = 30, title: str = "", log: bool = False):
    """Contour plot of a 2-D slice (``log``: contours of log L); returns the figure."""
    import matplotlib.pyplot as plt

    if result.betas is None:
        raise ValueError("plot_2d takes a 2-D slice; use plot_1d")
    values = np.asarray(result.values)
    if log:
        values = np.log(np.maximum(values, np.finfo(values.dtype).tiny))
    fig, ax = plt.subplots(figsize=(4.6, 4.0), constrained_layout=True)
    grid_a, grid_b = np.meshgrid(np.asarray(result.alphas), np.asarray(result.betas), indexing="ij")
    contour = ax.contour(grid_a, grid_b, values, levels=levels)
    ax.clabel(contour, inline=True, fontsize=6)
    ax.plot([0], [0], "k+")
    ax.set_xlabel("α (u)")
    ax.set_ylabel("β (v)")
    ax.set_title(title)
    return fig
