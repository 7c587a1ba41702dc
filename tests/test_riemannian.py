"""Riemannian sharpness (dense, diagonal, K-FAC) against scipy's generalised eigh in float64,
and its invariance under the symmetries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from fisher_problems import critical_targets, linear_net, make_measure, num_hidden, outputs
from fisher_problems import relu_critical as _relu_critical
from fisher_problems import relu_se as _relu_se
from problems import flat, rel_err

import sharpness_jax as sj
from sharpness_jax import fisher_metrics, kfac, riemannian, symmetries


@pytest.fixture(scope="module")
def relu_critical():
    return _relu_critical()


@pytest.fixture(scope="module")
def relu_se():
    return _relu_se()


def test_layer_rescaling_invariance(relu_critical):
    obj, params, batch, measure, (h0, _, full0, diag0) = relu_critical
    num_p = flat(params).size
    assert np.linalg.norm(flat(sj.gradient(obj, params, batch))) < 1e-13
    # F is singular along the rescaling generator of each hidden unit, and nowhere else.
    assert int(full0.rank) == num_p - num_hidden(params)
    assert np.all(np.isnan(np.asarray(full0.eigenvalues)[int(full0.rank) :]))
    assert int(diag0.num_excluded) == 0 and float(diag0.damping) == 0.0
    tr_h0, lmax_h0 = np.trace(h0), np.linalg.eigvalsh(h0)[-1]
    for alpha in (0.1, 10.0):
        new = symmetries.rescale_layers(params, [alpha, 1 / alpha], activation="relu")
        np.testing.assert_allclose(
            outputs(obj, new, batch), outputs(obj, params, batch), atol=1e-12
        )
        h1, _, full1, diag1 = measure(new)
        ratio_tr = np.trace(h1) / tr_h0
        ratio_lmax = np.linalg.eigvalsh(h1)[-1] / lmax_h0
        assert max(ratio_tr, 1 / ratio_tr) > 10 and max(ratio_lmax, 1 / ratio_lmax) > 10
        assert int(full1.rank) == int(full0.rank)
        assert rel_err(full1.trace, full0.trace) < 1e-8
        assert rel_err(full1.lambda_max, full0.lambda_max) < 1e-8
        assert rel_err(diag1.value, diag0.value) < 1e-8


def test_unit_rescaling_and_permutation_invariance(relu_critical):
    _, params, _, measure, (h0, _, full0, diag0) = relu_critical
    key = jax.random.PRNGKey(7)
    rescaled = symmetries.random_rescale_units(key, params, activation="relu", log_std=1.5)
    h1, _, full1, diag1 = measure(rescaled)
    assert rel_err(np.trace(h1), np.trace(h0)) > 0.5
    assert rel_err(diag1.value, diag0.value) < 1e-8
    assert rel_err(full1.trace, full0.trace) < 1e-8
    permuted = symmetries.permute_units(params, {"Dense_0": jnp.array([1, 2, 0])})
    _, _, full2, diag2 = measure(permuted)
    assert rel_err(diag2.value, diag0.value) < 1e-12
    assert rel_err(full2.trace, full0.trace) < 1e-10


def test_linear_gauge_full_invariant_diagonal_not():
    obj, params, x = linear_net()
    batch = sj.Batch(x, critical_targets(obj, params, x, seed=1))
    measure = make_measure(obj, batch)
    _, _, full0, diag0 = measure(params)
    # ker F: the h² = 4 dimensional gauge orbit and the h = 2 directions b1 → b1 + δ,
    # b2 → b2 − δ W2 (b1 W2 and b2 are redundant).
    assert int(full0.rank) == flat(params).size - 4 - 2
    new = symmetries.random_linear_gauge(jax.random.PRNGKey(3), params, log_std=1.0)
    np.testing.assert_allclose(obj.batch_outputs(new, x), obj.batch_outputs(params, x), atol=1e-12)
    _, _, full1, diag1 = measure(new)
    assert rel_err(full1.trace, full0.trace) < 1e-8
    rank = int(full0.rank)
    assert rel_err(full1.eigenvalues[:rank], full0.eigenvalues[:rank]) < 1e-8
    assert float(full0.lambda_max) > 1.01  # H ≠ F: the residual term matters
    assert rel_err(diag1.value, diag0.value) > 1e-2


def test_invertible_block_and_generalised_eigenvalues(relu_se):
    """On one layer's block F is invertible (no symmetry acts inside a layer alone): the
    undamped tr(F⁻¹H) is invariant under unit rescaling and matches scipy's eigh(H, F)."""
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    subset = "params/Dense_0"

    @jax.jit
    def block(p):
        h = sj.dense(sj.hessian(obj, p, batch, subset=subset), sj.select(p, subset))
        f = sj.dense(sj.fisher(obj, p, batch, subset=subset), sj.select(p, subset))
        return (
            h,
            f,
            riemannian.riemannian_sharpness_dense(obj, p, batch, subset=subset, probe_chunk=5),
        )

    h, f, res = block(params)
    size = h.shape[0]
    assert int(res.rank) == size and float(res.condition_number) < 1e8
    assert np.linalg.cond(np.asarray(f)) < 1e8
    ref = scipy.linalg.eigh(np.asarray(h), np.asarray(f), eigvals_only=True)[::-1]
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-9, atol=1e-9 * abs(ref[0]))
    assert rel_err(res.lambda_max, ref[0]) < 1e-10
    assert rel_err(res.trace, np.trace(np.linalg.solve(f, h))) < 1e-10
    # Damping: the pencil (H, F + εI).
    damped = riemannian.riemannian_sharpness_from_matrices(h, f, damping=1e-2)
    ref_d = scipy.linalg.eigh(np.asarray(h), np.asarray(f) + 1e-2 * np.eye(size), eigvals_only=True)
    assert rel_err(damped.eigenvalues, ref_d[::-1]) < 1e-10 and float(damped.damping) == 1e-2
    # Invariance of the undamped value under a per-unit rescaling of this layer.
    new = symmetries.rescale_units(
        params, {"Dense_0": jnp.array([0.2, 5.0, 2.0])}, activation="relu"
    )
    h1, _, res1 = block(new)
    assert rel_err(np.trace(h1), np.trace(h)) > 1.0
    assert rel_err(res1.trace, res.trace) < 1e-8
    assert rel_err(res1.lambda_max, res.lambda_max) < 1e-8


def test_pinv_restricts_to_the_range_of_f(relu_critical):
    h, f, full, _ = relu_critical[-1]
    f = np.asarray(f)
    mu, u = np.linalg.eigh(f)
    r = u[:, mu > 1e-10 * mu.max()]
    ref = scipy.linalg.eigh(r.T @ np.asarray(h) @ r, r.T @ f @ r, eigvals_only=True)[::-1]
    rank = int(full.rank)
    assert rank == r.shape[1]
    assert rel_err(np.asarray(full.eigenvalues)[:rank], ref) < 1e-9
    assert rel_err(full.trace, np.sum(ref)) < 1e-9


def test_diagonal_estimator_damping_exclusion_and_hutchinson(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    # Kill hidden unit 1: its incoming and outgoing weights get F_ii = 0 (and H_ii = 0).
    layers = params["params"]
    dead = {
        "params": {
            **layers,
            "Dense_0": {**layers["Dense_0"], "bias": layers["Dense_0"]["bias"].at[1].set(-100.0)},
        }
    }

    @jax.jit
    def run(p, key):
        return (
            sj.diagonal_exact(sj.hessian(obj, p, batch), p),
            fisher_metrics.empirical_fisher_diagonal(obj, p, batch),
            fisher_metrics.fisher_diagonal(obj, p, batch),
            riemannian.diagonal_riemannian_sharpness(obj, p, batch),
            riemannian.diagonal_riemannian_sharpness(obj, p, batch, damping=1e-3),
            riemannian.diagonal_riemannian_sharpness(obj, p, batch, key=key, num_probes=300),
            riemannian.diagonal_riemannian_sharpness(obj, p, batch, fisher="true", damping=1e-3),
        )

    h_diag, f_diag, f_true, exact, damped, hutch, true = run(dead, jax.random.PRNGKey(0))
    h_diag, f_diag, f_true = flat(h_diag), flat(f_diag), flat(f_true)
    zero = f_diag == 0
    assert zero.sum() == 3 + 1 + 2 and np.all(h_diag[zero] == 0)
    assert int(exact.num_excluded) == 6 and exact.num_probes == 0
    np.testing.assert_allclose(exact.value, np.sum(h_diag[~zero] / f_diag[~zero]), rtol=1e-12)
    assert int(damped.num_excluded) == 0 and float(damped.damping) == 1e-3
    np.testing.assert_allclose(damped.value, np.sum(h_diag / (f_diag + 1e-3)), rtol=1e-12)
    assert hutch.num_probes == 300 and float(hutch.stderr) > 0
    assert abs(float(hutch.value) - float(exact.value)) < 5 * float(hutch.stderr)
    np.testing.assert_allclose(true.value, np.sum(h_diag / (f_true + 1e-3)), rtol=1e-12)


def test_diagonal_metric_generalised_eigenpairs(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    eps = 1e-2

    @jax.jit
    def run(p):
        hvp = sj.hessian(obj, p, batch)
        d = fisher_metrics.empirical_fisher_diagonal(obj, p, batch)
        inv_sqrt = fisher_metrics.diagonal_inverse_sqrt(d, damping=eps)
        eig = riemannian.riemannian_top_k(hvp, inv_sqrt, p, k=2, num_iters=20)
        return eig, riemannian.riemannian_trace(hvp, inv_sqrt, p), sj.dense(hvp, p), d

    eig, trace, h, d = run(params)
    h = np.asarray(h)
    dm = np.diag(flat(d) + eps)
    ref = scipy.linalg.eigh(h, dm, eigvals_only=True)[::-1]
    np.testing.assert_allclose(eig.values, ref[:2], rtol=1e-9)
    assert rel_err(trace.value, np.sum(ref)) < 1e-10 and trace.num_probes == 0
    v = flat(jax.tree_util.tree_map(lambda a: a[0], eig.vectors))
    assert rel_err(h @ v, ref[0] * dm @ v) < 1e-7
    np.testing.assert_allclose(v @ dm @ v, 1.0, rtol=1e-10)


def test_kfac_riemannian_sharpness_invariant_under_unit_rescaling(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch

    @jax.jit
    def run(p):
        factors = kfac.kfac_factors(obj, p, batch)
        k = sj.dense(kfac.kfac_fisher(factors), p)
        h = sj.dense(sj.hessian(obj, p, batch), p)
        sharp = riemannian.kfac_riemannian_sharpness(obj, p, batch, num_iters=20)
        return k, h, sharp

    k, h, res = run(params)
    assert res.num_probes == 0 and float(res.damping) == 0.0
    # Dense reference: the generalised eigenproblem H v = λ F_KFAC v (F_KFAC invertible even
    # though F is not: the rescaling symmetry couples layers, K-FAC drops those blocks).
    k, h = np.asarray(k), np.asarray(h)
    assert np.linalg.cond(k) < 1e10
    ref = scipy.linalg.eigh(h, k, eigvals_only=True)
    assert rel_err(res.trace, np.sum(ref)) < 1e-9
    assert rel_err(res.lambda_max, ref[-1]) < 1e-9
    key = jax.random.PRNGKey(4)
    variants = (
        (symmetries.random_rescale_units(key, params, activation="relu", log_std=1.5), True),
        (symmetries.rescale_layers(params, [10.0, 0.1], activation="relu"), True),
        (symmetries.random_permute_units(key, params), False),
    )
    for new, moves_h in variants:
        _, h1, res1 = run(new)
        if moves_h:
            assert rel_err(np.trace(h1), np.trace(h)) > 0.5
        assert rel_err(res1.trace, res.trace) < 1e-8
        assert rel_err(res1.lambda_max, res.lambda_max) < 1e-8
    # Damping breaks the invariance and is reported; Hutchinson trace with a standard error.
    damped = jax.jit(
        lambda p, key: riemannian.kfac_riemannian_sharpness(
            obj, p, batch, damping=0.1, num_iters=20, key=key, num_probes=64
        )
    )(params, key)
    assert float(damped.damping) == 0.1 and damped.num_probes == 64
    dm = k + 0.1 * np.eye(k.shape[0])
    exact_damped = np.trace(np.linalg.solve(dm, h))
    assert abs(float(damped.trace) - exact_damped) < 5 * float(damped.trace_stderr)
    assert rel_err(damped.lambda_max, scipy.linalg.eigh(h, dm, eigvals_only=True)[-1]) < 1e-9


def test_diagonal_sharpness_is_the_trace_in_the_diagonal_metric(relu_se):
    """One path: Ŝ_R is riemannian_trace with the diagonal metric's inverse square root, for
    the exact and the Hutchinson estimate (same probes; the Hutchinson one takes zᵀHz forward
    over forward instead of zᵀ(Hz), so the same numbers to rounding)."""
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch

    @jax.jit
    def run(p, key):
        hvp = sj.hessian(obj, p, batch)
        inv_sqrt = fisher_metrics.diagonal_inverse_sqrt(
            fisher_metrics.empirical_fisher_diagonal(obj, p, batch), damping=1e-3
        )
        return (
            riemannian.diagonal_riemannian_sharpness(obj, p, batch, damping=1e-3),
            riemannian.riemannian_trace(hvp, inv_sqrt, p),
            riemannian.diagonal_riemannian_sharpness(
                obj, p, batch, damping=1e-3, key=key, num_probes=16
            ),
            riemannian.riemannian_trace(hvp, inv_sqrt, p, key=key, num_probes=16),
            sj.dense(riemannian.whitened_hessian(hvp, inv_sqrt), p),
        )

    exact, trace, hutch, hutch_trace, whitened = run(params, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(exact.value, trace.value)
    np.testing.assert_allclose(hutch.value, hutch_trace.value, rtol=1e-12)
    np.testing.assert_allclose(hutch.stderr, hutch_trace.stderr, rtol=1e-10)
    assert hutch.num_probes == 16 and exact.num_probes == 0
    np.testing.assert_allclose(np.trace(whitened), exact.value, rtol=1e-12)


def test_bad_inputs_raise(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    with pytest.raises(ValueError, match="damping"):
        riemannian.diagonal_riemannian_sharpness(obj, params, batch, damping=-1.0)
    with pytest.raises(ValueError, match="both key and num_probes"):
        riemannian.diagonal_riemannian_sharpness(obj, params, batch, num_probes=4)
    with pytest.raises(ValueError, match="fisher must"):
        riemannian.diagonal_riemannian_sharpness(obj, params, batch, fisher="sampled")
    with pytest.raises(ValueError, match="same shape"):
        riemannian.riemannian_sharpness_from_matrices(jnp.eye(3), jnp.eye(2))


def test_trace_estimators():
    a = np.random.default_rng(0).standard_normal((6, 6))
    a = a @ a.T + np.diag(np.arange(1.0, 7.0) ** 2)
    template = {"x": jnp.zeros(6)}

    def matvec(v):
        return {"x": jnp.asarray(a) @ v["x"]}

    exact = riemannian.trace_estimate(
        matvec, template, estimator="exact", key=None, num_probes=None, probe_chunk=None
    )
    assert float(exact.value) == pytest.approx(np.trace(a), rel=1e-12)
    assert float(exact.stderr) == 0 and exact.num_probes == 0
    for estimator in ("xtrace", "hutchinson"):
        estimate = jax.jit(
            lambda k, e=estimator: riemannian.trace_estimate(
                matvec, template, estimator=e, key=k, num_probes=5, probe_chunk=None
            )
        )
        est = estimate(jax.random.PRNGKey(1))
        assert abs(float(est.value) - np.trace(a)) <= 5 * float(est.stderr) + 1e-9, estimator
    with pytest.raises(ValueError, match="estimator"):
        riemannian.trace_estimate(
            matvec, template, estimator="lanczos", key=None, num_probes=1, probe_chunk=None
        )
