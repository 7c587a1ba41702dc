"""Input checks that run before any heavy computation.

Shape, structure and dtype checks read only static information, so they work on tracers and
raise at trace time, before XLA compiles or runs anything. :func:`check_finite` looks at
values, so it runs eagerly; the experiment layer calls it before measuring.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "MEMORY_LIMIT_BYTES",
    "check_batch",
    "check_chunk_size",
    "check_finite",
    "check_memory",
    "check_nonnegative_scalar",
    "check_params",
    "check_positive_int",
    "check_positive_scalar",
    "check_vector",
    "concrete_value",
    "is_int",
    "is_number",
    "num_examples",
    "require",
]


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def num_examples(batch: PyTree) -> int:
    """The common leading dimension of every leaf of ``batch``.

    Raises:
      ValueError: if the batch has no leaves, a scalar leaf, or mismatched leading dimensions.
    """
    leaves = _leaves_with_paths(batch)
    if not leaves:
        raise ValueError("the batch has no arrays")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"batch leaf {path or '<root>'} is a scalar; it needs an example axis")
        sizes[path] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(
            "the leaves of the batch disagree on the number of examples (leading dimension): "
            + ", ".join(f"{p or '<root>'}: {s}" for p, s in sizes.items())
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("the batch holds no examples")
    return int(n)


def check_batch(batch: PyTree) -> int:
    """Checks the batch's leading dimensions agree; returns the number of examples."""
    return num_examples(batch)


def check_params(params: PyTree) -> None:
    """Parameters must be a non-empty pytree of floating-point arrays.

    Raises:
      TypeError: on integer/bool leaves or an empty tree.
    """
    leaves = _leaves_with_paths(params)
    if not leaves:
        raise TypeError("params is an empty pytree")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"parameter {path or '<root>'} has dtype {dtype}; curvature needs floating-point "
                "parameters"
            )


def check_vector(v: PyTree, params: PyTree, *, name: str = "vector") -> None:
    """``v`` must have the tree structure, shapes and dtypes of ``params``.

    Raises:
      ValueError: on a different structure or shape; TypeError on a different dtype.
    """
    v_struct = jax.tree_util.tree_structure(v)
    p_struct = jax.tree_util.tree_structure(params)
    if v_struct != p_struct:
        raise ValueError(
            f"{name} has tree structure {v_struct}, but the parameters have {p_struct}"
        )
    for (path, a), (_, b) in zip(_leaves_with_paths(v), _leaves_with_paths(params), strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{name} leaf {path or '<root>'} has shape {jnp.shape(a)}, the parameter has "
                f"{jnp.shape(b)}"
            )
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{name} leaf {path or '<root>'} has dtype {jnp.result_type(a)}, the parameter has "
                f"{jnp.result_type(b)}"
            )


def check_chunk_size(chunk_size: int | None) -> None:
    """``chunk_size`` is None (no chunking) or a positive Python int.

    Raises:
      TypeError: if it is not an int; ValueError if it is not positive.
    """
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def concrete_value(x: Any) -> np.ndarray | None:
    """The value of ``x`` as a NumPy array, or None under tracing (value checks are skipped)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_finite_scalar(name: str, value: Any, *, strict: bool) -> None:
    """``value`` is a finite scalar > 0 (``strict``) or ≥ 0, checked only when concrete."""
    val = concrete_value(value)
    if val is None:
        return
    if val.ndim != 0 or not np.isfinite(val) or val < 0 or (strict and val == 0):
        raise ValueError(
            f"{name} must be a finite scalar {'>' if strict else '>='} 0, got {value!r}"
        )


def check_nonnegative_scalar(name: str, value: Any) -> None:
    """``value`` is a finite scalar ≥ 0 (checked only when concrete).

    Raises:
      ValueError: naming ``name``.
    """
    _check_finite_scalar(name, value, strict=False)


def check_positive_scalar(name: str, value: Any) -> None:
    """``value`` is a finite scalar > 0 (checked only when concrete).

    Raises:
      ValueError: naming ``name``.
    """
    _check_finite_scalar(name, value, strict=True)


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is a positive Python int (or None, with ``optional``).

    Raises:
      ValueError: naming ``name``, otherwise.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


#: Default limit on the memory an exact route may need before it is refused (4 GiB); every
#: function that checks takes ``max_bytes`` to raise it.
MEMORY_LIMIT_BYTES = 4 * 2**30


def check_memory(num_bytes: float, *, max_bytes: float | None, what: str, cheaper: str) -> None:
    """Refuses a computation whose estimated memory exceeds ``max_bytes``.

    Args:
      num_bytes: the estimate.
      max_bytes: the limit (None: ``MEMORY_LIMIT_BYTES``).
      what: the computation, for the message.
      cheaper: the cheaper route to name in the message.

    Raises:
      MemoryError: naming the estimate, the limit and the cheaper route.
    """
    limit = MEMORY_LIMIT_BYTES if max_bytes is None else max_bytes
    if num_bytes > limit:
        raise MemoryError(
            f"{what} needs about {num_bytes / 2**30:.3g} GiB, above the limit of "
            f"{limit / 2**30:.3g} GiB; {cheaper}, or pass a larger max_bytes"
        )


def check_finite(*trees: PyTree, names: tuple[str, ...] | None = None) -> None:
    """Raises if any floating-point leaf of the given pytrees holds NaN or Inf.

    Runs eagerly (it reads values); call it before a long measurement.

    Args:
      *trees: pytrees of arrays (params, a batch, ...).
      names: a name per tree for the message (default ``tree0``, ``tree1``, ...).

    Raises:
      ValueError: naming the first offending leaf and how many entries are non-finite.
    """
    names = names or tuple(f"tree{i}" for i in range(len(trees)))
    for tree_name, tree in zip(names, trees, strict=True):
        for path, leaf in _leaves_with_paths(tree):
            arr = np.asarray(leaf)
            if not np.issubdtype(arr.dtype, np.inexact):
                continue
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise ValueError(
                    f"{tree_name}{path} holds {bad} non-finite value(s) (NaN or Inf) out of "
                    f"{arr.size}"
                )


def require(condition: bool, message: str) -> None:
    """Raises ``ValueError(message)`` unless ``condition`` holds (for config and option checks)."""
    if not condition:
        raise ValueError(message)


def is_int(x: Any) -> bool:
    """Whether ``x`` is a Python or NumPy integer (bools excluded)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """Whether ``x`` is a Python or NumPy real number (bools excluded)."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
