"""zᵀHz forward over forward against the dense float64 Hessian, and the Hutchinson trace on it
against the Hessian-vector-product route with the same probes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from problems import mlp_problem

import sharpness_jax as sj
from sharpness_jax import hessian_forms, linalg, sharpness


def _dense_hessian(prob):
    theta, unravel = ravel_pytree(prob.params)
    x, y = prob.batch

    def mean_loss(t):
        return jnp.mean(jax.vmap(prob.objective.example_loss, (None, 0, 0))(unravel(t), x, y))

    return np.asarray(jax.hessian(mean_loss)(theta)), unravel


def test_quadratic_form_is_the_dense_hessians():
    prob = mlp_problem("tanh", "cross_entropy")
    hess, unravel = _dense_hessian(prob)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, hess.shape[0]), jnp.float64))
    for chunk in (None, 3):
        form = hessian_forms.hessian_quadratic_form(
            prob.objective, prob.params, prob.batch, chunk_size=chunk
        )
        got = jax.jit(jax.vmap(lambda v, f=form: f(unravel(v))))(jnp.asarray(z))
        np.testing.assert_allclose(got, np.einsum("ji,ik,jk->j", z, hess, z), rtol=1e-12)
    # A parameter subset: the quadratic form of that diagonal block.
    leaf = "params/Dense_1/kernel"
    sub = hessian_forms.hessian_quadratic_form(prob.objective, prob.params, prob.batch, subset=leaf)
    block = sharpness._restricted(prob.objective, prob.params, prob.batch, None, leaf)[1]
    v = jax.tree_util.tree_map(
        lambda a: jnp.cos(jnp.arange(1, a.size + 1, dtype=a.dtype)).reshape(a.shape), block
    )
    h_sub = sj.hessian(prob.objective, prob.params, prob.batch, subset=leaf)(v)
    np.testing.assert_allclose(sub(v), optax.tree.vdot(v, h_sub), rtol=1e-12)


def test_hutchinson_from_quadratic_forms_is_the_matvec_route():
    prob = mlp_problem("tanh", "cross_entropy")
    obj, params, batch = prob.objective, prob.params, prob.batch
    key = jax.random.PRNGKey(7)
    got = sharpness.hessian_trace_hutchinson(
        obj, params, batch, key=key, num_probes=30, probe_chunk=7, chunk_size=3
    )
    hvp = sj.hessian(obj, params, batch, chunk_size=3)
    want = linalg.hutchinson_trace(hvp, params, key=key, num_probes=30, probe_chunk=7)
    np.testing.assert_allclose(got.value, want.value, rtol=1e-12)
    np.testing.assert_allclose(got.stderr, want.stderr, rtol=1e-10)
    assert got.num_probes == 30
    hess, _ = _dense_hessian(prob)
    assert abs(float(got.value) - np.trace(hess)) < 5 * float(got.stderr)


def test_rademacher_probes_are_signs_with_the_templates_shapes():
    template = {"a": jnp.zeros((5, 7), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    probes = linalg.rademacher_sampler(template, num=400)(jax.random.PRNGKey(1))
    assert probes["a"].shape == (400, 5, 7) and probes["b"].shape == (400, 3)
    assert probes["b"].dtype == jnp.float32
    flat = np.concatenate([np.asarray(probes["a"]).reshape(400, -1), probes["b"]], axis=1)
    assert set(np.unique(flat)) == {-1.0, 1.0}
    # Independent fair signs: E z = 0 and E zzᵀ = I within sampling error.
    assert np.max(np.abs(flat.mean(0))) < 5 / np.sqrt(400)
    second = flat.T @ flat / 400
    assert np.max(np.abs(second - np.eye(38))) < 5 / np.sqrt(400)
