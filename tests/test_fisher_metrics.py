"""Tests of sharpness_jax.fisher_metrics against dense float64 references."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fisher_problems import tanh_ce as _tanh_ce
from jax.flatten_util import ravel_pytree
from problems import cnn_problem, flat, mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import fisher_metrics


@pytest.fixture(scope="module")
def tanh_ce():
    return _tanh_ce()


def test_diagonal_fishers_match_dense_references(tanh_ce):
    prob, ref = tanh_ce
    obj, batch = prob.objective, prob.batch
    # Squared error without the ½: F_out = 2I, so diag F = (2/n) Σ_p Σ_k (J_p)_ki².
    se_sum = sj.Objective(obj.predict, sj.get_loss("squared_error_sum"))

    @jax.jit
    def diagonals(p):
        return (
            fisher_metrics.empirical_fisher_diagonal(obj, p, batch),
            fisher_metrics.fisher_diagonal(obj, p, batch),
            # 7 examples in chunks of 3 (the last one padded).
            fisher_metrics.empirical_fisher_diagonal(obj, p, batch, chunk_size=3),
            fisher_metrics.fisher_diagonal(obj, p, batch, chunk_size=3),
            fisher_metrics.fisher_diagonal(obj, p, batch, subset="params/Dense_1/kernel"),
            fisher_metrics.fisher_diagonal(se_sum, p, batch, chunk_size=2),
        )

    emp, true, emp_chunked, true_chunked, sub, true_se = diagonals(prob.params)
    emp, true = flat(emp), flat(true)
    assert rel_err(emp, np.diag(ref.Femp)) < 1e-12
    # Not the square of the batch gradient.
    assert rel_err(np.square(ref.g.mean(0)), emp) > 0.1
    assert rel_err(true, np.diag(ref.G)) < 1e-12
    assert rel_err(flat(emp_chunked), emp) < 1e-13
    assert rel_err(flat(true_chunked), true) < 1e-13
    # Subset: the diagonal of one layer's block.
    assert set(sub) == {"params/Dense_1/kernel"}
    block = ref.unravel(jnp.asarray(np.diag(ref.G)))["params"]["Dense_1"]["kernel"]
    np.testing.assert_allclose(sub["params/Dense_1/kernel"], block, rtol=1e-12)
    assert rel_err(flat(true_se), 2 * np.mean(np.sum(ref.J**2, axis=1), axis=0)) < 1e-12


def test_diagonal_inverse_sqrt_excludes_zero_entries():
    d = {"a": jnp.array([4.0, 0.0, 1.0])}
    v = {"a": jnp.array([1.0, 1.0, 2.0])}
    np.testing.assert_array_equal(fisher_metrics.diagonal_inverse_sqrt(d)(v)["a"], [0.5, 0.0, 2.0])
    damped = fisher_metrics.diagonal_inverse_sqrt(d, damping=3.0)(v)["a"]
    np.testing.assert_allclose(damped, [1 / np.sqrt(7.0), 1 / np.sqrt(3.0), 1.0], rtol=1e-15)
    with pytest.raises(ValueError, match="damping"):
        fisher_metrics.diagonal_inverse_sqrt(d, damping=-1.0)


class _Positions(nn.Module):
    """A Dense layer over T = 3 positions of one example, then a Dense head."""

    @nn.compact
    def __call__(self, x):  # one example (3, 4)
        return nn.Dense(2)(jnp.mean(jnp.tanh(nn.Dense(5)(x)), axis=0))


def _positions_problem(n=6):
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(kx, (n, 3, 4), jnp.float64)
    y = jax.random.randint(ky, (n,), 0, 2)
    module = _Positions()
    params = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64), module.init(kp, x[0].astype(jnp.float32))
    )
    return sj.Objective(module.apply, sj.get_loss("cross_entropy")), params, sj.Batch(x, y)


@pytest.mark.parametrize("kind", ["mlp", "positions"])
def test_factored_empirical_fisher_diagonal_equals_squared_example_gradients(kind):
    """Σ_p (a_p²)(δ_p²)ᵀ per Dense layer (per-example layer gradients at T > 1) against
    jax.vmap(jax.grad) per-example gradients, chunked and not, float64."""
    if kind == "mlp":
        prob = mlp_problem("tanh", "cross_entropy", widths=(6, 3))
        obj, params, batch = prob.objective, prob.params, prob.batch
    else:
        obj, params, batch = _positions_problem()
    grads = jax.vmap(jax.grad(obj.example_loss), (None, 0, 0))(params, *batch)
    want = np.mean(np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(grads)) ** 2, axis=0)
    for chunk in (None, 4):
        for method in ("auto", "factored", "per_example"):
            got = fisher_metrics.empirical_fisher_diagonal(
                obj, params, batch, chunk_size=chunk, method=method
            )
            assert rel_err(flat(got), want) < 1e-12, (chunk, method)


def test_factored_fisher_diagonal_needs_dense_layers():
    prob = cnn_problem()
    obj, params, batch = prob.objective, prob.params, prob.batch
    with pytest.raises(ValueError, match="factored Fisher diagonal does not apply"):
        fisher_metrics.empirical_fisher_diagonal(obj, params, batch, method="factored")
    with pytest.raises(ValueError, match="method must be"):
        fisher_metrics.empirical_fisher_diagonal(obj, params, batch, method="dense")
    auto = fisher_metrics.empirical_fisher_diagonal(obj, params, batch)
    per_example = fisher_metrics.empirical_fisher_diagonal(obj, params, batch, method="per_example")
    np.testing.assert_array_equal(flat(auto), flat(per_example))
