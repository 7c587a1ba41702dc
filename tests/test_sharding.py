"""The same code with the batch sharded over a 1-D mesh of 4 (simulated) devices."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from problems import flat, mlp_problem, rel_err

import sharpness_jax as sj

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4"
)


def _shard(batch, mesh):
    spec = NamedSharding(mesh, PartitionSpec("data"))
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, spec), batch)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_operators_on_a_sharded_batch_equal_single_device(chunk_size):
    prob = mlp_problem("tanh", "cross_entropy", n=16)
    o, p, b = prob.objective, prob.params, prob.batch
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = _shard(b, mesh)
    assert len(sharded.inputs.sharding.device_set) == 4
    key = jax.random.PRNGKey(0)

    @jax.jit
    def measure(p, b, v):
        return {
            "loss": sj.loss_value(o, p, b, chunk_size=chunk_size),
            "grad": sj.gradient(o, p, b, chunk_size=chunk_size),
            "H": sj.hessian(o, p, b, chunk_size=chunk_size)(v),
            "G": sj.ggn(o, p, b, chunk_size=chunk_size)(v),
            "C": sj.gradient_covariance(o, p, b, chunk_size=chunk_size)(v),
            "H2": sj.hessian_second_moment(o, p, b, chunk_size=chunk_size)(v),
            "MC": sj.fisher_monte_carlo(o, p, b, key=key, chunk_size=chunk_size)(v),
        }

    v = jax.tree_util.tree_map(lambda a: a + 1.0, p)
    single = measure(p, b, v)
    multi = measure(p, sharded, v)
    for name in single:
        assert rel_err(flat(multi[name]), flat(single[name])) < 1e-6, name


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_factored_gram_and_trace_of_c_on_a_sharded_batch_equal_single_device(chunk_size):
    """The factored n × n Gram of per-example gradients, exact tr(C) and the spectrum of C
    from it, with the examples sharded over 4 devices."""
    from sharpness_jax import gradient_gram

    prob = mlp_problem("tanh", "cross_entropy", n=16)
    o, p, b = prob.objective, prob.params, prob.batch
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    kw = dict(chunk_size=chunk_size, method="factored")

    @jax.jit
    def measure(p, b):
        spec = gradient_gram.covariance_spectrum(o, p, b, chunk_size=chunk_size)
        return {
            "gram": gradient_gram.gradient_gram(o, p, b, **kw),
            "trace": gradient_gram.covariance_trace(o, p, b, **kw)[0],
            "eigenvalues": spec.eigenvalues,
        }

    single, multi = measure(p, b), measure(p, _shard(b, mesh))
    for name in single:
        assert rel_err(np.ravel(multi[name]), np.ravel(single[name])) < 1e-6, name
    per = sj.per_example_grads(o, p, b)
    grads = np.concatenate([np.reshape(a, (16, -1)) for a in jax.tree_util.tree_leaves(per)], 1)
    np.testing.assert_allclose(single["gram"], grads @ grads.T, rtol=1e-8, atol=1e-12)
