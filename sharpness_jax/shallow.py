"""Shallow (two-layer) networks f(x) = Σ_i a_i σ(w_iᵀ x + b_i), the quotient-geometry model.

Parameters are a plain dict, the layout every module relies on:

* ``"w"``: ``(m, d)`` input weights, row i is w_i;
* ``"b"``: ``(m,)`` biases (absent when the net has none);
* ``"a"``: ``(m, K)`` output weights, row i is a_i ∈ R^K.

Activations and their symmetry (the degree k of positive homogeneity, σ(cz) = c^k σ(z) for
c > 0, or oddness):

==============  =====================  ==========================================
activation      σ(z)                   symmetry of unit i
==============  =====================  ==========================================
``relu``        max(z, 0)              (a_i, w_i, b_i) → (a_i/c, c w_i, c b_i), k=1
``leaky_relu``  max(z, 0.1 z)          same, k=1
``quadratic``   z²                     (a_i/c², c w_i, c b_i), k=2; and w → −w
``tanh``        tanh(z)                sign flip (a_i, w_i, b_i) → (−a_i, −w_i, −b_i)
==============  =====================  ==========================================

Without bias and with σ(z) = z² the net is the quadratic model f(x) = xᵀ(Σ_i a_i w_i w_iᵀ)x.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["ACTIVATIONS", "HOMOGENEITY", "init_shallow", "shallow_predict"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda z: jnp.where(z >= 0, z, 0.1 * z),
    "quadratic": jnp.square,
    "tanh": jnp.tanh,
}

# Degree k of positive homogeneity; None for activations with only discrete symmetries.
HOMOGENEITY: dict[str, int | None] = {"relu": 1, "leaky_relu": 1, "quadratic": 2, "tanh": None}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown shallow-net activation {name!r}; choose from {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def shallow_predict(params: dict, x: jax.Array, *, activation: str = "relu") -> jax.Array:
    """f(x) = Σ_i a_i σ(w_iᵀ x + b_i) for ONE input x of shape ``(d,)``; returns ``(K,)``."""
    sigma = _activation(activation)
    pre = params["w"] @ x
    if "b" in params:
        pre = pre + params["b"]
    return sigma(pre) @ params["a"]


def init_shallow(
    key: jax.Array,
    *,
    input_dim: int,
    width: int,
    num_outputs: int = 1,
    bias: bool = True,
    scale: float = 1.0,
    dtype=jnp.float32,
) -> dict:
    """LeCun-normal w (variance 1/d), zero b, a with variance 1/m, all times ``scale``."""
    kw, ka = jax.random.split(key)
    params = {
        "w": scale * jax.random.normal(kw, (width, input_dim), dtype) / jnp.sqrt(input_dim),
        "a": scale * jax.random.normal(ka, (width, num_outputs), dtype) / jnp.sqrt(width),
    }
    if bias:
        params["b"] = jnp.zeros((width,), dtype)
    return {k: params[k] for k in ("w", "b", "a") if k in params}
