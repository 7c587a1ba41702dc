"""The activation functions of the library, by name, with the symmetries they carry.

ONE table for every model: the flax zoo (:mod:`sharpness_jax.models`), the shallow nets
(:mod:`sharpness_jax.shallow`, :mod:`sharpness_jax.quotient`) and the function-preserving
reparametrisations (:mod:`sharpness_jax.symmetries`). Each model family accepts a subset of
the names (``models.ACTIVATIONS``, ``shallow.ACTIVATIONS``).

==============  ============================  ======  ========
name            σ(z)                          degree  parity
==============  ============================  ======  ========
``relu``        max(z, 0)                     1       —
``leaky_relu``  z for z ≥ 0, 0.1 z otherwise  1       —
``linear``      z                             1       odd
``identity``    z                             1       odd
``quadratic``   z²                            2       even
``tanh``        tanh(z)                       —       odd
``elu``         ``jax.nn.elu``                —       —
``gelu``        exact erf form of GELU        —       —
``softplus``    log(1 + eᶻ)                   —       —
==============  ============================  ======  ========

``degree`` is k of positive homogeneity, σ(cz) = c^k σ(z) for every c > 0 (None when σ has
none): a hidden unit of such a net can be rescaled without changing the function. ``parity``
says whether σ is odd (σ(−z) = −σ(z)) or even (σ(−z) = σ(z)): the discrete sign flips of a
unit. The leaky ReLU's negative slope is 0.1 (the shallow nets' choice; ``jax.nn.leaky_relu``
defaults to 0.01); every leaky slope is positively homogeneous of degree 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ACTIVATIONS", "Activation"]


class Activation(NamedTuple):
    """One activation function and its symmetries.

    Attributes:
      fn: σ, elementwise.
      degree: k with σ(cz) = c^k σ(z) for c > 0, or None (not positively homogeneous).
      parity: ``"odd"``, ``"even"`` or None.
    """

    fn: Callable[[jax.Array], jax.Array]
    degree: int | None
    parity: str | None


def _identity(z: jax.Array) -> jax.Array:
    return z


def _leaky_relu(z: jax.Array) -> jax.Array:
    return jnp.where(z >= 0, z, 0.1 * z)


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(jax.nn.relu, 1, None),
    "leaky_relu": Activation(_leaky_relu, 1, None),
    "linear": Activation(_identity, 1, "odd"),
    "identity": Activation(_identity, 1, "odd"),
    "quadratic": Activation(jnp.square, 2, "even"),
    "tanh": Activation(jnp.tanh, None, "odd"),
    "elu": Activation(jax.nn.elu, None, None),
    "gelu": Activation(functools.partial(jax.nn.gelu, approximate=False), None, None),
    "softplus": Activation(jax.nn.softplus, None, None),
}
