"""Memory is bounded by the chunk size, not by n; O(P²) routes refuse with a clear error.

Peak memory is read from XLA's compiled memory analysis (temporary buffers, arguments
excluded) of the jitted computation at n and 4n examples with the same chunk size: nothing
runs, so large n cost only compile time.
"""

import jax
import jax.numpy as jnp
import pytest

import sharpness_jax as sj
from sharpness_jax import models, noise, second_moment

D, K, CHUNK = 20, 3, 64


def _setup():
    model = models.build_model(
        "mlp",
        input_shape=(D,),
        num_outputs=K,
        widths=(16,),
        activation="tanh",
        param_dtype="float64",
    )
    params = model.init(jax.random.PRNGKey(0))
    return sj.Objective(model.predict, sj.get_loss("cross_entropy")), params


def _batch(n):
    return sj.Batch(
        jax.ShapeDtypeStruct((n, D), jnp.float64), jax.ShapeDtypeStruct((n,), jnp.int32)
    )


def _temp_bytes(fn, params, n):
    compiled = jax.jit(fn).lower(params, _batch(n), params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


QUANTITIES = {
    "gradient": lambda o: lambda p, b, v: sj.gradient(o, p, b, chunk_size=CHUNK),
    "hessian": lambda o: lambda p, b, v: sj.hessian(o, p, b, chunk_size=CHUNK)(v),
    "ggn": lambda o: lambda p, b, v: sj.ggn(o, p, b, chunk_size=CHUNK)(v),
    "gradient_covariance": lambda o: (
        lambda p, b, v: sj.gradient_covariance(o, p, b, chunk_size=CHUNK)(v)
    ),
    "hessian_second_moment": lambda o: (
        lambda p, b, v: sj.hessian_second_moment(o, p, b, chunk_size=CHUNK)(v)
    ),
    "hessian_second_moment_per_example": lambda o: (
        lambda p, b, v: sj.hessian_second_moment(o, p, b, chunk_size=CHUNK, method="per_example")(v)
    ),
    "covariance_diagonal": lambda o: (
        lambda p, b, v: noise.gradient_covariance_diagonal(o, p, b, chunk_size=CHUNK)
    ),
    "second_moment_diagonal": lambda o: (
        lambda p, b, v: second_moment.hessian_second_moment_diagonal(
            o, p, b, chunk_size=CHUNK, basis_chunk_size=16
        )
    ),
    "gradient_hessian_moments": lambda o: (
        lambda p, b, v: sj.batch_moments.gradient_hessian_moments(o, p, b, chunk_size=CHUNK)
    ),
}


@pytest.mark.parametrize("name", sorted(QUANTITIES))
def test_peak_memory_does_not_grow_with_n(name):
    objective, params = _setup()
    fn = QUANTITIES[name](objective)
    small, large = _temp_bytes(fn, params, 1024), _temp_bytes(fn, params, 4096)
    # A few bytes per example (masks, indices) may scale; the activations must not.
    assert large <= small + 16 * 4096, (name, small, large)


def test_unchunked_memory_does_grow():
    """The check above can fail: without chunking, activations scale with n."""
    objective, params = _setup()

    def fn(p, b, v):
        return sj.hessian(objective, p, b)(v)

    assert _temp_bytes(fn, params, 4096) > 3 * _temp_bytes(fn, params, 1024)


def test_quadratic_routes_refuse_beyond_the_limit():
    objective, params = _setup()
    b = sj.Batch(jnp.zeros((8, D)), jnp.zeros((8,), jnp.int32))
    H = sj.hessian(objective, params, b)
    with pytest.raises(MemoryError, match="lanczos_top_k"):
        sj.dense(H, params, max_bytes=1000)
    with pytest.raises(MemoryError, match="hutchinson"):
        second_moment.hessian_second_moment_diagonal(objective, params, b, max_bytes=1000)
    with pytest.raises(MemoryError, match="gradient_covariance_diagonal"):
        noise.gradient_covariance_dense(objective, params, b, max_bytes=1000)
    with pytest.raises(MemoryError, match="Gram"):
        noise.gradient_covariance_gram(objective, params, b, max_bytes=100)
    # Under the limit they run.
    assert sj.dense(H, params).shape == (sj.num_params(params),) * 2
