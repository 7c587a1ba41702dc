"""Model factories for ``model.factory`` in the tests (``"factory_models:<name>"``): each is
called as ``fn(*, input_shape, num_outputs, param_dtype, **options)``."""

import math

import flax.linen as nn
import jax.numpy as jnp

from sharpness_jax import models

NOT_CALLABLE = 42


class _MLP(nn.Module):
    """Batch-first: flatten, Dense → tanh, Dense to K (``extra`` more outputs, ``center``
    subtracts the batch mean: the model then mixes examples)."""

    width: int
    num_outputs: int
    dtype: str
    center: bool = False

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        if self.center:
            x = x - jnp.mean(x, axis=0, keepdims=True)
        x = jnp.tanh(nn.Dense(self.width, param_dtype=self.dtype)(x))
        return nn.Dense(self.num_outputs, param_dtype=self.dtype)(x)


def linen_mlp(*, input_shape, num_outputs, param_dtype, width=6, **options):
    """A batch-first linen MLP of one hidden layer of ``width`` units."""
    assert math.prod(input_shape) > 0
    return _MLP(width, num_outputs, param_dtype)


def zoo_mlp(*, input_shape, num_outputs, param_dtype, **options):
    """A ``models.Model``: the zoo's MLP of one hidden layer of 5 units."""
    return models.build_model(
        "mlp",
        input_shape=input_shape,
        num_outputs=num_outputs,
        param_dtype=param_dtype,
        widths=(5,),
        activation="tanh",
    )


def too_many_outputs(*, input_shape, num_outputs, param_dtype, **options):
    return _MLP(4, num_outputs + 1, param_dtype)


def float32_params(*, input_shape, num_outputs, param_dtype, **options):
    return _MLP(4, num_outputs, "float32")


def mixes_examples(*, input_shape, num_outputs, param_dtype, **options):
    return _MLP(4, num_outputs, param_dtype, center=True)


class _BatchNormNet(nn.Module):
    num_outputs: int
    dtype: str

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, param_dtype=self.dtype)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=True, param_dtype=self.dtype)(x)
        return nn.Dense(self.num_outputs, param_dtype=self.dtype)(x)


def batch_norm(*, input_shape, num_outputs, param_dtype, **options):
    return _BatchNormNet(num_outputs, param_dtype)


def wrong_type(*, input_shape, num_outputs, param_dtype, **options):
    return {"predict": None}


def strict(*, input_shape, num_outputs, param_dtype):
    """Takes no options."""
    return _MLP(4, num_outputs, param_dtype)


class _BagOfTokens(nn.Module):
    num_outputs: int
    dtype: str

    @nn.compact
    def __call__(self, tokens):  # (N, T) integer ids
        h = nn.Embed(7, 4, param_dtype=self.dtype)(tokens)
        return nn.Dense(self.num_outputs, param_dtype=self.dtype)(jnp.mean(h, axis=1))


def bag_of_tokens(*, input_shape, num_outputs, param_dtype, **options):
    """Integer token inputs: embedded, averaged over positions, Dense to K."""
    return _BagOfTokens(num_outputs, param_dtype)
