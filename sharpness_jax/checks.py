"""Input checks that run before any heavy computation.

Shape, structure and dtype checks read only static information, so they work on tracers and
raise at trace time, before XLA compiles or runs anything. :func:`check_values` and
:func:`check_finite` look at values: one small jitted reduction over the concrete leaves
(tracers are skipped, so building an operator inside ``jax.jit`` still works). Every operator
constructor and measure runs :func:`check_values` on its params and batch when it is built;
``with checks.validation(False):`` turns that off.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
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
    "check_values",
    "check_vector",
    "concrete_value",
    "is_int",
    "is_number",
    "num_examples",
    "require",
    "validation",
    "validation_enabled",
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


def check_vector(v: PyTree, params: PyTree, *, name: str = "vector", hint: str = "") -> None:
    """``v`` must have the tree structure, shapes and dtypes of ``params`` (``hint``, the fix,
    ends the message of a structure mismatch).

    Raises:
      ValueError: on a different structure or shape; TypeError on a different dtype.
    """
    v_struct = jax.tree_util.tree_structure(v)
    p_struct = jax.tree_util.tree_structure(params)
    if v_struct != p_struct:
        raise ValueError(
            f"{name} has tree structure {v_struct}, but the parameters have {p_struct}{hint}"
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


_VALIDATION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sharpness_jax_validation", default=True
)


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Turns the value checks of operators and measures on or off inside a ``with`` block.

    When an operator or measure is built, :func:`check_values` checks that params, inputs and
    targets hold no NaN or Inf and that integer class labels lie in [0, K). It costs one
    reduction over the data. To skip it (data validated already, or NaNs wanted)::

        with sj.checks.validation(False):
            H = sj.hessian(objective, params, batch)

    The setting is a context variable (per thread and per asyncio task) and is restored when
    the block exits. Only the value checks are affected: shape, structure and dtype checks
    always run. An operator is checked when built, so one built inside the block stays
    unchecked when used after it.

    Args:
      enabled: whether value checks run inside the block.
    """
    token = _VALIDATION.set(bool(enabled))
    try:
        yield
    finally:
        _VALIDATION.reset(token)


def validation_enabled() -> bool:
    """Whether value checks run here (False inside ``validation(False)``)."""
    return _VALIDATION.get()


@jax.jit
def _value_summary(floats: list, labels: list) -> tuple[list, list]:
    """Non-finite counts of ``floats`` and (min, max) of ``labels``, in one program."""
    counts = [jnp.sum(~jnp.isfinite(a)) for a in floats]
    ranges = [(jnp.min(a), jnp.max(a)) for a in labels]
    return counts, ranges


def _summarise(floats: list, labels: list) -> tuple[list, list]:
    """:func:`_value_summary` of the named leaves, run now even while a jit traces."""
    with jax.ensure_compile_time_eval():
        summary = _value_summary([a for _, a in floats], [a for _, a in labels])
    return jax.device_get(summary)


def _concrete_leaves(named: Iterable[tuple[str, PyTree]], keep: Callable[[Any], bool]) -> list:
    """``(name + path, leaf)`` for the leaves, not tracers, of dtype ``keep``; none empty."""
    out = []
    for tree_name, tree in named:
        for path, leaf in _leaves_with_paths(tree):
            if isinstance(leaf, jax.core.Tracer) or not keep(jnp.result_type(leaf)):
                continue
            if np.size(leaf):
                out.append((f"{tree_name}{path}", leaf))
    return out


def _is_inexact(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _is_integer(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer)


def _raise_nonfinite(floats: list, counts: list, hint: str = "") -> None:
    for (name, leaf), count in zip(floats, counts, strict=True):
        if int(count):
            raise ValueError(
                f"{name} holds {int(count)} non-finite value(s) (NaN or Inf) out of "
                f"{np.size(leaf)}{hint}"
            )


_OPT_OUT = "; with sharpness_jax.checks.validation(False) this check is skipped"


def check_values(
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    num_classes: Callable[[], int | None] | None = None,
) -> None:
    """Refuses non-finite params, inputs or targets, and class labels outside [0, K).

    One small jitted reduction over the floating-point leaves (NaN/Inf counts) and the integer
    target leaves (min and max). Leaves that are tracers are skipped: under ``jax.jit`` values
    are unknown at trace time, so an operator built inside a compiled program is not checked.
    Nothing runs inside ``validation(False)``.

    Args:
      params, inputs, targets: the arrays to check.
      num_classes: returns K when integer targets are class indices into the outputs' last
        axis, None when they are not; called only when there are concrete integer targets.
        None: integer targets are not checked.

    Raises:
      ValueError: naming the leaf and how many values are non-finite, or the offending label,
        how many labels are out of range, and K.
    """
    if not validation_enabled():
        return
    named = (("params", params), ("inputs", inputs), ("targets", targets))
    floats = _concrete_leaves(named, _is_inexact)
    labels = _concrete_leaves(named[2:], _is_integer) if num_classes else []
    k = num_classes() if labels else None
    labels = labels if k is not None else []
    if not floats and not labels:
        return
    counts, ranges = _summarise(floats, labels)
    _raise_nonfinite(floats, counts, _OPT_OUT)
    for (name, leaf), (low, high) in zip(labels, ranges, strict=True):
        if low < 0 or high >= k:
            values = np.asarray(leaf)
            bad = int(np.count_nonzero((values < 0) | (values >= k)))
            raise ValueError(
                f"{name} holds {bad} class label(s) outside [0, {k}), e.g. "
                f"{int(low) if low < 0 else int(high)}; K = {k} is the size of the last axis of "
                f"the model's outputs{_OPT_OUT}"
            )


def check_finite(*trees: PyTree, names: tuple[str, ...] | None = None) -> None:
    """Raises if any floating-point leaf of the given pytrees holds NaN or Inf.

    Reads values (one jitted reduction) and skips tracers; call it before a long measurement.
    Unlike :func:`check_values` it runs inside ``validation(False)`` too.

    Args:
      *trees: pytrees of arrays (params, a batch, ...).
      names: a name per tree for the message (default ``tree0``, ``tree1``, ...).

    Raises:
      ValueError: naming the first offending leaf and how many entries are non-finite.
    """
    names = names or tuple(f"tree{i}" for i in range(len(trees)))
    floats = _concrete_leaves(zip(names, trees, strict=True), _is_inexact)
    if floats:
        _raise_nonfinite(floats, _summarise(floats, [])[0])


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
