"""Tests of sharpness_jax.batch_moments against dense references and brute-force enumeration.

Exact quantities (mini-batch expectations, GNI, ratio of expectations) are checked against an
enumeration of every batch of a 5-example dataset (all n^b ordered tuples with replacement,
all b-subsets without); Hutchinson's GNI within 5 standard errors, with the exact standard
error.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from batch_problems import BATCH_SIZES, N, enumerate_batches, mlp_with_reference
from problems import rel_err

from sharpness_jax import batch_moments as B
from sharpness_jax import minibatch

# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def mlp():
    return mlp_with_reference()


@pytest.fixture(scope="module")
def mlp_moments(mlp):
    prob, _ = mlp
    fn = jax.jit(lambda p: B.gradient_hessian_moments(prob.objective, p, prob.batch, chunk_size=2))
    return fn(prob.params)


# --------------------------------------------------------- exact mini-batch expectations


def test_moments_match_dense_and_do_not_depend_on_chunking(mlp, mlp_moments):
    prob, D = mlp
    m = mlp_moments
    d = D.g - D.gbar
    assert m.num_examples == N
    np.testing.assert_allclose(m.grad_norm_sq, D.gbar @ D.gbar, rtol=1e-12)
    np.testing.assert_allclose(m.grad_hessian_grad, D.gbar @ D.H @ D.gbar, rtol=1e-12)
    np.testing.assert_allclose(m.trace_c, np.trace(D.C), rtol=1e-12)
    np.testing.assert_allclose(m.trace_hc, np.trace(D.H @ D.C), rtol=1e-10)
    cross = np.mean([D.gbar @ D.h[p] @ d[p] for p in range(N)])
    self_term = np.mean([d[p] @ D.h[p] @ d[p] for p in range(N)])
    np.testing.assert_allclose(m.cross, cross, rtol=1e-10)
    np.testing.assert_allclose(m.self_term, self_term, rtol=1e-10)
    unchunked = jax.jit(lambda p: B.gradient_hessian_moments(prob.objective, p, prob.batch))
    for a, b in zip(unchunked(prob.params)[1:], m[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("replace", [True, False])
def test_batch_expectations_match_enumeration(mlp, mlp_moments, replace):
    _, D = mlp
    for b in BATCH_SIZES:
        ref = enumerate_batches(D.g, D.h, b, replace)
        e = B.batch_expectations(mlp_moments, batch_size=b, replace=replace)
        assert rel_err(e.grad_batch_hessian_grad, ref["bhb"]) < 1e-10, b
        assert rel_err(e.grad_norm_sq, ref["gg"]) < 1e-10, b
        # GNI numerator: E_B[g_Bᵀ H g_B] = ḡᵀHḡ + tr(H Cov(g_B)).
        assert rel_err(e.grad_hessian_grad, ref["ghg"]) < 1e-10, b
    # b = 1 is the same law under both schemes; b = n without replacement is the full batch.
    one = B.batch_expectations(mlp_moments, batch_size=1, replace=replace)
    np.testing.assert_allclose(
        one.grad_batch_hessian_grad,
        np.mean([g @ h @ g for g, h in zip(D.g, D.h, strict=True)]),
        rtol=1e-10,
    )
    if not replace:
        full = B.batch_expectations(mlp_moments, batch_size=N, replace=False)
        np.testing.assert_allclose(full.grad_batch_hessian_grad, D.gbar @ D.H @ D.gbar, rtol=1e-10)
        np.testing.assert_allclose(full.grad_norm_sq, D.gbar @ D.gbar, rtol=1e-10)


def _moments_from(g, h):
    """GradientHessianMoments from dense per-example g_p, h_p (numpy, the definitions)."""
    n = g.shape[0]
    H, gbar = h.mean(0), g.mean(0)
    d = g - gbar
    return B.GradientHessianMoments(
        num_examples=n,
        grad_norm_sq=gbar @ gbar,
        grad_hessian_grad=gbar @ H @ gbar,
        trace_c=np.mean(np.sum(d * d, 1)),
        trace_hc=np.mean(np.einsum("pi,ij,pj->p", d, H, d)),
        cross=np.mean(np.einsum("i,pij,pj->p", gbar, h, d)),
        self_term=np.mean(np.einsum("pi,pij,pj->p", d, h, d)),
    )


def test_expectation_formulas_for_every_small_n_and_b():
    """Model-free: arbitrary g_p and symmetric indefinite h_p, every 1 ≤ b ≤ n ≤ 4."""
    rng = np.random.default_rng(5)
    for n in range(1, 5):
        g = rng.standard_normal((n, 3))
        a = rng.standard_normal((n, 3, 3))
        h = a + np.swapaxes(a, 1, 2)
        m = _moments_from(g, h)
        for b in range(1, n + 1):
            for replace in (True, False):
                ref = enumerate_batches(g, h, b, replace)
                e = B.batch_expectations(m, batch_size=b, replace=replace)
                for got, want in zip(e, (ref["bhb"], ref["gg"], ref["ghg"]), strict=True):
                    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gni_on_mlp_matches_enumeration(mlp):
    prob, D = mlp
    b = 3
    gni = jax.jit(
        lambda p: B.gradient_noise_interaction(
            prob.objective, p, prob.batch, batch_size=b, replace=True, chunk_size=3
        )
    )(prob.params)
    ref = enumerate_batches(D.g, D.h, b, True)
    assert rel_err(gni, ref["ghg"] / (D.gbar @ D.gbar)) < 1e-10
    # The identity E_B[g_Bᵀ H g_B] = ḡᵀHḡ + tr(HC)/b (with replacement).
    identity = (D.gbar @ D.H @ D.gbar + np.trace(D.H @ D.C) / b) / (D.gbar @ D.gbar)
    assert rel_err(gni, identity) < 1e-10


def test_gni_hutchinson_matches_dense_reference(mlp):
    """Hutchinson's GNI lies within 5 standard errors of the exact value, and its standard
    error is the exact one: for Rademacher z, Var(zᵀMz) = ‖M‖_F² + tr(M²) − 2 Σ_i M_ii² with
    M = HC, scaled by κ₂ / ‖ḡ‖²."""
    prob, D = mlp
    b, m = 3, 400
    g_sq = D.gbar @ D.gbar
    mat = D.H @ D.C
    var = np.sum(mat**2) + np.trace(mat @ mat) - 2 * np.sum(np.diag(mat) ** 2)
    for replace in (True, False):

        @jax.jit
        def both(p, key, replace=replace):
            kw = dict(batch_size=b, replace=replace, chunk_size=2)
            exact = B.gradient_noise_interaction(prob.objective, p, prob.batch, **kw)
            est = B.gradient_noise_interaction(
                prob.objective, p, prob.batch, method="hutchinson", key=key, num_probes=m, **kw
            )
            return exact, est

        exact, est = both(prob.params, jax.random.PRNGKey(4))
        ref = enumerate_batches(D.g, D.h, b, replace)["ghg"] / g_sq
        assert rel_err(exact, ref) < 1e-10
        assert est.num_probes == m
        assert abs(float(est.value) - ref) < 5 * float(est.stderr)
        kappa = minibatch.minibatch_noise_scale(N, b, replacement=replace)
        se = kappa * np.sqrt(var / m) / g_sq
        assert 0.75 < float(est.stderr) / se < 1.25, replace
    with pytest.raises(ValueError, match="method"):
        B.gradient_noise_interaction(
            prob.objective, prob.params, prob.batch, batch_size=b, method="xtrace"
        )
    with pytest.raises(ValueError, match="key and num_probes"):
        B.gradient_noise_interaction(
            prob.objective, prob.params, prob.batch, batch_size=b, method="hutchinson"
        )


# -------------------------------------------------------------------------- bad input


def test_bad_input_raises(mlp, mlp_moments):
    prob, _ = mlp
    obj, params, batch = prob.objective, prob.params, prob.batch
    for b in (0, -1, N + 1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            B.batch_expectations(mlp_moments, batch_size=b)
    with pytest.raises(ValueError, match="batch_size"):
        B.gradient_noise_interaction(obj, params, batch, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        B.batch_sharpness_ratio_of_expectations(obj, params, batch, batch_size=N + 1)
