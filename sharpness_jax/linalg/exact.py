"""Exact routes on a matrix-free operator: one matvec per basis vector, ``chunk_size`` basis
vectors at a time (:func:`basis_map`), for small P.

The helpers here (:func:`flatten_operator`, :func:`basis_map`, the template and count checks)
serve the other modules of :mod:`sharpness_jax.linalg` as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks
from sharpness_jax.linear_operator import compiled

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "basis_map",
    "dense",
    "diagonal_exact",
    "flatten_operator",
    "frobenius_squared_exact",
    "trace_exact",
    "widen_operator",
    "working_dtype",
]


def working_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the algorithms work in for operands of ``dtype``: float32 for half precision
    (bfloat16, float16), else ``dtype`` itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def _cast(tree: PyTree, dtype: Any) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(dtype), tree)


def widen_operator(matvec: MatVec, template: PyTree) -> tuple[MatVec, PyTree]:
    """``(wide_matvec, wide_template)``: the operator on vectors of :func:`working_dtype`.

    For a half-precision template, ``wide_matvec`` casts its argument to the template's dtype,
    applies ``matvec`` there (the products stay in the model's dtype) and returns the result
    in float32, so that inner products, sums over probes and the small dense eigenproblems
    are carried out in float32. Other dtypes pass through unchanged.
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(template))
    wide = working_dtype(dtype)
    if wide == dtype:
        return matvec, template
    return (lambda v: _cast(matvec(_cast(v, dtype)), wide)), _cast(template, wide)


def flatten_operator(matvec: MatVec, template: PyTree):
    """``(flat_matvec, flat_template, unravel)`` for a pytree operator.

    The flat vectors are in :func:`working_dtype` (see :func:`widen_operator`); ``unravel``
    returns a pytree in the template's dtype.
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(template))
    matvec, template = widen_operator(matvec, template)
    flat, unravel_wide = ravel_pytree(template)

    def flat_matvec(x):
        return ravel_pytree(matvec(unravel_wide(x)))[0]

    def unravel(x):
        return _cast(unravel_wide(x), dtype)

    return flat_matvec, flat, unravel


def _check_template(template: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(template)
    if not leaves:
        raise TypeError("the template pytree is empty")
    dtypes = {jnp.result_type(leaf) for leaf in leaves}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise TypeError(f"operators need one floating dtype across the template, got {dtypes}")
    return int(sum(jnp.size(leaf) for leaf in leaves))


#: Basis vectors per batched matvec when ``chunk_size`` is None: as many as fit, P at a time,
#: in this many numbers (the batch of one-hot vectors alone is chunk × P numbers).
_AUTO_BASIS_NUMBERS = 2**24


def basis_map(fn, size: int, chunk_size: int | None):
    """``fn(i)`` for i = 0 … size − 1, stacked; ``chunk_size`` indices at a time by
    ``lax.map`` (None: ``min(size, 2**24 // size)`` at a time, so the basis batch stays small).
    """
    idx = jnp.arange(size, dtype=jnp.int32)
    if chunk_size is None:
        chunk_size = max(1, min(size, _AUTO_BASIS_NUMBERS // size))
    checks.check_positive_int("chunk_size", chunk_size)
    if chunk_size >= size:
        return jax.vmap(fn)(idx)
    return jax.lax.map(fn, idx, batch_size=chunk_size)


@compiled(static=("chunk_size", "max_bytes"))
def dense(
    matvec: MatVec,
    template: PyTree,
    *,
    chunk_size: int | None = None,
    max_bytes: float | None = None,
) -> jax.Array:
    """The P × P matrix of the operator in the flat (``ravel_pytree``) basis.

    Args:
      matvec: the operator.
      template: a pytree of the vector space (e.g. params).
      chunk_size: basis vectors per batched matvec (bounds the intermediate memory; None:
        automatic, see :func:`basis_map`).
      max_bytes: refuse when the P × P result exceeds this (default
        ``checks.MEMORY_LIMIT_BYTES``).

    Raises:
      MemoryError: when the matrix would not fit, naming the matrix-free routes.
    """
    size = _check_template(template)
    mv, flat, _ = flatten_operator(matvec, template)
    checks.check_memory(
        2.0 * size * size * flat.dtype.itemsize,
        max_bytes=max_bytes,
        what=f"a dense {size:,} × {size:,} matrix",
        cheaper="use the matrix-free routes (lanczos_top_k, hutchinson_trace, "
        "hutchinson_diagonal, xtrace, spectral_density)",
    )
    cols = basis_map(lambda i: mv(jax.nn.one_hot(i, size, dtype=flat.dtype)), size, chunk_size)
    return cols.T


@compiled(static=("chunk_size",))
def diagonal_exact(matvec: MatVec, template: PyTree, *, chunk_size: int | None = None) -> PyTree:
    """diag(A) exactly, e_iᵀ A e_i for every basis vector; a pytree like ``template`` (in
    float32 for a half-precision template, see :func:`working_dtype`)."""
    return _diagonal(matvec, template, chunk_size)[1]


def _diagonal(matvec, template, chunk_size):
    """(flat diagonal, its pytree), both in :func:`working_dtype`."""
    size = _check_template(template)
    matvec, template = widen_operator(matvec, template)
    mv, flat, unravel = flatten_operator(matvec, template)
    diag = basis_map(lambda i: mv(jax.nn.one_hot(i, size, dtype=flat.dtype))[i], size, chunk_size)
    return diag, unravel(diag)


@compiled(static=("chunk_size",))
def trace_exact(matvec: MatVec, template: PyTree, *, chunk_size: int | None = None) -> jax.Array:
    """tr(A) = Σ_i e_iᵀ A e_i exactly (P matvecs), summed in :func:`working_dtype`."""
    return jnp.sum(_diagonal(matvec, template, chunk_size)[0])


@compiled(static=("chunk_size",))
def frobenius_squared_exact(
    matvec: MatVec, template: PyTree, *, chunk_size: int | None = None
) -> jax.Array:
    """‖A‖_F² = Σ_i ‖A e_i‖² exactly (P matvecs)."""
    size = _check_template(template)
    mv, flat, _ = flatten_operator(matvec, template)
    sq = basis_map(
        lambda i: jnp.sum(jnp.square(mv(jax.nn.one_hot(i, size, dtype=flat.dtype)))),
        size,
        chunk_size,
    )
    return jnp.sum(sq)
