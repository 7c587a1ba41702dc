"""Models from the user's code in a run config: ``model.factory = "pkg.module:fn"``.

A run config names a zoo model by ``model.name``; with ``model.factory`` set it names a Python
callable instead, imported from a module on the path, and the training loop, the studies and
``experiments.measure`` build the model from it. Since the string is stored with the run's
config, ``experiments.measure --run=...`` (and a resumed run) rebuilds the same model.

The factory is called like :func:`sharpness_jax.models.build_model`, with keywords only::

    fn(*, input_shape, num_outputs, param_dtype, **options)

``input_shape`` is the shape of ONE example of the dataset (no batch axis), ``num_outputs``
the dataset's K (classes, or regression targets), ``param_dtype`` the run's ``dtype``
("float32" or "float64"), and ``options`` every other field of the config's ``model``
section (``name`` and ``factory`` aside): e.g. ``--config.model.width=64`` passes
``width=64``. A factory used inside a study config also receives the study's zoo options
(``widths``, ``activation``, ...): take ``**options`` to accept those it does not use.

It returns one of:

* a flax.linen ``Module`` written batch-first (``module(x_batch) -> (N, K)``) whose only
  variable collection is ``"params"``: its parameters are ``module.init(key, x)["params"]``
  on a batch of one zero example, and its per-example model ``module.apply({"params": θ},
  x[None])[0]`` (:func:`sharpness_jax.adapters.per_example`);
* a :class:`sharpness_jax.models.Model` (``init(key) -> params`` and a per-example
  ``predict(params, x)``), the form any framework reaches through
  :mod:`sharpness_jax.adapters` (NNX, equinox, a plain function);
* a :class:`sharpness_jax.resnet18.StatefulModel` for a model with batch-norm statistics
  (trained in train mode, measured in eval mode, as the zoo's ``"resnet18"``).

Before any training, :func:`build_from_factory` checks the result: its type, that its
parameters have the run's dtype, that one example's outputs have shape ``(num_outputs,)``
(by ``jax.eval_shape``, no computation), and for a batch-first linen module that it does not
mix examples (:func:`sharpness_jax.adapters.check_no_example_mixing` on three training
inputs).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sharpness_jax import adapters
from sharpness_jax.models import Model
from sharpness_jax.resnet18 import StatefulModel

PyTree = Any

__all__ = ["build_from_factory", "load_factory"]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"^({_NAME}(?:\.{_NAME})*):({_NAME}(?:\.{_NAME})*)$")
_RETURNS = (
    "a batch-first flax.linen Module, a sharpness_jax.models.Model(name, init, predict, "
    "input_shape, num_outputs) or a sharpness_jax.resnet18.StatefulModel"
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable that ``spec`` = ``"pkg.module:fn"`` names (``fn`` may be dotted,
    ``"pkg.module:Class.method"``), imported now.

    Raises:
      ValueError: one line naming the problem: a malformed string, a module that cannot be
        imported, a missing attribute, or an attribute that is not callable.
    """
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(
            f"model.factory must look like 'pkg.module:fn' (a module path, a colon, a callable "
            f"in that module), got {spec!r}"
        )
    module_name, attribute = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(
            f"model.factory {spec!r}: cannot import module {module_name!r} ({_first_line(err)}); "
            "is it installed or on PYTHONPATH?"
        ) from err
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module_name, *attribute.split(".")[:i]])
            raise ValueError(f"model.factory {spec!r}: {where!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"model.factory {spec!r} is a {type(obj).__name__}, not a callable; it must name a "
            "function fn(*, input_shape, num_outputs, param_dtype, **options)"
        )
    return obj


def build_from_factory(
    spec: str,
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    param_dtype: Any = "float32",
    example_inputs: Any = None,
    **options: Any,
) -> Model | StatefulModel:
    """The model of ``model.factory = spec``, called and checked (module docstring).

    Args:
      spec: ``"pkg.module:fn"``.
      input_shape: the shape of one example.
      num_outputs: K.
      param_dtype: the run's dtype.
      example_inputs: a few inputs (leading example axis), e.g. the training inputs: the
        model is checked on inputs of their dtype (real ones cast to ``param_dtype``, integer
        ids kept), and a batch-first linen module for example mixing on the first three.
        None: real inputs of ``param_dtype``, no example-mixing check.
      **options: the config's other model options, passed to the factory.

    Returns:
      A :class:`~sharpness_jax.models.Model` or :class:`~sharpness_jax.resnet18.StatefulModel`.

    Raises:
      ValueError: one line: the factory cannot be loaded (:func:`load_factory`), fails when
        called, returns the wrong type, makes parameters of another dtype or outputs of
        another shape than ``(num_outputs,)``, or mixes examples.
    """
    fn = load_factory(spec)
    input_shape = tuple(int(d) for d in input_shape)
    dtype = np.dtype(param_dtype)
    given = {"input_shape": input_shape, "num_outputs": int(num_outputs), "param_dtype": dtype.name}
    try:
        made = fn(**given, **options)
    except Exception as err:
        raise ValueError(
            f"model.factory {spec!r} failed when called with {given} and options "
            f"{dict(options)} ({_first_line(err)}); it is called as fn(*, input_shape, "
            "num_outputs, param_dtype, **options)"
        ) from err
    input_dtype = dtype if example_inputs is None else _input_dtype(example_inputs, dtype)
    if _is_linen(made):
        model = _from_linen(made, spec, input_shape, int(num_outputs), dtype, input_dtype)
    elif isinstance(made, Model | StatefulModel):
        model = made
    else:
        raise ValueError(
            f"model.factory {spec!r} returned a {type(made).__name__}; return {_RETURNS}"
        )
    _check(model, spec, input_shape, int(num_outputs), dtype, input_dtype)
    if _is_linen(made) and example_inputs is not None:
        params = model.init(jax.random.PRNGKey(0))
        inputs = jnp.asarray(example_inputs[:3])
        try:
            adapters.check_no_example_mixing(_linen_apply(made, dtype), params, inputs)
        except ValueError as err:
            raise ValueError(f"model.factory {spec!r}: {err}") from err
    return model


def _is_linen(obj: Any) -> bool:
    import flax.linen as nn

    return isinstance(obj, nn.Module)


def _input_dtype(inputs: Any, dtype: np.dtype) -> np.dtype:
    """The dtype the model sees: real inputs in the run's dtype, others (token ids) as given."""
    given = np.asarray(inputs[:1]).dtype
    return dtype if np.issubdtype(given, np.inexact) else given


def _linen_apply(module: Any, dtype: np.dtype) -> Callable[[PyTree, jax.Array], jax.Array]:
    def apply(params: PyTree, x_batch: jax.Array) -> jax.Array:
        x_batch = jnp.asarray(x_batch)
        if jnp.issubdtype(x_batch.dtype, jnp.inexact):  # real inputs in the run's dtype
            x_batch = x_batch.astype(dtype)
        return module.apply({"params": params}, x_batch)

    return apply


def _from_linen(module: Any, spec: str, input_shape, num_outputs: int, dtype, input_dtype) -> Model:
    """A batch-first linen module with one collection, ``"params"``, as a zoo-style Model."""
    example = jax.ShapeDtypeStruct((1, *input_shape), input_dtype)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    try:
        with jax.numpy_dtype_promotion("standard"):  # params of a wrong dtype: refused below
            variables = jax.eval_shape(module.init, key, example)
    except Exception as err:
        raise ValueError(
            f"model.factory {spec!r}: module.init on a batch of one example of shape "
            f"{input_shape} failed ({_first_line(err)}); the module must take a batch (N, "
            f"*{input_shape})"
        ) from err
    if extra := sorted(set(variables) - {"params"}):
        raise ValueError(
            f"model.factory {spec!r}: the linen module has variable collections {extra} besides "
            "'params'; for batch-norm statistics return a sharpness_jax.resnet18.StatefulModel "
            "(train-mode updates, eval-mode measurements), or hold them fixed in a "
            "sharpness_jax.models.Model built with sharpness_jax.adapters.from_linen"
        )

    @jax.jit
    def init(key: jax.Array) -> PyTree:
        # Under standard promotion for this one trace, as flax creates some variables in
        # float32 whatever the param dtype; the params' dtype is checked by _check.
        with jax.numpy_dtype_promotion("standard"):
            return module.init(key, jnp.zeros((1, *input_shape), input_dtype))["params"]

    name = spec.split(":")[1]
    predict = adapters.per_example(_linen_apply(module, dtype))
    return Model(name, init, predict, input_shape, num_outputs)


def _check(model, spec: str, input_shape, num_outputs: int, dtype, input_dtype) -> None:
    """Shapes and dtypes of the model's params and of one example's outputs."""
    if tuple(model.input_shape) != input_shape or model.num_outputs != num_outputs:
        raise ValueError(
            f"model.factory {spec!r} returned a model for input_shape={tuple(model.input_shape)}"
            f", num_outputs={model.num_outputs}; the dataset has input_shape={input_shape}, "
            f"num_outputs={num_outputs}"
        )
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    x = jax.ShapeDtypeStruct(input_shape, input_dtype)
    failed = f"model.factory {spec!r}: %s of its model failed on one example of shape {input_shape}"
    try:
        params = jax.eval_shape(model.init, key)
    except Exception as err:
        raise ValueError(f"{failed % 'init'} ({_first_line(err)})") from err
    wrong = sorted(
        {
            np.dtype(leaf.dtype).name
            for leaf in jax.tree.leaves(params)
            if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.dtype != dtype
        }
    )
    if wrong:
        raise ValueError(
            f"model.factory {spec!r} makes parameters of dtype {wrong}, the run's dtype is "
            f"{dtype.name!r}; create them with param_dtype (the factory's keyword)"
        )
    try:
        if isinstance(model, StatefulModel):
            out = jax.eval_shape(model.eval_predict, *params, x)
        else:
            out = jax.eval_shape(model.predict, params, x)
    except Exception as err:
        raise ValueError(f"{failed % 'predict'} ({_first_line(err)})") from err
    shapes = [tuple(leaf.shape) for leaf in jax.tree.leaves(out)]
    if shapes != [(num_outputs,)]:
        raise ValueError(
            f"model.factory {spec!r}: one example's outputs have shape "
            f"{shapes[0] if len(shapes) == 1 else shapes}, but the dataset has {num_outputs} "
            f"outputs (classes): the model must return ({num_outputs},) per example"
        )
