"""Shallow nets and batches shared by the quotient-geometry and symmetry tests."""

import jax
import jax.numpy as jnp

import sharpness_jax as sj
from sharpness_jax.shallow import init_shallow, shallow_predict

HALF_SE = sj.get_loss("squared_error_half")


def shallow_problem(activation, *, m=3, d=3, K=1, bias=True, n=6, seed=0, noise=1.0):
    """Random regular params (non-zero biases) and a batch with Gaussian targets."""
    kp, kx, ky, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = init_shallow(kp, input_dim=d, width=m, num_outputs=K, bias=bias, dtype=jnp.float64)
    if bias:
        params["b"] = 0.3 * jax.random.normal(kb, (m,), jnp.float64)
    x = jax.random.normal(kx, (n, d), jnp.float64)
    y = noise * jax.random.normal(ky, (n, K), jnp.float64)
    return params, sj.Batch(x, y)


def outputs(params, x, activation):
    return jax.vmap(lambda xi: shallow_predict(params, xi, activation=activation))(x)
