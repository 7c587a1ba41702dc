"""PAC-Bayes terms by hand and from a tiny model (sharpness_jax.pac_bayes)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fisher_problems import relu_se as _relu_se
from jax.flatten_util import ravel_pytree
from problems import flat, mlp_problem

import sharpness_jax as sj
from sharpness_jax import fisher_metrics, pac_bayes


@pytest.fixture(scope="module")
def relu_se():
    return _relu_se()


def test_pac_bayes_terms_by_hand():
    params = {"w": jnp.array([1.0, 2.0])}
    kl = pac_bayes.fisher_posterior_kl(params, jnp.array([1.0, 4.0]), rho=0.5, prior_variance=2.0)
    # ratios ρ/(σ²λ) = 0.25, 0.0625: ½[0.3125 − 2 − ln(0.25·0.0625) + 5/2]
    expected_kl = 0.5 * (0.3125 - 2 + math.log(64.0) + 2.5)
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-14)
    # Against the general Gaussian KL with a full (rotated) Fisher, damping and a prior mean.
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    lam = np.array([0.5, 2.0, 0.0])
    fisher = q @ np.diag(lam) @ q.T
    theta, mean = rng.standard_normal(3), rng.standard_normal(3)
    rho, var, eps = 0.3, 1.5, 0.2
    cov = rho * np.linalg.inv(fisher + eps * np.eye(3))
    ref = 0.5 * (
        np.trace(cov) / var
        + (theta - mean) @ (theta - mean) / var
        - 3
        + 3 * math.log(var)
        - np.linalg.slogdet(cov)[1]
    )
    got = pac_bayes.fisher_posterior_kl(
        {"t": jnp.asarray(theta)},
        jnp.linalg.eigvalsh(jnp.asarray(fisher)),
        rho=rho,
        prior_variance=var,
        damping=eps,
        prior_mean={"t": jnp.asarray(mean)},
    )
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    # A zero eigenvalue without damping: no posterior covariance, infinite KL.
    assert np.isinf(
        pac_bayes.fisher_posterior_kl(
            {"t": jnp.asarray(theta)}, jnp.asarray(lam), rho=rho, prior_variance=var
        )
    )

    bound = pac_bayes.pac_bayes_bound(0.1, 3.0, 5.0, rho=0.2, n=100, delta=0.05, damping=1e-3)
    log_term = math.log(2 * math.sqrt(100) / 0.05)
    complexity = math.sqrt((5.0 + log_term) / 200)
    np.testing.assert_allclose(bound.curvature_term, 0.3, rtol=1e-15)
    np.testing.assert_allclose(bound.log_term, log_term, rtol=1e-15)
    np.testing.assert_allclose(bound.complexity_term, complexity, rtol=1e-15)
    np.testing.assert_allclose(bound.bound, 0.1 + 0.3 + complexity, rtol=1e-15)
    assert float(bound.kl) == 5.0 and float(bound.damping) == 1e-3 and float(bound.sharpness) == 3.0


def test_fisher_pac_bayes_bound_from_model(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    kw = dict(rho=0.01, prior_variance=0.5, delta=0.1, damping=1e-2)

    @jax.jit
    def run(p):
        return (
            pac_bayes.fisher_pac_bayes_bound(obj, p, batch, metric="diagonal", n=1000, **kw),
            pac_bayes.fisher_pac_bayes_bound(obj, p, batch, metric="full", **kw),
            sj.dense(sj.hessian(obj, p, batch), p),
            sj.dense(sj.fisher(obj, p, batch), p),
            fisher_metrics.empirical_fisher_diagonal(obj, p, batch),
            sj.loss_value(obj, p, batch),
        )

    diag, full, h, f, f_diag, loss = run(params)
    h, f, f_diag, theta = np.asarray(h), np.asarray(f), flat(f_diag), flat(params)

    def kl(lam):
        ratio = 0.01 / (0.5 * (lam + 1e-2))
        return 0.5 * (ratio.sum() - theta.size - np.log(ratio).sum() + theta @ theta / 0.5)

    np.testing.assert_allclose(diag.sharpness, np.sum(np.diag(h) / (f_diag + 1e-2)), rtol=1e-12)
    np.testing.assert_allclose(diag.empirical_loss, loss, rtol=1e-14)
    np.testing.assert_allclose(diag.kl, kl(f_diag), rtol=1e-12)
    np.testing.assert_allclose(diag.log_term, math.log(2 * math.sqrt(1000) / 0.1), rtol=1e-14)
    np.testing.assert_allclose(diag.curvature_term, 0.005 * diag.sharpness, rtol=1e-14)
    total = diag.empirical_loss + diag.curvature_term + diag.complexity_term
    np.testing.assert_allclose(diag.bound, total, rtol=1e-14)
    assert float(diag.damping) == 1e-2 and float(full.damping) == 1e-2
    eye = np.eye(theta.size)
    np.testing.assert_allclose(
        full.sharpness, np.trace(np.linalg.solve(f + 1e-2 * eye, h)), rtol=1e-10
    )
    np.testing.assert_allclose(full.kl, kl(np.linalg.eigvalsh(f)), rtol=1e-10)
    np.testing.assert_allclose(full.log_term, math.log(2 * math.sqrt(batch.inputs.shape[0]) / 0.1))


def test_bad_inputs_raise(relu_se):
    params = relu_se.params
    with pytest.raises(ValueError, match="rho"):
        pac_bayes.pac_bayes_bound(0.1, 1.0, 1.0, rho=0.0, n=10, delta=0.1)
    with pytest.raises(ValueError, match="delta"):
        pac_bayes.pac_bayes_bound(0.1, 1.0, 1.0, rho=1.0, n=10, delta=1.0)
    with pytest.raises(ValueError, match="n must"):
        pac_bayes.pac_bayes_bound(0.1, 1.0, 1.0, rho=1.0, n=0, delta=0.1)
    with pytest.raises(ValueError, match="prior_variance"):
        pac_bayes.fisher_posterior_kl(params, jnp.ones(20), rho=1.0, prior_variance=-1.0)
    with pytest.raises(ValueError, match="eigenvalues"):
        pac_bayes.fisher_posterior_kl(params, jnp.ones(3), rho=1.0, prior_variance=1.0)


def test_pac_bayes_terms_take_the_best_grid_point():
    prob = mlp_problem("relu", "cross_entropy", n=7, d=4, widths=(5, 3))
    flat_params, unravel = ravel_pytree(prob.params)
    xs, ys = prob.batch
    g = np.asarray(  # (n, P) per-example gradients
        jax.jacrev(
            lambda f: jax.vmap(prob.objective.example_loss, (None, 0, 0))(unravel(f), xs, ys)
        )(flat_params)
    )
    d = jnp.asarray(np.diag(g.T @ g / g.shape[0]))
    rhos, variances = (1e-4, 1e-2), (0.1, 1.0)
    kwargs = dict(train_loss=0.7, sharpness=50.0, damping=1e-3, n=7, delta=0.1)
    terms = pac_bayes.pac_bayes_terms(
        prob.params, d, rhos=rhos, prior_variances=variances, **kwargs
    )
    bounds = []
    for rho in rhos:
        for var in variances:
            kl = pac_bayes.fisher_posterior_kl(
                prob.params, d, rho=rho, prior_variance=var, damping=1e-3
            )
            bound = pac_bayes.pac_bayes_bound(
                0.7, 50.0, kl, rho=rho, n=7, delta=0.1 / 4, damping=1e-3
            )
            bounds.append((float(bound.bound), rho, var, bound))
    best = min(bounds, key=lambda b: b[0])
    assert terms["bound"] == pytest.approx(best[0], rel=1e-12)
    assert (terms["rho"], terms["prior_variance"]) == (best[1], best[2])
    assert terms["kl"] == pytest.approx(float(best[3].kl), rel=1e-12)
    assert terms["delta_per_grid_point"] == pytest.approx(0.1 / 4)
    assert terms["curvature_term"] == pytest.approx(best[1] / 2 * 50.0)
