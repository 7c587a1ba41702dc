"""Inverse-curvature products against dense float64 references on a tiny MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree
from problems import Dense, flat, mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import inverse, linear_operator

PROB = mlp_problem()  # tanh MLP 4-5-3, cross-entropy, n = 7: P = 43, H indefinite
P = 43


@pytest.fixture(scope="module")
def dense():
    return Dense(PROB)


def _args():
    return PROB.objective, PROB.params, PROB.batch


def _matmul(matrix, v):
    return matrix @ v


# (constructor, dense attribute, damping, method): the damped Hessian with λ = 0.5 is
# positive definite, with λ = 0.01 indefinite.
CASES = {
    "ggn": (sj.ggn, "G", 0.1, "cg"),
    "fisher": (sj.fisher, "G", 0.1, "cg"),  # F = G for softmax cross-entropy
    "covariance": (sj.gradient_covariance, "C", 0.1, "cg"),
    "hessian-damped": (sj.hessian, "H", 0.5, "cg"),
    "hessian-indefinite": (sj.hessian, "H", 0.01, "gmres"),
    "hessian-bicgstab": (sj.hessian, "H", 0.5, "bicgstab"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_solve_matches_dense(dense, case):
    build, name, damping, method = CASES[case]
    matrix = getattr(dense, name)
    if case == "hessian-indefinite":
        assert np.linalg.eigvalsh(matrix)[0] + damping < 0
    v, vf = dense.random_vector(1)
    sol = inverse.solve(build(*_args()), v, damping=damping, method=method, tol=1e-13, restart=P)
    expected = np.linalg.solve(matrix + damping * np.eye(P), vf)
    assert bool(sol.converged)
    assert rel_err(flat(sol.x), expected) < 1e-8
    residual = np.linalg.norm(vf - (matrix + damping * np.eye(P)) @ flat(sol.x))
    np.testing.assert_allclose(float(sol.residual_norm), residual, rtol=1e-3, atol=1e-13)
    assert 1 <= int(sol.num_iters) <= 10 * P


def test_preconditioned_cg_needs_fewer_iterations(dense):
    scales = np.logspace(-1, 1, P)
    matrix = jnp.asarray(scales[:, None] * (dense.G + 0.1 * np.eye(P)) * scales[None, :])
    op = linear_operator.operator(_matmul, matrix)
    b = jnp.asarray(np.random.default_rng(2).standard_normal(P))
    diag = sj.diagonal_exact(op, b)
    plain = inverse.solve(op, b, tol=1e-10)
    pre = inverse.solve(op, b, tol=1e-10, preconditioner=diag)
    expected = np.linalg.solve(np.asarray(matrix), np.asarray(b))
    assert bool(plain.converged) and bool(pre.converged)
    assert rel_err(pre.x, expected) < 1e-6
    assert int(pre.num_iters) < int(plain.num_iters)
    # A plain function runs the same solve, uncompiled.
    unwrapped = inverse.solve(lambda v: matrix @ v, b, tol=1e-10)
    np.testing.assert_allclose(unwrapped.x, plain.x, rtol=1e-10)
    # A Hutchinson estimate of the diagonal is taken too (as its value).
    estimate = sj.hutchinson_diagonal(op, b, key=jax.random.PRNGKey(0), num_probes=4)
    assert bool(inverse.solve(op, b, tol=1e-10, preconditioner=estimate).converged)


def test_non_convergence_is_reported_not_raised(dense):
    v, _ = dense.random_vector(3)
    sol = inverse.solve(sj.ggn(*_args()), v, damping=1e-3, max_iters=1)
    assert not bool(sol.converged)
    assert int(sol.num_iters) == 1
    assert np.isfinite(float(sol.residual_norm)) and float(sol.residual_norm) > 1e-3


def test_solve_rejects_bad_settings(dense):
    v, _ = dense.random_vector(0)
    with pytest.raises(ValueError, match="method"):
        inverse.solve(sj.ggn(*_args()), v, method="minres")
    with pytest.raises(ValueError, match="damping"):
        inverse.solve(sj.ggn(*_args()), v, damping=-1.0)


def test_natural_gradient_matches_dense(dense):
    sol = inverse.natural_gradient(*_args(), damping=0.1, tol=1e-13)
    expected = np.linalg.solve(dense.G + 0.1 * np.eye(P), dense.gbar)
    assert bool(sol.converged)
    assert rel_err(flat(sol.x), expected) < 1e-8


def test_solve_under_jit_compiles_once(dense):
    v, _ = dense.random_vector(4)
    run = jax.jit(
        lambda params, b: (
            inverse.natural_gradient(PROB.objective, params, PROB.batch, damping=0.1, tol=1e-13).x
        )
    )
    assert (
        rel_err(flat(run(PROB.params, v)), np.linalg.solve(dense.G + 0.1 * np.eye(P), dense.gbar))
        < 1e-8
    )
    before = inverse._solve.jitted._cache_size()
    other = jax.tree_util.tree_map(lambda a: 1.1 * a, PROB.params)
    for params in (PROB.params, other):
        inverse.solve(sj.ggn(PROB.objective, params, PROB.batch), v, damping=0.1)
    assert inverse._solve.jitted._cache_size() <= before + 1


def test_influence_matches_dense(dense):
    damping = 0.01  # H + λI indefinite: GMRES, the default
    reference = np.linalg.solve(dense.H + damping * np.eye(P), dense.g.T).T
    kwargs = dict(damping=damping, tol=1e-13, restart=P)
    one = inverse.influence(*_args(), 2, **kwargs)
    assert bool(one.converged) and one.converged.shape == ()
    assert rel_err(flat(one.x), reference[2]) < 1e-8
    # Given gradients (stacked, here of one example) take the same compiled solve.
    grads = jax.tree_util.tree_map(lambda a: a[None], dense.unravel(jnp.asarray(dense.g[5])))
    given = inverse.influence(*_args(), grads, **kwargs)
    assert given.converged.shape == (1,)
    x = flat(jax.tree_util.tree_map(lambda a: a[0], given.x))
    assert rel_err(x, reference[5]) < 1e-8


def _dense_operator(matrix, unravel):
    return linear_operator.operator(_flat_product, jnp.asarray(matrix), unravel=unravel)


def _flat_product(matrix, v, *, unravel):
    return unravel(matrix @ ravel_pytree(v)[0])


@pytest.mark.parametrize("method", ["cg", "gmres"])
def test_tic_matches_dense(dense, method):
    damping = 0.5
    h_inv = np.linalg.inv(dense.H + damping * np.eye(P))
    exact = float(np.trace(h_inv @ dense.C))
    key = jax.random.PRNGKey(7)
    num_probes = 24 if method == "cg" else 4
    kwargs = dict(damping=damping, key=key, num_probes=num_probes, method=method, tol=1e-12)
    est = inverse.takeuchi_information_criterion(*_args(), restart=P, **kwargs)
    assert float(est.stderr) > 0
    assert est.num_probes == num_probes
    assert abs(float(est.value) - exact) < 5 * float(est.stderr)
    # The same probes through dense matrices: the estimator is exact given its probes.
    same = inverse.trace_of_inverse_product(
        _dense_operator(dense.H, dense.unravel),
        _dense_operator(dense.C, dense.unravel),
        PROB.params,
        restart=P,
        **kwargs,
    )
    np.testing.assert_allclose(float(est.value), float(same.value), rtol=1e-8)


def test_trace_of_inverse_product_reports_failed_solves_as_nan(dense):
    est = inverse.trace_of_inverse_product(
        _dense_operator(dense.H, dense.unravel),
        _dense_operator(dense.C, dense.unravel),
        PROB.params,
        damping=0.5,
        key=jax.random.PRNGKey(0),
        num_probes=2,
        max_iters=1,
    )
    assert np.isnan(float(est.value)) and np.isnan(float(est.stderr))


def test_riemannian_trace_full_matches_dense(dense):
    damping = 0.1
    exact = float(np.trace(np.linalg.solve(dense.G + damping * np.eye(P), dense.H)))
    est = inverse.riemannian_trace_full(
        *_args(), damping=damping, key=jax.random.PRNGKey(1), num_probes=16
    )
    assert float(est.stderr) > 0
    assert abs(float(est.value) - exact) < 5 * float(est.stderr)
    dense_route = sj.riemannian.riemannian_sharpness_dense(*_args(), damping=damping)
    np.testing.assert_allclose(float(dense_route.trace), exact, rtol=1e-8)


def test_riemannian_lambda_max_matches_generalised_eigenproblem(dense):
    damping = 0.1
    metric = dense.G + damping * np.eye(P)
    values = scipy.linalg.eigh(dense.H, metric, eigvals_only=True)[::-1]
    key = jax.random.PRNGKey(3)
    top = inverse.riemannian_lambda_max(*_args(), damping=damping, key=key, k=3, num_iters=P)
    assert bool(top.converged)
    np.testing.assert_allclose(np.asarray(top.values), values[:3], rtol=1e-8)
    assert np.all(np.asarray(top.residuals) < 1e-6 * values[0])
    u = flat(jax.tree_util.tree_map(lambda a: a[0], top.vectors))
    np.testing.assert_allclose(u @ metric @ u, 1.0, rtol=1e-8)
    np.testing.assert_allclose(u @ dense.H @ u, values[0], rtol=1e-8)
    lam = inverse.riemannian_lambda_max(*_args(), damping=damping, key=key, num_iters=12)
    assert lam.values.shape == (1,)
    assert float(lam.values[0]) <= values[0] * (1 + 1e-10)
    assert float(lam.values[0]) > 0.99 * values[0]
