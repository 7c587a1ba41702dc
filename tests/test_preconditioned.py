"""Preconditioned sharpness against dense P^{-1/2} H P^{-1/2}; ∇λ_max against finite
differences of the dense λ_max in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpness_jax as sj
from sharpness_jax import preconditioned
from tests import problems


@pytest.fixture(scope="module")
def mlp():
    p = problems.mlp_problem(n=10)
    return p.objective, p.params, p.batch


def _flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def test_preconditioned_lambda_max_matches_dense(mlp):
    objective, params, batch = mlp
    diag = jax.tree_util.tree_map(
        lambda a: jnp.exp(jax.random.normal(jax.random.PRNGKey(a.size), a.shape)), params
    )
    h = np.asarray(sj.linalg.dense(sj.hessian(objective, params, batch), params))
    d = np.asarray(_flat(diag))
    expected = np.linalg.eigvalsh(h / np.sqrt(np.outer(d, d)))[::-1][:2]
    eig = preconditioned.preconditioned_lambda_max(
        objective, params, batch, diag, k=2, num_iters=60, tol=1e-10
    )
    np.testing.assert_allclose(eig.values, expected, rtol=1e-8)
    bad = jax.tree_util.tree_map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="positive"):
        preconditioned.preconditioned_lambda_max(objective, params, batch, bad)


def test_adam_preconditioner_reads_the_bias_corrected_second_moment(mlp):
    objective, params, batch = mlp
    opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-2, b2=0.99, eps=1e-6))
    state = opt.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
        for _ in range(3):
            g = sj.gradient(objective, params, batch)
            updates, state = opt.update(g, state, params)
            params = optax.apply_updates(params, updates)
    adam = state[1][0]
    expected = jax.tree_util.tree_map(lambda nu: jnp.sqrt(nu / (1 - 0.99**3)) + 1e-6, adam.nu)
    got = preconditioned.adam_preconditioner(state, b2=0.99, eps=1e-6)
    np.testing.assert_allclose(_flat(got), _flat(expected), rtol=1e-6)
    with pytest.raises(ValueError, match="ScaleByAdamState"):
        preconditioned.adam_preconditioner(optax.sgd(0.1).init(params))


def test_adaptive_threshold():
    assert preconditioned.adaptive_stability_threshold(0.01, 0.9) == pytest.approx(3800.0)
    assert preconditioned.adaptive_stability_threshold(0.1, 0.0) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="b1"):
        preconditioned.adaptive_stability_threshold(0.1, 1.0)


def test_lambda_max_gradient_matches_finite_differences(mlp):
    objective, params, batch = mlp
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def lam(x):
        h = sj.linalg.dense(sj.hessian(objective, unravel(x), batch), params)
        return np.linalg.eigvalsh(np.asarray(h))[-1]

    result = preconditioned.lambda_max_gradient(objective, params, batch)
    np.testing.assert_allclose(result.value, lam(flat), rtol=1e-10)
    grad = np.asarray(_flat(result.gradient))
    step = 1e-5
    for seed in range(2):
        d = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), flat.shape))
        d = d / np.linalg.norm(d)
        fd = (lam(flat + step * d) - lam(flat - step * d)) / (2 * step)
        np.testing.assert_allclose(grad @ d, fd, rtol=1e-5, atol=1e-9)
