"""Matrix-free linear operators that are pytrees, so that they compile once.

An :class:`Operator` is a callable ``v -> A v`` that carries its arrays (parameters, the
batch, keys, other operators) as pytree leaves and its product rule as static data. It can
therefore be an *argument* of ``jax.jit``: every routine of :mod:`sharpness_jax.linalg`
takes it that way, so a second call with an operator built from other arrays of the same
shapes reuses the compiled program, and no dataset array is ever baked into a program as a
constant (which made XLA constant-fold convolutions over the data).

The product rule must be hashable and compare equal across constructions for the compiled
program to be reused: a module-level function, or a frozen dataclass of such functions and
settings (see :func:`operator`). Operators compose into operators::

    A = sj.operators.hessian(objective, params, batch)
    F = sj.operators.fisher(objective, params, batch)
    sj.linear_operator.add(A, F, alpha=0.5)        # v -> A v + 0.5 F v
    sj.linear_operator.shift(A, 1e-3)              # v -> A v + 1e-3 v
    sj.linear_operator.compose(A, F)               # v -> A (F v)

A plain function ``v -> A v`` still works everywhere an operator is taken (:func:`as_operator`
wraps it); it is then keyed by identity and whatever it closes over is a constant.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

PyTree = Any

__all__ = [
    "Operator",
    "Static",
    "add",
    "as_operator",
    "compiled",
    "compose",
    "operator",
    "scale",
    "shift",
]


class Static:
    """A hashable stand-in for a static value: compared by value when it is hashable, by
    identity otherwise (e.g. a flax module's bound ``apply``, or a user's unhashable loss)."""

    __slots__ = ("_key", "value")

    def __init__(self, value: Any):
        self.value = value
        try:
            hash(value)
            self._key = ("value", value)
        except TypeError:
            self._key = ("id", id(value))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Static):
            return NotImplemented
        if self._key[0] == "id" or other._key[0] == "id":
            return self.value is other.value
        return self._key == other._key

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class Operator:
    """``v -> A v`` as a pytree: ``rule(operands, v)`` with ``operands`` the leaves.

    Hashed and compared by identity, like the plain functions it stands for (``lax.switch``
    and ``lax.cond`` hash their branches); ``jax.jit`` keys its cache on the rule and shapes.

    Attributes:
      rule: static, hashable ``(operands, v) -> A v``.
      operands: the arrays (or operators) the product needs.
    """

    rule: Callable[[PyTree, PyTree], PyTree]
    operands: PyTree

    def __call__(self, v: PyTree) -> PyTree:
        return _apply(self, v)

    def __repr__(self) -> str:
        shapes = jax.tree_util.tree_map(lambda a: getattr(a, "shape", a), self.operands)
        return f"Operator({self.rule!r}, operands={shapes})"


jax.tree_util.register_dataclass(Operator, data_fields=["operands"], meta_fields=["rule"])


@jax.jit
def _apply(op: Operator, v: PyTree) -> PyTree:
    # One compiled program per (rule, shapes): an eager ``A(v)`` in a Python loop compiles
    # once; inside another trace this is an inlined call.
    return op.rule(op.operands, v)


@dataclasses.dataclass(frozen=True)
class _Closure:
    fn: Static

    def __call__(self, operands, v):
        del operands
        return self.fn.value(v)


def as_operator(matvec: Callable[[PyTree], PyTree]) -> Operator:
    """``matvec`` itself when it is an :class:`Operator`; otherwise an operator that calls the
    plain function (keyed by identity: the same function object reuses its program)."""
    if isinstance(matvec, Operator):
        return matvec
    if not callable(matvec):
        raise TypeError(f"an operator must be callable v -> A v, got {type(matvec).__name__}")
    return Operator(_Closure(Static(matvec)), ())


def operator(rule: Callable[..., PyTree], *operands: PyTree, **settings: Any) -> Operator:
    """An operator ``v -> rule(*operands, v, **settings)``.

    ``rule`` should be a module-level function (a lambda made anew at each call gives a new
    program each time); ``settings`` are static (ints, strings, functions, tuples).
    """
    return Operator(_Rule(Static(rule), tuple(sorted(settings.items()))), tuple(operands))


@dataclasses.dataclass(frozen=True)
class _Rule:
    fn: Static
    settings: tuple

    def __call__(self, operands, v):
        return self.fn.value(*operands, v, **dict(self.settings))


def _add(a, b, alpha, v):
    return optax.tree.add_scale(a(v), alpha, b(v))


def _scale(a, alpha, v):
    return optax.tree.scale(alpha, a(v))


def _shift(a, damping, v):
    return optax.tree.add_scale(a(v), damping, v)


def _compose(a, b, v):
    return a(b(v))


def add(a: Callable, b: Callable, *, alpha: float = 1.0) -> Operator:
    """v -> A v + α B v."""
    return operator(_add, as_operator(a), as_operator(b), jax.numpy.asarray(alpha))


def scale(a: Callable, alpha: float) -> Operator:
    """v -> α A v."""
    return operator(_scale, as_operator(a), jax.numpy.asarray(alpha))


def shift(a: Callable, damping: float) -> Operator:
    """v -> A v + λ v (the damped operator A + λI)."""
    return operator(_shift, as_operator(a), jax.numpy.asarray(damping))


def compose(a: Callable, b: Callable) -> Operator:
    """v -> A (B v)."""
    return operator(_compose, as_operator(a), as_operator(b))


def compiled(*, static: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """``jax.jit`` for a routine ``fn(matvec, template, ...)`` of :mod:`sharpness_jax.linalg`.

    An :class:`Operator` goes in as a traced pytree argument (with ``template`` and every
    argument not named in ``static``), so the routine compiles once per operator rule and
    shapes. A plain function runs the routine as it is, uncompiled, exactly as before (its
    closure would be a constant of the program, and keeping it in the compile cache would
    keep its arrays alive).
    """

    def wrap(fn: Callable) -> Callable:
        jitted = jax.jit(fn, static_argnames=static)

        @functools.wraps(fn)
        def call(matvec, /, *args, **kwargs):
            if isinstance(matvec, Operator):
                return jitted(matvec, *args, **kwargs)
            return fn(matvec, *args, **kwargs)

        call.jitted = jitted
        return call

    return wrap
