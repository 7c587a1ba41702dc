r"""CIFAR-style ResNet-18 with batch norm, split into trainable params and frozen state.

The network of He et al. (2016) as adapted to 32×32 inputs (e.g. in the progressive-sharpening
experiments of MacDonald, Valmadre & Lucey 2023): a 3×3 stem convolution, four stages of two
basic blocks with 64·w, 128·w, 256·w, 512·w channels (w the width multiplier; stride 2 at the
first block of stages 2–4, a 1×1 strided projection where the shape changes), batch norm after
every convolution, ReLU, global average pooling and a dense layer to K outputs. Convolutions
have no bias (batch norm's offset plays its role).

Batch norm mixes examples in training mode, so the model has two modes:

* **eval mode** (:func:`eval_predict`): every batch-norm layer uses its running statistics
  ``state`` (mean, variance), held FIXED. The output for one example depends on that example
  alone, so per-example gradients, Hessians, GGN, Fisher and noise covariances are defined. The
  running statistics are not differentiated: they are not parameters, only ``params`` is.
* **train mode** (:func:`train_apply`): a batch is normalised with its own statistics and the
  running averages are updated, ``m ← μ·m + (1 − μ)·batch mean`` (flax ``nn.BatchNorm`` with
  ``momentum`` μ = 0.9, the biased batch variance), as flax's ``mutable=["batch_stats"]``.

:func:`with_state` gives the per-example :class:`~sharpness_jax.models.Model` of eval mode at a
given state, the state a pytree leaf of its ``predict`` (a ``jax.tree_util.Partial``), so a
jitted program that takes the objective as an argument takes the state as one too (not as a
constant), and is compiled once for every state of the same shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["StatefulModel", "build_resnet18", "stateful_model", "with_state"]

STAGES = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
MOMENTUM = 0.9
EPSILON = 1e-5


def _conv(features: int, k: int, stride: int, dtype: Any) -> nn.Conv:
    """A k×k convolution without bias (He-normal init), created in the calling module."""
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding="SAME" if k == 3 else "VALID",
        use_bias=False,
        param_dtype=dtype,
        dtype=dtype,
        kernel_init=nn.initializers.he_normal(),
    )


def _norm(train: bool, dtype: Any) -> nn.BatchNorm:
    """Batch norm: batch statistics (updated) in train mode, running averages otherwise."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        force_float32_reductions=False,
        param_dtype=dtype,
        dtype=dtype,
    )


class _BasicBlock(nn.Module):
    features: int
    stride: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, k, s: _conv(f, k, s, self.dtype)
        norm = lambda: _norm(train, self.dtype)
        h = nn.relu(norm()(conv(self.features, 3, self.stride)(x)))
        h = norm()(conv(self.features, 3, 1)(h))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm()(conv(self.features, 1, self.stride)(x))
        return nn.relu(h + x)


class _ResNet18(nn.Module):
    widths: tuple[int, ...]
    num_outputs: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        """``x``: a batch (N, H, W, C) -> (N, K)."""
        x = _norm(train, self.dtype)(_conv(self.widths[0], 3, 1, self.dtype)(x))
        x = nn.relu(x)
        for stage, width in enumerate(self.widths):
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(width, stride, self.dtype)(x, train)
        x = jnp.mean(x, axis=(-3, -2))
        return nn.Dense(self.num_outputs, param_dtype=self.dtype, dtype=self.dtype)(x)


class StatefulModel(NamedTuple):
    """A model with trainable ``params`` and non-trainable ``state`` (batch-norm statistics).

    Attributes:
      name: ``"resnet18"`` (or the name given to :func:`stateful_model`).
      init: ``key -> (params, state)``.
      eval_predict: ``(params, state, x) -> (K,)`` for ONE example, running statistics frozen.
      train_apply: ``(params, state, x_batch) -> (outputs (N, K), new_state)``, train mode.
      module: the flax module (``module.apply({"params": ..., "batch_stats": ...}, x, train)``).
      input_shape: the shape of one example.
      num_outputs: K.
    """

    name: str
    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    eval_predict: Callable[[PyTree, PyTree, jax.Array], jax.Array]
    train_apply: Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]]
    module: nn.Module
    input_shape: tuple[int, ...]
    num_outputs: int


def build_resnet18(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    width_multiplier: float = 1.0,
    param_dtype: Any = "float32",
) -> StatefulModel:
    """The CIFAR-style ResNet-18 (module docstring) for images of shape ``(H, W, C)``.

    Args:
      input_shape: ``(H, W, C)`` of one example.
      num_outputs: K.
      width_multiplier: w > 0; stage widths ``max(1, round(w · (64, 128, 256, 512)))``
        (1: the published network, 11.2 M parameters for K = 10; small w for tests).
      param_dtype: "float32" or "float64".

    Raises:
      ValueError: for a bad shape, K, width multiplier or dtype.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"resnet18 takes images of shape (H, W, C), got {input_shape}")
    if not (isinstance(num_outputs, int) and num_outputs >= 1):
        raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}")
    if not (isinstance(width_multiplier, int | float) and width_multiplier > 0):
        raise ValueError(f"width_multiplier must be a positive number, got {width_multiplier!r}")
    dtype = jnp.dtype(param_dtype)
    if dtype.name not in ("float32", "float64"):
        raise ValueError(f"param_dtype must be float32 or float64, got {param_dtype!r}")
    widths = tuple(max(1, round(width_multiplier * c)) for c in STAGES)
    module = _ResNet18(widths, num_outputs, dtype)
    return stateful_model("resnet18", module, input_shape, num_outputs, dtype)


def stateful_model(
    name: str, module: nn.Module, input_shape: tuple[int, ...], num_outputs: int, dtype: Any
) -> StatefulModel:
    """The :class:`StatefulModel` of a flax module ``module(x_batch, train)`` whose
    non-trainable state is its ``batch_stats`` collection (batch norm), in ``dtype``.

    Args:
      name: the model's name.
      module: a linen module taking a batch and ``train`` (batch statistics used and updated
        when True, running averages when False).
      input_shape: the shape of ONE example.
      num_outputs: K.
      dtype: the param (and state) dtype.
    """

    @jax.jit
    def init(key):
        # flax creates the running statistics in float32 whatever the param dtype; they are
        # cast to it here (under standard promotion for this one trace), so that every later
        # apply computes in the param dtype alone.
        with jax.numpy_dtype_promotion("standard"):
            variables = module.init(key, jnp.zeros((1, *input_shape), dtype), train=False)
        state = jax.tree.map(lambda a: a.astype(dtype), variables["batch_stats"])
        return variables["params"], state

    def eval_predict(params, state, x):
        if jnp.shape(x) != input_shape:
            raise ValueError(
                f"{name} eval_predict takes ONE example of shape {input_shape} (no batch "
                f"axis), got shape {jnp.shape(x)}; use jax.vmap over a batch"
            )
        state = jax.lax.stop_gradient(state)
        x = jnp.asarray(x, dtype)[None]
        return module.apply({"params": params, "batch_stats": state}, x, train=False)[0]

    def train_apply(params, state, x_batch):
        x_batch = jnp.asarray(x_batch, dtype)
        outputs, updated = module.apply(
            {"params": params, "batch_stats": state}, x_batch, train=True, mutable=["batch_stats"]
        )
        return outputs, updated["batch_stats"]

    return StatefulModel(name, init, eval_predict, train_apply, module, input_shape, num_outputs)


@functools.lru_cache(maxsize=64)
def _at_state(eval_predict: Callable) -> Callable:
    """``(state, params, x) -> eval_predict(params, state, x)``, one function per model, so
    that the objectives of one model at different states share their static part."""

    def frozen(state, params, x):
        return eval_predict(params, state, x)

    return frozen


def with_state(model: StatefulModel, state: PyTree):
    """The per-example eval-mode :class:`~sharpness_jax.models.Model` at running statistics
    ``state`` (held fixed; only ``params`` are its parameters).

    Its ``predict`` is ``jax.tree_util.Partial(f, state)`` with one ``f`` per model: the
    state is a pytree leaf of the predict (and of an :class:`~sharpness_jax.objective.Objective`
    built on it), so the objectives of one model at two states have the same tree structure
    and a jitted program that takes the objective as an argument is compiled once for both.
    """
    from sharpness_jax.models import Model

    predict = jax.tree_util.Partial(_at_state(model.eval_predict), state)

    def init(key):
        return model.init(key)[0]

    return Model(model.name, init, predict, model.input_shape, model.num_outputs)
