"""Tests of sharpness_jax.sharpness against dense references and brute-force enumeration.

Monte-Carlo quantities are checked within 5 standard errors of an enumeration of every batch
of a 5-example dataset (all n^b ordered tuples with replacement, all b-subsets without),
under both ways of drawing the batches (independent draws and partition groups).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from batch_problems import N, PerExample, enumerate_batches, mlp_with_reference
from jax.flatten_util import ravel_pytree
from problems import mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import batch_moments as B
from sharpness_jax import minibatch
from sharpness_jax import sharpness as S

# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def mlp():
    return mlp_with_reference()


@pytest.fixture(scope="module")
def aligned():
    """12 examples with a common input offset and one class: the per-example gradients are
    aligned, so the ratio of a batch is nearly a sum over its examples (the part that cancels
    within a partition group)."""
    prob = mlp_problem("tanh", "cross_entropy", n=12, d=3, widths=(4, 3))
    x, y = prob.batch
    prob = dataclasses.replace(prob, batch=sj.Batch(x + 2.0, jnp.zeros_like(y)))
    return prob, PerExample(prob)


# ------------------------------------------------------------- Monte-Carlo estimators


@pytest.mark.parametrize("sampling", ["partition", "independent"])
@pytest.mark.parametrize("replace", [True, False])
def test_batch_sharpness_matches_enumeration(mlp, replace, sampling):
    prob, D = mlp
    b = 2
    fn = jax.jit(
        lambda p, k: S.batch_sharpness(
            prob.objective,
            p,
            prob.batch,
            batch_size=b,
            key=k,
            replace=replace,
            sampling=sampling,
            rel_stderr=0.01,
        )
    )
    est = fn(prob.params, jax.random.PRNGKey(1))
    exact = enumerate_batches(D.g, D.h, b, replace)["ratio"]
    assert 20 <= int(est.num_draws) <= 1000
    assert float(est.stderr) > 0
    assert abs(float(est.value) - exact) < 5 * float(est.stderr)


def test_full_batch_without_replacement_is_exact(mlp):
    prob, D = mlp
    obj, batch = prob.objective, prob.batch

    @jax.jit
    def run(p):
        est = S.batch_sharpness(obj, p, batch, batch_size=N, key=jax.random.PRNGKey(0))
        return est, S.gradient_rayleigh_quotient(obj, p, batch, chunk_size=2)

    est, q = run(prob.params)
    rayleigh = D.gbar @ D.H @ D.gbar / (D.gbar @ D.gbar)
    assert rel_err(est.value, rayleigh) < 1e-10
    assert float(est.stderr) < 1e-12 * abs(rayleigh)
    assert int(est.num_draws) == 20  # the minimum: the only batch has no sampling noise
    assert float(est.value) <= np.linalg.eigvalsh(D.H)[-1] + 1e-12
    assert rel_err(q, rayleigh) < 1e-10


def test_zero_gradient_batches_contribute_zero():
    """Least squares where examples 0 and 1 are fit exactly: a batch of them has g_B = 0
    (ratio 0 by convention); example 2 alone has ratio ‖x_2‖²."""
    x = jnp.array([[1.0, 0.5], [-0.3, 2.0], [0.7, -1.2]])
    theta = jnp.array([0.4, -0.8])
    y = (x @ theta).at[2].add(1.0)[:, None]
    obj = sj.Objective(lambda p, xi: xi @ p["w"][:, None], sj.get_loss("squared_error_half"))
    params, batch = {"w": theta}, sj.Batch(x, y)

    @jax.jit
    def run(p):
        est = S.batch_sharpness(obj, p, batch, batch_size=1, key=jax.random.PRNGKey(2))
        return est, B.gradient_noise_interaction(obj, p, batch, batch_size=1)

    est, gni = run(params)
    exact = float(jnp.sum(x[2] ** 2)) / 3
    assert np.isfinite(float(est.value))
    assert abs(float(est.value) - exact) < 5 * float(est.stderr)
    assert np.isfinite(float(gni))
    at_minimum = {"w": jnp.linalg.lstsq(x, y[:, 0])[0]}
    fitted = sj.Batch(x, (x @ at_minimum["w"])[:, None])
    assert np.isnan(float(S.gradient_rayleigh_quotient(obj, at_minimum, fitted)))


@pytest.mark.parametrize("sampling", ["partition", "independent"])
@pytest.mark.parametrize("replace", [True, False])
def test_draws_depend_only_on_the_key(aligned, replace, sampling):
    """Same key, same batches: chunking and the number of draws per step change nothing.

    With 12 examples and b = 3 a partition group holds 4 batches: 20 draws per step evaluate
    five groups at once, 3 per step split each group into sub-steps of 3 and 1 batches."""
    prob, _ = aligned

    def run(chunk_size, draws_per_step):
        fn = jax.jit(
            lambda p: S.batch_sharpness(
                prob.objective,
                p,
                prob.batch,
                batch_size=3,
                key=jax.random.PRNGKey(7),
                replace=replace,
                sampling=sampling,
                min_draws=40,
                max_draws=40,
                draws_per_step=draws_per_step,
                chunk_size=chunk_size,
            )
        )
        return fn(prob.params)

    a, b = run(None, 20), run(2, 3)
    assert int(a.num_draws) == int(b.num_draws) == 40
    np.testing.assert_allclose(a.value, b.value, rtol=1e-12)
    np.testing.assert_allclose(a.stderr, b.stderr, rtol=1e-9)


@pytest.mark.parametrize("replace", [True, False])
def test_partition_stderr_is_honest(aligned, replace):
    """Over 300 keys at a fixed 20 groups the estimates are centred on the exact value and
    the mean squared stderr matches their variance. Without replacement the ratio is
    near-Gaussian and (estimate − exact) / stderr has standard deviation ≈ 1 (a t-distribution
    with 19 degrees of freedom: 1.06; 1.11 over 1000 keys). With replacement a batch may
    repeat one example three times and the ratio is skewed (skewness 3), so the z-scores have
    heavier tails and only the variance is checked."""
    prob, D = aligned
    b = 3
    exact = enumerate_batches(D.g, D.h, b, replace)["ratio"]

    @jax.jit
    def run(keys):
        return jax.vmap(
            lambda k: S.batch_sharpness(
                prob.objective,
                prob.params,
                prob.batch,
                batch_size=b,
                key=k,
                replace=replace,
                min_draws=80,
                max_draws=80,
            )
        )(keys)

    est = run(jax.random.split(jax.random.PRNGKey(11), 300))
    assert np.all(np.asarray(est.num_draws) == 80)
    value, stderr = np.asarray(est.value), np.asarray(est.stderr)
    spread = np.std(value)
    assert abs(np.mean(value) - exact) < 4 * spread / np.sqrt(len(value))
    assert 0.85 < np.sqrt(np.mean(stderr**2)) / spread < 1.15
    if not replace:
        z = (value - exact) / stderr
        assert 0.85 < np.std(z) < 1.3


def test_partition_needs_fewer_draws(aligned):
    """Where the ratio is nearly additive over examples, partition groups reach the target
    standard error with several times fewer batches than independent draws (here about ten
    times: one group covers all 12 examples)."""
    prob, _ = aligned

    def run(sampling):
        fn = jax.jit(
            jax.vmap(
                lambda k: S.batch_sharpness(
                    prob.objective,
                    prob.params,
                    prob.batch,
                    batch_size=3,
                    key=k,
                    sampling=sampling,
                    rel_stderr=0.015,
                )
            )
        )
        est = fn(jax.random.split(jax.random.PRNGKey(5), 4))
        assert np.all(np.asarray(est.stderr) <= 0.015 * np.abs(np.asarray(est.value)))
        return np.asarray(est.num_draws)

    partition, independent = run("partition"), run("independent")
    assert np.all(partition % 4 == 0)  # whole groups of n // b = 4 batches
    assert np.all(partition >= 40)  # at least ten groups
    assert np.mean(partition) < 0.3 * np.mean(independent)


def test_auto_sampling_takes_whole_partitions_only_when_ten_fit(aligned):
    """12 examples, b = 3: groups of 4 batches; ten of them need max_draws ≥ 40."""
    prob, _ = aligned
    assert minibatch.resolve_sampling(12, 3, "auto", 40) == "partition"
    assert minibatch.resolve_sampling(12, 3, "auto", 39) == "independent"
    assert (
        minibatch.resolve_sampling(12, 7, "auto", 1000) == "independent"
    )  # one batch per partition
    assert minibatch.resolve_sampling(12, 3, "partition", 10) == "partition"

    def run(sampling, max_draws):
        return S.batch_sharpness(
            prob.objective,
            prob.params,
            prob.batch,
            batch_size=3,
            key=jax.random.PRNGKey(3),
            sampling=sampling,
            min_draws=max_draws,
            max_draws=max_draws,
        )

    for max_draws, same_as in ((40, "partition"), (36, "independent")):
        auto, other = run("auto", max_draws), run(same_as, max_draws)
        assert float(auto.value) == float(other.value)
        assert int(auto.num_draws) == int(other.num_draws) == max_draws


@pytest.mark.parametrize("sampling", ["independent", "partition"])
def test_expected_batch_lambda_max_matches_enumeration(mlp, sampling):
    prob, D = mlp
    b = 2
    est = jax.jit(
        lambda p, k: S.expected_batch_lambda_max(
            prob.objective,
            p,
            prob.batch,
            batch_size=b,
            key=k,
            sampling=sampling,
            rel_stderr=0.02,
            tol=None,
        )
    )(prob.params, jax.random.PRNGKey(3))
    exact = enumerate_batches(D.g, D.h, b, False)["lam"]
    assert abs(float(est.value) - exact) < 5 * float(est.stderr)
    assert int(est.num_draws) >= 20


# ---------------------------------------------------------------- λ_max and the trace


def test_hessian_top_k_matches_eigh(mlp):
    prob, D = mlp
    evals, evecs = np.linalg.eigh(D.H)
    eig = jax.jit(lambda p: S.hessian_top_k(prob.objective, p, prob.batch, k=3, tol=None))(
        prob.params
    )
    np.testing.assert_allclose(eig.values, evals[::-1][:3], rtol=1e-9)
    vectors = jax.vmap(lambda t: ravel_pytree(t)[0])(eig.vectors)
    np.testing.assert_allclose(np.abs(np.sum(vectors * evecs[:, ::-1][:, :3].T, 1)), 1, rtol=1e-8)


def _dense_hessians(objective, batch, *params):
    """Dense Hessians of the mean loss at each of ``params`` (one compilation)."""
    _, unravel = ravel_pytree(params[0])
    hess = jax.jit(jax.hessian(lambda t: sj.loss_value(objective, unravel(t), batch)))
    return [np.asarray(hess(ravel_pytree(p)[0])) for p in params]


def test_warm_start_uses_fewer_matvecs(mlp):
    """Defaults reach 1e-3 relative accuracy; a warm start from the previous step's
    eigenvector needs fewer Hessian-vector products than a cold start."""
    prob, D = mlp
    obj, batch = prob.objective, prob.batch
    theta, unravel = ravel_pytree(prob.params)
    moved = unravel(theta - 0.05 * D.gbar)  # one gradient-descent step
    exact_before, exact = (
        np.linalg.eigvalsh(h)[-1] for h in _dense_hessians(obj, batch, prob.params, moved)
    )
    top = jax.jit(lambda p, init: S.hessian_top_k(obj, p, batch, init=init, chunk_size=2))
    before = top(prob.params, None)
    assert rel_err(before.values[0], exact_before) < 1e-3
    assert float(before.residuals[0]) <= S.DEFAULT_LANCZOS_TOL * float(before.values[0])
    cold = top(moved, None)
    warm = top(moved, before.vectors)
    assert int(warm.num_matvecs) < int(cold.num_matvecs)
    assert int(cold.num_matvecs) <= 40 and int(warm.num_matvecs) <= 10
    assert rel_err(warm.values[0], exact) < 1e-3
    assert rel_err(cold.values[0], exact) < 1e-3


def test_subset_top_k_is_the_diagonal_block(mlp):
    prob, _ = mlp
    layer = "params/Dense_1"
    obj_s, params_s = sj.restrict(prob.objective, prob.params, layer)
    (block,) = _dense_hessians(obj_s, prob.batch, params_s)
    eig = jax.jit(lambda p: S.hessian_top_k(prob.objective, p, prob.batch, subset=layer, tol=None))(
        prob.params
    )
    np.testing.assert_allclose(eig.values[0], np.linalg.eigvalsh(block)[-1], rtol=1e-9)


# ------------------------------------------------------ a quadratic model in closed form


@pytest.fixture(scope="module")
def least_squares():
    """f(x) = xᵀθ, ℓ_p = ½(x_pᵀθ − y_p)²: g_p = x_p r_p, h_p = x_p x_pᵀ, H = XᵀX/n."""
    rng = np.random.default_rng(0)
    n, d = 6, 4
    x = rng.standard_normal((n, d)) * np.array([2.0, 1.0, 0.6, 0.3])
    y = rng.standard_normal((n, 1))
    theta = rng.standard_normal(d)
    obj = sj.Objective(lambda p, xi: xi @ p["w"][:, None], sj.get_loss("squared_error_half"))
    params = {"w": jnp.asarray(theta)}
    batch = sj.Batch(jnp.asarray(x), jnp.asarray(y))
    r = x @ theta - y[:, 0]
    g = x * r[:, None]
    h = np.einsum("pi,pj->pij", x, x)
    return obj, params, batch, g, h


def test_least_squares_closed_forms(least_squares):
    obj, params, batch, g, h = least_squares
    d = g.shape[1]
    H, gbar = h.mean(0), g.mean(0)
    evals, evecs = np.linalg.eigh(H)

    @jax.jit
    def measure(p):
        kw = {"batch_size": 2, "chunk_size": 4}
        return {
            "eig": S.hessian_top_k(obj, p, batch, k=2, tol=1e-10),
            "trace": S.hessian_trace_exact(obj, p, batch, basis_chunk=3),
            "hutchinson": S.hessian_trace_hutchinson(
                obj, p, batch, key=jax.random.PRNGKey(0), num_probes=64, chunk_size=4
            ),
            "xtrace": S.hessian_trace_xtrace(
                obj, p, batch, key=jax.random.PRNGKey(1), num_probes=d
            ),
            "rayleigh": S.gradient_rayleigh_quotient(obj, p, batch),
            **{
                f"gni_{r}": B.gradient_noise_interaction(obj, p, batch, replace=r, **kw)
                for r in (True, False)
            },
            **{
                f"roe_{r}": B.batch_sharpness_ratio_of_expectations(obj, p, batch, replace=r, **kw)
                for r in (True, False)
            },
        }

    out = measure(params)
    np.testing.assert_allclose(out["eig"].values, evals[::-1][:2], rtol=1e-10)
    assert abs(abs(np.asarray(out["eig"].vectors["w"][0]) @ evecs[:, -1]) - 1) < 1e-10
    np.testing.assert_allclose(out["trace"], np.trace(H), rtol=1e-12)
    for name in ("hutchinson", "xtrace"):
        est = out[name]
        assert abs(float(est.value) - np.trace(H)) < 5 * float(est.stderr) + 1e-8 * np.trace(H)
    np.testing.assert_allclose(out["rayleigh"], gbar @ H @ gbar / (gbar @ gbar), rtol=1e-12)
    for replace in (True, False):
        ref = enumerate_batches(g, h, 2, replace)
        assert rel_err(out[f"gni_{replace}"], ref["ghg"] / (gbar @ gbar)) < 1e-10
        assert rel_err(out[f"roe_{replace}"], ref["bhb"] / ref["gg"]) < 1e-10


def test_float32(least_squares):
    obj, params, batch, g, _ = least_squares
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    b32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), batch)

    @jax.jit
    def measure(p, b):
        est = S.batch_sharpness(obj, p, b, batch_size=3, key=jax.random.PRNGKey(0), chunk_size=2)
        return est, B.gradient_hessian_moments(obj, p, b, chunk_size=4)

    est, m = measure(p32, b32)
    assert est.value.dtype == m.trace_hc.dtype == jnp.float32
    est64, m64 = measure(params, batch)
    np.testing.assert_allclose(est.value, est64.value, rtol=1e-4)
    np.testing.assert_allclose(m.trace_hc, m64.trace_hc, rtol=1e-4)
    np.testing.assert_allclose(m64.trace_c, np.trace(np.cov(g.T, bias=True)), rtol=1e-12)


# -------------------------------------------------------------------- stability helpers


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_threshold_separates_convergence_from_divergence(momentum, nesterov):
    lr = 0.1
    t = S.stability_threshold(lr, momentum=momentum, nesterov=nesterov)
    curv = jnp.array([0.98 * t, 1.02 * t])  # ½ xᵀ diag(curv) x
    opt = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)

    def step(carry, _):
        x, state = carry
        updates, state = opt.update(curv * x, state)
        return (optax.apply_updates(x, updates), state), None

    x0 = jnp.ones(2)
    (x, _), _ = jax.lax.scan(step, (x0, opt.init(x0)), None, length=3000)
    assert abs(float(x[0])) < 1e-3  # below the threshold: converges
    assert abs(float(x[1])) > 1e3  # above: diverges
    if momentum == 0:
        assert t == pytest.approx(2 / lr)


def test_stability_ratios():
    eig = sj.Eigen(jnp.array([30.0, 10.0]), None, jnp.zeros(2), jnp.int32(3))
    bs = minibatch.BatchEstimate(jnp.array(20.0), jnp.array(0.1), jnp.int32(20))
    r = S.stability_ratios(
        {"lambda_max": eig, "batch_sharpness": bs, "gni": 5.0}, learning_rate=0.1
    )
    np.testing.assert_allclose(r["lambda_max"], 1.5)
    np.testing.assert_allclose(r["batch_sharpness"], 1.0)
    np.testing.assert_allclose(r["gni"], 0.25)


# -------------------------------------------------------------------------- bad input


def test_bad_input_raises(mlp):
    prob, _ = mlp
    obj, params, batch = prob.objective, prob.params, prob.batch
    key = jax.random.PRNGKey(0)
    for b in (0, -1, N + 1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            S.batch_sharpness(obj, params, batch, batch_size=b, key=key)
    with pytest.raises(ValueError, match="batch_size"):
        S.expected_batch_lambda_max(obj, params, batch, batch_size=N + 1, key=key)
    bad_sampling = [
        {"rel_stderr": 0.0},
        {"rel_stderr": 1.5},
        {"rel_stderr": -0.1},
        {"min_draws": 1},
        {"min_draws": 30, "max_draws": 20},
        {"draws_per_step": 0},
        {"replace": "yes"},
        {"sampling": "stratified"},
        {"sampling": None},
        {"sampling": True},
    ]
    for kw in bad_sampling:
        with pytest.raises(ValueError):
            S.batch_sharpness(obj, params, batch, batch_size=2, key=key, **kw)
    with pytest.raises(ValueError, match="sampling"):
        S.expected_batch_lambda_max(obj, params, batch, batch_size=2, key=key, sampling="epoch")
    for lr in (0.0, -0.1, float("inf")):
        with pytest.raises(ValueError, match="learning_rate"):
            S.stability_threshold(lr)
        with pytest.raises(ValueError, match="learning_rate"):
            S.stability_ratios({"x": 1.0}, learning_rate=lr)
    with pytest.raises(ValueError, match="momentum"):
        S.stability_threshold(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="tol"):
        S.hessian_top_k(obj, params, batch, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        S.expected_batch_lambda_max(obj, params, batch, batch_size=2, key=key, tol=2.0)
