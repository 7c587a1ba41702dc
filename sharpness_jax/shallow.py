"""Shallow (two-layer) networks f(x) = Σ_i a_i σ(w_iᵀ x + b_i), the quotient-geometry model.

Parameters are a plain dict, the layout every module relies on:

* ``"w"``: ``(m, d)`` input weights, row i is w_i;
* ``"b"``: ``(m,)`` biases (absent when the net has none);
* ``"a"``: ``(m, K)`` output weights, row i is a_i ∈ R^K.

Activations (entries of the table in :mod:`sharpness_jax.activations`) and their symmetry (the
degree k of positive homogeneity, σ(cz) = c^k σ(z) for c > 0, or oddness):

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

import jax
import jax.numpy as jnp

from sharpness_jax import checks
from sharpness_jax.activations import ACTIVATIONS as _TABLE
from sharpness_jax.activations import Activation

__all__ = [
    "ACTIVATIONS",
    "HOMOGENEITY",
    "check_shallow",
    "get_activation",
    "init_shallow",
    "shallow_predict",
]

# The activations a shallow net takes, by their names in sharpness_jax.activations.
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "quadratic", "tanh")

# Degree k of positive homogeneity; None for activations with only discrete symmetries.
HOMOGENEITY: dict[str, int | None] = {name: _TABLE[name].degree for name in ACTIVATIONS}


def get_activation(name: str) -> Activation:
    """The table entry of a shallow-net activation.

    Raises:
      ValueError: for a name outside :data:`ACTIVATIONS`.
    """
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown shallow-net activation {name!r}; choose from {sorted(ACTIVATIONS)}"
        )
    return _TABLE[name]


def check_shallow(params: dict, *, activation: str) -> tuple[int, int | None]:
    """Validates the shallow-net layout; returns (m, k) with k None for non-homogeneous σ.

    Raises:
      ValueError / TypeError: on an unknown activation, missing or extra keys, wrong shapes,
        non-floating or mixed dtypes.
    """
    k = get_activation(activation).degree
    if not isinstance(params, dict):
        raise TypeError(f"shallow-net params must be a dict, got {type(params).__name__}")
    extra = set(params) - {"w", "b", "a"}
    if extra or "w" not in params or "a" not in params:
        raise ValueError(
            "shallow-net params need keys 'w' (m, d), 'a' (m, K) and optionally 'b' (m,); got "
            f"{sorted(params)}"
        )
    checks.check_params(params)
    w, a = params["w"], params["a"]
    if jnp.ndim(w) != 2:
        raise ValueError(f"params['w'] must have shape (m, d), got {jnp.shape(w)}")
    m = jnp.shape(w)[0]
    if jnp.ndim(a) != 2 or jnp.shape(a)[0] != m:
        raise ValueError(f"params['a'] must have shape (m={m}, K), got {jnp.shape(a)}")
    if "b" in params and jnp.shape(params["b"]) != (m,):
        raise ValueError(f"params['b'] must have shape (m={m},), got {jnp.shape(params['b'])}")
    dtypes = {jnp.result_type(leaf) for leaf in params.values()}
    if len(dtypes) != 1:
        raise TypeError(f"all shallow-net params must share one dtype, got {dtypes}")
    return m, k


def shallow_predict(params: dict, x: jax.Array, *, activation: str = "relu") -> jax.Array:
    """f(x) = Σ_i a_i σ(w_iᵀ x + b_i) for ONE input x of shape ``(d,)``; returns ``(K,)``."""
    sigma = get_activation(activation).fn
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
