"""Models from user code: adapters to the per-example ``predict(params, x)`` of the engine.

:class:`~sharpness_jax.objective.Objective` takes ``predict(params, x)`` for ONE example (no
batch axis) and differentiates every leaf of ``params``. A model written the usual way takes
a batch and carries state that must not be differentiated (BatchNorm statistics, caches, rng
counters). Each adapter here returns the engine's contract, an :class:`Adapted` pair
``(predict, params)`` holding only the trainable arrays, with everything else held fixed::

    predict, params = sj.adapters.from_linen(model, variables, train=False)
    objective = sj.Objective(predict, sj.softmax_cross_entropy())

* :func:`from_linen` — a flax.linen module written batch-first, with variable collections;
* :func:`from_nnx` — a flax NNX module (graph/state split, ``nnx.Param`` trainable);
* :func:`from_equinox` — an equinox module (trainable = its inexact arrays);
* :func:`from_batched` — a plain ``fn(params, x_batch)``.

A batch-first model becomes per-example by ``predict(θ, x) = model(θ, x[None])[0]``. That is
only the per-example model of the mean loss if the model does not mix examples: the output
of one example must not depend on the others in its batch. Train-mode BatchNorm (statistics
of the batch) breaks this, and so does anything else that reduces over the batch axis.
:func:`check_no_example_mixing` tests it on a few examples; every adapter of a batch-first
model runs it once at build time when given ``example_inputs``.

Fixed state (linen collections other than the trainable one, NNX non-``Param`` state) is held
by ``predict``, a :class:`jax.tree_util.Partial` whose bound arrays are pytree leaves of the
objective: it is frozen at its value when the adapter was built, enters compiled programs as
operands, not constants, and an adapter built again at new statistics (same module, same
settings) reuses the compiled programs. The non-array leaves of an equinox module are static.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sharpness_jax import checks

PyTree = Any
Predict = Callable[[PyTree, PyTree], PyTree]

__all__ = [
    "Adapted",
    "check_no_example_mixing",
    "from_batched",
    "from_equinox",
    "from_linen",
    "from_nnx",
    "per_example",
]

_EVAL_MODE = (
    "Per-example quantities need the model in eval mode, where each example's output does not "
    "depend on the rest of its batch: BatchNorm with running averages "
    "(use_running_average=True, or the module's train=False flag passed as an apply keyword), "
    "dropout off."
)


class Adapted(NamedTuple):
    """A user's model in the engine's form; unpacks as ``predict, params = adapted``.

    Attributes:
      predict: per-example model ``(params, x) -> outputs`` (x without a batch axis), ready
        for :class:`~sharpness_jax.objective.Objective`.
      params: the trainable arrays, the pytree every operator differentiates.
    """

    predict: Predict
    params: PyTree


class _Static:
    """A callable of static settings, compared by value where they hash (so that adapters
    rebuilt with equal settings share compiled programs) and by identity otherwise."""

    def _key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __hash__(self) -> int:
        try:
            return hash(self._key())
        except TypeError:
            return id(self)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        try:
            hash(self._key()), hash(other._key())
        except TypeError:
            return False
        return bool(self._key() == other._key())


@dataclasses.dataclass(frozen=True, eq=False)
class _PerExample(_Static):
    """``(*bound, θ, x) -> batched(*bound, θ, x[None])[0]``."""

    batched: Callable

    def __call__(self, *args: Any) -> PyTree:
        *bound, params, x = args
        out = self.batched(
            *bound, params, jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], x)
        )
        return jax.tree_util.tree_map(lambda o: o[0], out)


def per_example(batched: Predict) -> Predict:
    """``predict(θ, x) = batched(θ, x[None])[0]`` for a batch-first ``batched(θ, x_batch)``.

    Inputs and outputs may be pytrees; every leaf gains (resp. loses) a leading axis of one.
    A :class:`jax.tree_util.Partial` stays one, with the same bound arrays.
    """
    if isinstance(batched, jax.tree_util.Partial):
        return jax.tree_util.Partial(_PerExample(batched.func), *batched.args, **batched.keywords)
    return _PerExample(batched)


def _perturb(tree: PyTree) -> PyTree:
    """Other valid inputs of the same shapes: 2x + 1 for reals, a shift within the observed
    range for integers (token ids stay valid), negation for booleans."""

    def leaf(a):
        a = jnp.asarray(a)
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return a * 2 + 1
        if jnp.issubdtype(a.dtype, jnp.integer):
            return (a + 1) % (jnp.maximum(jnp.max(a), 1) + 1)
        if a.dtype == jnp.bool_:
            return ~a
        return a

    return jax.tree_util.tree_map(leaf, tree)


def _default_tol(dtype: Any) -> float:
    """eps**0.4 of an inexact dtype: about 2e-3 in float32, 5e-7 in float64."""
    return float(jnp.finfo(dtype).eps) ** 0.4 if jnp.issubdtype(dtype, jnp.inexact) else 0.0


def _rows_agree(a: PyTree, b: PyTree, tol: float | None) -> bool:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        atol = _default_tol(jnp.asarray(x).dtype) if tol is None else tol
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(1.0, float(np.max(np.abs(x), initial=0.0)))
        if not np.allclose(x, y, rtol=0.0, atol=atol * scale, equal_nan=True):
            return False
    return True


def check_no_example_mixing(
    batched: Predict,
    params: PyTree,
    inputs: PyTree,
    *,
    num_examples: int = 3,
    tol: float | None = None,
) -> None:
    """Check that a batch-first model's output for one example ignores the other examples.

    Evaluates ``batched(params, ·)`` (a batch-first model: leading example axis in and out)
    on the first ``num_examples`` examples of ``inputs``, on the same batch with every example
    but the first perturbed (reals ``2x + 1``, integer ids shifted within their range), and on
    the first example alone. The outputs for example 0 must agree; if they do not, the model
    mixes examples (train-mode BatchNorm does, as does any reduction over the batch axis), so
    it has no per-example ``predict`` and per-example curvature would be silently wrong.

    Args:
      batched: ``(params, x_batch) -> outputs_batch``.
      params: the params to evaluate at.
      inputs: a batch (pytree with a leading example axis); one example suffices (the others
        are then perturbed copies of it).
      num_examples: batch size of the trial (at least 2).
      tol: absolute tolerance relative to max(1, max|output|); by default ``eps**0.4`` of the
        output dtype (about 2e-3 in float32, 5e-7 in float64).

    Raises:
      ValueError: if the output for example 0 changes with the rest of the batch.
    """
    checks.check_positive_int("num_examples", num_examples)
    if num_examples < 2:
        raise ValueError(f"num_examples must be at least 2, got {num_examples}")
    n = checks.num_examples(inputs)
    first = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:1], inputs)
    if n >= 2:
        others = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[1 : min(num_examples, n)], inputs)
    else:
        others = _perturb(first)

    def concat(a, b):
        return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v]), a, b)

    row = {
        "batch": concat(first, others),
        "other examples changed": concat(first, _perturb(others)),
        "batch of one": first,
    }
    row = {k: jax.tree_util.tree_map(lambda o: o[0], batched(params, v)) for k, v in row.items()}
    for name in ("other examples changed", "batch of one"):
        if not _rows_agree(row["batch"], row[name], tol):
            raise ValueError(
                f"the model mixes examples: its output for one example changes with the rest "
                f"of its batch ({name}), so it has no per-example predict and per-example "
                f"curvature would be wrong. {_EVAL_MODE}"
            )


def _finish(fn: Predict, params: PyTree, batched: bool, example_inputs: PyTree) -> Adapted:
    """The per-example form of ``fn``, checked on ``example_inputs`` when given."""
    if example_inputs is not None:
        if batched:
            check_no_example_mixing(fn, params, example_inputs)
        else:
            x0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], example_inputs)
            jax.eval_shape(fn, params, x0)  # a trial call: errors surface at build time
    return Adapted(per_example(fn) if batched else fn, params)


def from_batched(fn: Predict, *, params: PyTree = None, example_inputs: PyTree = None) -> Predict:
    """The per-example ``predict(θ, x) = fn(θ, x[None])[0]`` of a batch-first ``fn(θ, x_batch)``.

    Args:
      fn: a batch-first model ``(params, x_batch) -> outputs_batch``.
      params, example_inputs: when both are given, :func:`check_no_example_mixing` runs once
        on the first few examples.

    Returns:
      ``predict(params, x)`` for one example.

    Raises:
      ValueError: if ``example_inputs`` is given without ``params``, or the model mixes
        examples.
    """
    if example_inputs is not None and params is None:
        raise ValueError("the example-mixing check needs params as well as example_inputs")
    return _finish(fn, params, True, example_inputs).predict


def _collection_names(mutable: bool | str | Sequence[str]) -> tuple[str, ...]:
    if mutable is False:
        return ()
    if mutable is True:
        raise ValueError(
            "mutable=True would make every collection mutable; name the collections the module "
            "writes and the adapter may discard, e.g. mutable=('intermediates',)"
        )
    return (mutable,) if isinstance(mutable, str) else tuple(mutable)


@dataclasses.dataclass(frozen=True, eq=False)
class _LinenApply(_Static):
    """``(fixed, rngs, θ, x_batch) -> module.apply({trainable: θ, **fixed}, x_batch, ...)``."""

    module: Any
    trainable: str
    mutable: Any
    apply_kwargs: tuple

    def __call__(self, fixed: PyTree, rngs: Any, params: PyTree, x_batch: PyTree) -> PyTree:
        import flax.errors

        variables = {self.trainable: params, **fixed}
        try:
            out = self.module.apply(
                variables, x_batch, rngs=rngs, mutable=self.mutable, **dict(self.apply_kwargs)
            )
        except flax.errors.ModifyScopeVariableError as err:
            raise ValueError(
                f"the module updates a fixed variable collection at apply time ({err}); it is "
                f"in train mode. {_EVAL_MODE}"
            ) from err
        except flax.errors.InvalidRngError as err:
            raise ValueError(
                f"the module asks for an rng ({err}). Switch dropout off with the module's flag "
                "(e.g. train=False or deterministic=True as an apply keyword), or pass "
                "rngs={'dropout': key} for one fixed dropout mask."
            ) from err
        return out[0] if self.mutable else out


def from_linen(
    module: Any,
    variables: Mapping[str, PyTree],
    *,
    trainable: str = "params",
    rngs: Any = None,
    mutable: bool | str | Sequence[str] = False,
    batched: bool = True,
    example_inputs: PyTree = None,
    **apply_kwargs: Any,
) -> Adapted:
    """A flax.linen module as ``(predict, params)``.

    ``predict(θ, x) = module.apply({trainable: θ, **fixed}, x[None], **apply_kwargs)[0]``:
    only the ``trainable`` collection is differentiated; every other collection of
    ``variables`` (``batch_stats``, caches, ...) is frozen at its given value.

    Args:
      module: a linen ``Module``, written batch-first unless ``batched=False``.
      variables: the variables from ``module.init`` (or a checkpoint), collection -> pytree.
      trainable: the collection the operators differentiate.
      rngs: rngs for ``apply`` (e.g. ``{"dropout": key}``); a fixed key gives one fixed mask
        (the same for every example and every call). Without rngs a module that asks for one
        is refused: dropout is off unless you pass one.
      mutable: collections the module may write at apply time whose updates are discarded
        (e.g. ``"intermediates"`` from ``sow``); they may not be collections of ``variables``.
      batched: False for a module that takes one example (no batch axis).
      example_inputs: a few inputs (leading example axis): the module is called once on them
        at build time and :func:`check_no_example_mixing` runs, so train-mode BatchNorm and
        other mixing models are refused here rather than at first use.
      **apply_kwargs: forwarded to ``module.apply``, e.g. ``train=False``.

    Returns:
      ``Adapted(predict, variables[trainable])``.

    Raises:
      ValueError: if ``trainable`` is not a collection of ``variables``; if ``mutable`` names
        one; and (at build time with ``example_inputs``, otherwise at the first call) if the
        module updates a fixed collection (train-mode BatchNorm: use eval mode), asks for an
        rng none was given for, or mixes examples.
    """
    variables = dict(variables)
    if trainable not in variables:
        raise ValueError(
            f"trainable collection {trainable!r} is not among the variables' collections "
            f"{sorted(variables)}"
        )
    mutable_names = _collection_names(mutable)
    if clash := sorted(set(mutable_names) & set(variables)):
        raise ValueError(
            f"mutable collections {clash} are variables of the model; the adapter holds them "
            f"fixed (trainable: {trainable!r}, the rest frozen). {_EVAL_MODE}"
        )
    fixed = {k: v for k, v in variables.items() if k != trainable}
    settings = (trainable, mutable_names or False, tuple(sorted(apply_kwargs.items())))
    apply = jax.tree_util.Partial(_LinenApply(module, *settings), fixed, rngs)
    return _finish(apply, variables[trainable], batched, example_inputs)


@dataclasses.dataclass(frozen=True, eq=False)
class _NNXCall(_Static):
    """``(rest, θ, x) -> nnx.merge(graphdef, θ, rest)(x)``, refusing a call that changes
    ``rest`` (a leaf of the state after the call that is not the one passed in)."""

    graphdef: Any
    trainable: Any

    def __call__(self, rest: PyTree, params: PyTree, x: PyTree) -> PyTree:
        from flax import nnx

        as_pure = getattr(nnx, "as_pure", None) or nnx.pure
        before = jax.tree_util.tree_flatten_with_path(rest)[0]
        model = nnx.merge(self.graphdef, params, rest)
        out = model(x)
        after = jax.tree_util.tree_leaves(as_pure(nnx.split(model, self.trainable, ...)[2]))
        changed = [
            jax.tree_util.keystr(path)
            for (path, a), b in zip(before, after, strict=True)
            if a is not b
        ]
        if changed:
            raise ValueError(
                f"calling the module changes its non-trainable state {changed}: it is in "
                f"training mode. Call module.eval() before adapting it. {_EVAL_MODE}"
            )
        return out


def from_nnx(
    module: Any,
    *,
    trainable: Any = None,
    batched: bool = True,
    example_inputs: PyTree = None,
) -> Adapted:
    """A flax NNX module as ``(predict, params)``.

    The module is split once, ``graphdef, θ, rest = nnx.split(module, trainable, ...)``, and
    ``predict(θ, x) = nnx.merge(graphdef, θ, rest)(x[None])[0]``. Only the ``trainable``
    state (``nnx.Param`` by default) is differentiated; the rest (``BatchStat``, rng state) is
    frozen at its value now. Call ``module.eval()`` first: a module whose call changes its
    state (train-mode BatchNorm updating statistics, dropout drawing from its rngs) is
    refused, since the change would be discarded and the outputs depend on the batch.

    Args:
      module: an ``nnx.Module``, called batch-first unless ``batched=False``.
      trainable: an NNX filter for the differentiated state; ``nnx.Param`` by default.
      batched: False for a module that takes one example.
      example_inputs: a few inputs; the module is called once on them at build time and, when
        batched, :func:`check_no_example_mixing` runs.

    Returns:
      ``Adapted(predict, θ)`` with θ the trainable state as a pure ``nnx.State`` of arrays.

    Raises:
      ValueError: (at build time with ``example_inputs``, otherwise at the first call) if the
        call changes the module's non-trainable state, or the model mixes examples.
    """
    from flax import nnx

    as_pure = getattr(nnx, "as_pure", None) or nnx.pure
    trainable = nnx.Param if trainable is None else trainable
    graphdef, params, rest = nnx.split(module, trainable, ...)
    params, rest = as_pure(params), as_pure(rest)
    call = jax.tree_util.Partial(_NNXCall(graphdef, trainable), rest)
    return _finish(call, params, batched, example_inputs)


def _import_equinox():
    try:
        return importlib.import_module("equinox")
    except ImportError as err:
        raise ImportError("from_equinox needs equinox: pip install sharpness_jax[equinox]") from err


def from_equinox(
    module: Any,
    *,
    filter_spec: Callable[[Any], bool] | None = None,
    call: Callable[[Any, PyTree], PyTree] | None = None,
    batched: bool = False,
    example_inputs: PyTree = None,
) -> Adapted:
    """An equinox module as ``(predict, params)``.

    ``θ, static = eqx.partition(module, filter_spec)`` and
    ``predict(θ, x) = call(eqx.combine(θ, static), x)``: the inexact arrays are trainable,
    everything else is static. Equinox modules usually take one example, so by default no
    batch axis is added. Stateful layers (``eqx.nn.BatchNorm`` with ``eqx.nn.State``) go
    through ``call``, e.g. ``call=lambda m, x: m(x, state)[0]`` with the module in inference
    mode (``eqx.nn.inference_mode(module)``, which also switches dropout off).

    Args:
      module: an ``equinox.Module``.
      filter_spec: which leaves are trainable; ``eqx.is_inexact_array`` by default.
      call: ``(module, x) -> outputs``; ``module(x)`` by default.
      batched: True for a module that takes a batch (``x[None]`` ... ``[0]`` is then added and
        the example-mixing check runs on ``example_inputs``).
      example_inputs: a few inputs, called once at build time.

    Returns:
      ``Adapted(predict, θ)`` (θ has the module's structure, non-trainable leaves None).

    Raises:
      ImportError: if equinox is not installed.
      ValueError: if the batched model mixes examples.
    """
    eqx = _import_equinox()
    params, static = eqx.partition(module, filter_spec or eqx.is_inexact_array)
    call = call or (lambda m, x: m(x))

    def fn(params: PyTree, x: PyTree) -> PyTree:
        return call(eqx.combine(params, static), x)

    return _finish(fn, params, batched, example_inputs)
