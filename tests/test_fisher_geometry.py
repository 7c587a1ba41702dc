"""Tests of sharpness_jax.fisher_geometry against dense float64 references."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree
from problems import flat, mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import fisher_geometry as fg
from sharpness_jax import shallow

# ----------------------------------------------------------------------------- helpers


class _Reference:
    """Per-example g_p, J_p and output Hessians straight from jax.grad / jax.jacfwd /
    jax.hessian of flat per-example functions (no library reduction involved)."""

    def __init__(self, objective, params, batch):
        theta, unravel = ravel_pytree(params)
        self.theta, self.unravel = np.asarray(theta), unravel

        @jax.jit
        def per_example(x, y):
            g = jax.grad(lambda t: objective.example_loss(unravel(t), x, y))(theta)
            jac = jax.jacfwd(lambda t: objective.predict(unravel(t), x))(theta)
            lam = jax.hessian(lambda f: objective.loss(f, y))(objective.predict(params, x))
            return g, jac, lam

        g, jac, lam = jax.vmap(per_example)(*batch)
        self.g, self.J, self.lam = np.asarray(g), np.asarray(jac), np.asarray(lam)
        self.G = np.mean([jp.T @ lp @ jp for jp, lp in zip(self.J, self.lam, strict=True)], 0)
        self.Femp = np.mean([np.outer(gp, gp) for gp in self.g], 0)


def _critical_targets(objective, params, inputs, seed=0):
    """Real targets y_p = f_p − r_p with Σ_p J_pᵀ r_p = 0: θ is an exact critical point of
    the half squared error with a non-zero residual (so H ≠ G)."""
    theta, unravel = ravel_pytree(params)

    @jax.jit
    def outputs_and_jacobians(t):
        f = lambda t, x: objective.predict(unravel(t), x)
        return jax.vmap(f, (None, 0))(t, inputs), jax.vmap(jax.jacfwd(f), (None, 0))(t, inputs)

    outputs, js = (np.asarray(a) for a in outputs_and_jacobians(theta))
    js = js.reshape(-1, js.shape[-1])
    z = np.random.default_rng(seed).standard_normal(js.shape[0])
    r = z - js @ np.linalg.lstsq(js, z, rcond=None)[0]
    return jnp.asarray(outputs - r.reshape(outputs.shape))


_OUTPUTS = {}


def _outputs(objective, params, batch):
    """(n, K) outputs, one compiled function per objective."""
    if id(objective) not in _OUTPUTS:
        _OUTPUTS[id(objective)] = (objective, jax.jit(objective.batch_outputs))
    return np.asarray(_OUTPUTS[id(objective)][1](params, batch.inputs))


def _make_measure(objective, batch):
    """One jitted function: dense H, F, the pinv Riemannian spectrum, Ŝ_R (diagonal)."""

    @jax.jit
    def measure(params):
        h = sj.dense(sj.hessian(objective, params, batch), params)
        f = sj.dense(sj.fisher(objective, params, batch), params)
        full = fg.riemannian_sharpness_from_matrices(h, f, pinv=True)
        diag = fg.diagonal_riemannian_sharpness(objective, params, batch)
        return h, f, full, diag

    return measure


def _num_hidden(params):
    layers = params["params"]
    return sum(layers[f"Dense_{i}"]["kernel"].shape[1] for i in range(len(layers) - 1))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def relu_critical():
    """A tiny ReLU MLP (P = 20, 3 hidden units) at an exact critical point of ½‖f − y‖²."""
    prob = mlp_problem("relu", "squared_error_half", n=16, d=3, widths=(3, 2), seed=3)
    targets = _critical_targets(prob.objective, prob.params, prob.batch.inputs)
    batch = sj.Batch(prob.batch.inputs, targets)
    measure = _make_measure(prob.objective, batch)
    return prob.objective, prob.params, batch, measure, measure(prob.params)


@pytest.fixture(scope="module")
def tanh_ce():
    prob = mlp_problem("tanh", "cross_entropy", n=7, d=4, widths=(5, 3))
    return prob, _Reference(prob.objective, prob.params, prob.batch)


@pytest.fixture(scope="module")
def relu_se():
    """A tiny ReLU MLP with one-hot squared-error targets (not a critical point)."""
    return mlp_problem("relu", "squared_error_half", n=16, d=3, widths=(3, 2), seed=5)


def _linear_net(seed=0, n=10, d=3, h=2, k=3):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = {
        "params": {
            "Dense_0": {
                "bias": 0.3 * jax.random.normal(keys[0], (h,), jnp.float64),
                "kernel": jax.random.normal(keys[1], (d, h), jnp.float64),
            },
            "Dense_1": {
                "bias": 0.3 * jax.random.normal(keys[2], (k,), jnp.float64),
                "kernel": jax.random.normal(keys[3], (h, k), jnp.float64),
            },
        }
    }
    x = jax.random.normal(keys[4], (n, d), jnp.float64)
    objective = sj.Objective(
        lambda p, xi: fg.mlp_predict(p, xi, activation="linear"), sj.get_loss("squared_error_half")
    )
    return objective, params, x


# ------------------------------------------------------------------ diagonal Fishers


def test_diagonal_fishers_match_dense_references(tanh_ce):
    prob, ref = tanh_ce
    obj, batch = prob.objective, prob.batch
    # Squared error without the ½: F_out = 2I, so diag F = (2/n) Σ_p Σ_k (J_p)_ki².
    se_sum = sj.Objective(obj.predict, sj.get_loss("squared_error_sum"))

    @jax.jit
    def diagonals(p):
        return (
            fg.empirical_fisher_diagonal(obj, p, batch),
            fg.fisher_diagonal(obj, p, batch),
            # 7 examples in chunks of 3 (the last one padded).
            fg.empirical_fisher_diagonal(obj, p, batch, chunk_size=3),
            fg.fisher_diagonal(obj, p, batch, chunk_size=3),
            fg.fisher_diagonal(obj, p, batch, subset="params/Dense_1/kernel"),
            fg.fisher_diagonal(se_sum, p, batch, chunk_size=2),
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


# ------------------------------------------------------------ reparametrisations


def test_reparametrisations_preserve_predictions(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    before = _outputs(obj, params, batch)
    key = jax.random.PRNGKey(1)
    variants = [
        fg.rescale_layers(params, [0.1, 10.0], activation="relu"),
        fg.rescale_layers(params, [10.0, 0.1], activation="relu"),
        fg.random_rescale_layers(key, params, activation="relu", log_std=2.0),
        fg.rescale_units(params, {"Dense_0": jnp.array([0.1, 10.0, 3.0])}, activation="relu"),
        fg.random_rescale_units(key, params, activation="relu"),
        fg.permute_units(params, {"Dense_0": jnp.array([2, 0, 1])}),
        fg.random_permute_units(key, params),
    ]
    for new in variants:
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
        assert flat(new).dtype == np.float64
        np.testing.assert_allclose(_outputs(obj, new, batch), before, rtol=0, atol=1e-12)
        assert rel_err(flat(new), flat(params)) > 1e-3
    # Unwrapped layout (no "params" level) and a three-layer net with the product form.
    deep = mlp_problem("relu", "squared_error_half", n=4, d=3, widths=(4, 3, 2))
    alphas = [2.0, 0.25, 2.0]
    new = fg.rescale_layers(deep.params["params"], alphas, activation="relu")
    np.testing.assert_allclose(
        _outputs(deep.objective, {"params": new}, deep.batch),
        _outputs(deep.objective, deep.params, deep.batch),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        new["Dense_1"]["bias"], 0.5 * deep.params["params"]["Dense_1"]["bias"]
    )


def test_shallow_layout_reparametrisations():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (6, 3), jnp.float64)

    @functools.partial(jax.jit, static_argnames="activation")
    def predict(params, x, activation):
        return jax.vmap(lambda xi: shallow.shallow_predict(params, xi, activation=activation))(x)

    for activation, degree in (("relu", 1), ("quadratic", 2)):
        params = shallow.init_shallow(key, input_dim=3, width=4, num_outputs=2, dtype=jnp.float64)
        params["b"] = 0.1 * jnp.arange(4, dtype=jnp.float64)
        c = jnp.array([0.5, 2.0, 3.0, 0.1])
        new = fg.rescale_units(params, c, activation=activation)
        np.testing.assert_allclose(new["a"], params["a"] / c[:, None] ** degree)
        before = predict(params, x, activation=activation)
        for variant in (new, fg.random_permute_units(key, params)):
            assert rel_err(flat(variant), flat(params)) > 1e-3
            np.testing.assert_allclose(
                predict(variant, x, activation=activation), before, atol=1e-12
            )


def test_linear_gauge_preserves_predictions():
    obj, params, x = _linear_net()
    a = jnp.array([[2.0, 1.0], [-0.5, 0.3]])
    new = fg.linear_gauge(params, a)
    np.testing.assert_allclose(
        new["params"]["Dense_0"]["kernel"], params["params"]["Dense_0"]["kernel"] @ a
    )
    batch = sj.Batch(x, x)
    before = _outputs(obj, params, batch)
    np.testing.assert_allclose(_outputs(obj, new, batch), before, atol=1e-12)
    gauged = fg.random_linear_gauge(jax.random.PRNGKey(2), params)
    np.testing.assert_allclose(_outputs(obj, gauged, batch), before, atol=1e-12)


# ---------------------------------------------------------- Riemannian invariance


def test_layer_rescaling_invariance(relu_critical):
    obj, params, batch, measure, (h0, _, full0, diag0) = relu_critical
    num_p = flat(params).size
    assert np.linalg.norm(flat(sj.gradient(obj, params, batch))) < 1e-13
    # F is singular along the rescaling generator of each hidden unit, and nowhere else.
    assert int(full0.rank) == num_p - _num_hidden(params)
    assert np.all(np.isnan(np.asarray(full0.eigenvalues)[int(full0.rank) :]))
    assert int(diag0.num_excluded) == 0 and float(diag0.damping) == 0.0
    tr_h0, lmax_h0 = np.trace(h0), np.linalg.eigvalsh(h0)[-1]
    for alpha in (0.1, 10.0):
        new = fg.rescale_layers(params, [alpha, 1 / alpha], activation="relu")
        np.testing.assert_allclose(
            _outputs(obj, new, batch), _outputs(obj, params, batch), atol=1e-12
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
    rescaled = fg.random_rescale_units(key, params, activation="relu", log_std=1.5)
    h1, _, full1, diag1 = measure(rescaled)
    assert rel_err(np.trace(h1), np.trace(h0)) > 0.5
    assert rel_err(diag1.value, diag0.value) < 1e-8
    assert rel_err(full1.trace, full0.trace) < 1e-8
    permuted = fg.permute_units(params, {"Dense_0": jnp.array([1, 2, 0])})
    _, _, full2, diag2 = measure(permuted)
    assert rel_err(diag2.value, diag0.value) < 1e-12
    assert rel_err(full2.trace, full0.trace) < 1e-10


def test_linear_gauge_full_invariant_diagonal_not():
    obj, params, x = _linear_net()
    batch = sj.Batch(x, _critical_targets(obj, params, x, seed=1))
    measure = _make_measure(obj, batch)
    _, _, full0, diag0 = measure(params)
    # ker F: the h² = 4 dimensional gauge orbit and the h = 2 directions b1 → b1 + δ,
    # b2 → b2 − δ W2 (b1 W2 and b2 are redundant).
    assert int(full0.rank) == flat(params).size - 4 - 2
    new = fg.random_linear_gauge(jax.random.PRNGKey(3), params, log_std=1.0)
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
        return h, f, fg.riemannian_sharpness_dense(obj, p, batch, subset=subset, probe_chunk=5)

    h, f, res = block(params)
    size = h.shape[0]
    assert int(res.rank) == size and float(res.condition_number) < 1e8
    assert np.linalg.cond(np.asarray(f)) < 1e8
    ref = scipy.linalg.eigh(np.asarray(h), np.asarray(f), eigvals_only=True)[::-1]
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-9, atol=1e-9 * abs(ref[0]))
    assert rel_err(res.lambda_max, ref[0]) < 1e-10
    assert rel_err(res.trace, np.trace(np.linalg.solve(f, h))) < 1e-10
    # Damping: the pencil (H, F + εI).
    damped = fg.riemannian_sharpness_from_matrices(h, f, damping=1e-2)
    ref_d = scipy.linalg.eigh(np.asarray(h), np.asarray(f) + 1e-2 * np.eye(size), eigvals_only=True)
    assert rel_err(damped.eigenvalues, ref_d[::-1]) < 1e-10 and float(damped.damping) == 1e-2
    # Invariance of the undamped value under a per-unit rescaling of this layer.
    new = fg.rescale_units(params, {"Dense_0": jnp.array([0.2, 5.0, 2.0])}, activation="relu")
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
            fg.empirical_fisher_diagonal(obj, p, batch),
            fg.fisher_diagonal(obj, p, batch),
            fg.diagonal_riemannian_sharpness(obj, p, batch),
            fg.diagonal_riemannian_sharpness(obj, p, batch, damping=1e-3),
            fg.diagonal_riemannian_sharpness(obj, p, batch, key=key, num_probes=300),
            fg.diagonal_riemannian_sharpness(obj, p, batch, fisher="true", damping=1e-3),
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
        d = fg.empirical_fisher_diagonal(obj, p, batch)
        inv_sqrt = fg.diagonal_inverse_sqrt(d, damping=eps)
        eig = fg.riemannian_top_k(hvp, inv_sqrt, p, k=2, num_iters=20)
        return eig, fg.riemannian_trace(hvp, inv_sqrt, p), sj.dense(hvp, p), d

    eig, trace, h, d = run(params)
    h = np.asarray(h)
    dm = np.diag(flat(d) + eps)
    ref = scipy.linalg.eigh(h, dm, eigvals_only=True)[::-1]
    np.testing.assert_allclose(eig.values, ref[:2], rtol=1e-9)
    assert rel_err(trace.value, np.sum(ref)) < 1e-10 and trace.num_probes == 0
    v = flat(jax.tree_util.tree_map(lambda a: a[0], eig.vectors))
    assert rel_err(h @ v, ref[0] * dm @ v) < 1e-7
    np.testing.assert_allclose(v @ dm @ v, 1.0, rtol=1e-10)


# ---------------------------------------------------------------------------- K-FAC


def _wbar_indices(params, name):
    """Flat (ravel_pytree) indices of layer ``name`` in the row-major [kernel; biasᵀ] order."""
    size = flat(params).size
    idx = ravel_pytree(params)[1](jnp.arange(size, dtype=jnp.float64))["params"][name]
    stacked = np.concatenate([np.asarray(idx["kernel"]), np.asarray(idx["bias"])[None, :]])
    return stacked.astype(int).ravel()


def test_kfac_factors_match_explicit_kronecker_construction(tanh_ce):
    prob, ref = tanh_ce
    obj, params, batch = prob.objective, prob.params, prob.batch

    @jax.jit
    def run(p):
        factors = fg.kfac_factors(obj, p, batch, activation="tanh")
        chunked = fg.kfac_factors(obj, p, batch, activation="tanh", chunk_size=3)
        return factors, chunked, sj.dense(fg.kfac_fisher(factors), p)

    factors, chunked, kfac_dense = run(params)
    assert list(factors) == ["Dense_0", "Dense_1"]
    # Layer inputs from flax's own forward pass.
    hidden = [
        np.tanh(
            np.asarray(
                obj.predict(params, x, capture_intermediates=True)[1]["intermediates"]["Dense_0"][
                    "__call__"
                ][0]
            )
        )
        for x in batch.inputs
    ]
    layer_inputs = {"Dense_0": list(np.asarray(batch.inputs)), "Dense_1": hidden}
    size = flat(params).size
    kfac_ref = np.zeros((size, size))
    for name in factors:
        a_bar = [np.concatenate([h, [1.0]]) for h in layer_inputs[name]]
        # Pre-activation gradients through the bias Jacobian: G_p = J_bᵀ F_out J_b.
        ids = _wbar_indices(params, name)
        bias_ids = ids[-factors[name].G.shape[0] :]
        g_p = [
            jp[:, bias_ids].T @ lp @ jp[:, bias_ids] for jp, lp in zip(ref.J, ref.lam, strict=True)
        ]
        a_ref = np.mean([np.outer(a, a) for a in a_bar], 0)
        g_ref = np.mean(g_p, 0)
        for fac in (factors[name], chunked[name]):
            np.testing.assert_allclose(fac.A, a_ref, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(fac.G, g_ref, rtol=1e-12, atol=1e-14)
        # The exact Fisher block is the mean of per-example Kronecker products in this layout.
        exact_block = np.mean(
            [np.kron(np.outer(a, a), gp) for a, gp in zip(a_bar, g_p, strict=True)], 0
        )
        assert rel_err(ref.G[np.ix_(ids, ids)], exact_block) < 1e-12
        kfac_ref[np.ix_(ids, ids)] = np.kron(a_ref, g_ref)
    assert rel_err(kfac_dense, kfac_ref) < 1e-12


def test_kfac_inverse_and_inverse_sqrt(tanh_ce):
    prob, _ = tanh_ce
    obj, params, batch = prob.objective, prob.params, prob.batch

    @jax.jit
    def dense_all(p):
        factors = fg.kfac_factors(obj, p, batch, activation="tanh")
        return (
            sj.dense(fg.kfac_fisher(factors), p),
            sj.dense(fg.kfac_fisher_inverse(factors, damping=1e-3), p),
            sj.dense(fg.kfac_fisher_inverse_sqrt(factors, damping=1e-3), p),
            sj.dense(fg.kfac_fisher_inverse(factors, pinv=True), p),
            sj.dense(fg.kfac_fisher_inverse_sqrt(factors, pinv=True), p),
        )

    k, inv, inv_sqrt, pinv, pinv_sqrt = (np.asarray(m) for m in dense_all(params))
    eye = np.eye(k.shape[0])
    assert rel_err(inv, np.linalg.inv(k + 1e-3 * eye)) < 1e-10
    mu, u = np.linalg.eigh(k)
    ref_sqrt = (u / np.sqrt(np.maximum(mu, 0) + 1e-3)) @ u.T
    assert rel_err(inv_sqrt, ref_sqrt) < 1e-10
    # Cross-entropy: the last layer's G annihilates the all-ones vector, so K-FAC is singular.
    assert np.linalg.matrix_rank(k, tol=1e-10 * mu.max()) < k.shape[0]
    ref_pinv = np.linalg.pinv(k, rtol=1e-10, hermitian=True)
    assert rel_err(pinv, ref_pinv) < 1e-8
    assert rel_err(pinv_sqrt @ pinv_sqrt, ref_pinv) < 1e-8
    assert rel_err(pinv_sqrt @ k @ pinv_sqrt, pinv @ k) < 1e-8


def test_kfac_riemannian_sharpness_invariant_under_unit_rescaling(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch

    @jax.jit
    def run(p):
        factors = fg.kfac_factors(obj, p, batch, activation="relu")
        k = sj.dense(fg.kfac_fisher(factors), p)
        h = sj.dense(sj.hessian(obj, p, batch), p)
        sharp = fg.kfac_riemannian_sharpness(obj, p, batch, activation="relu", num_iters=20)
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
        (fg.random_rescale_units(key, params, activation="relu", log_std=1.5), True),
        (fg.rescale_layers(params, [10.0, 0.1], activation="relu"), True),
        (fg.random_permute_units(key, params), False),
    )
    for new, moves_h in variants:
        _, h1, res1 = run(new)
        if moves_h:
            assert rel_err(np.trace(h1), np.trace(h)) > 0.5
        assert rel_err(res1.trace, res.trace) < 1e-8
        assert rel_err(res1.lambda_max, res.lambda_max) < 1e-8
    # Damping breaks the invariance and is reported; Hutchinson trace with a standard error.
    damped = jax.jit(
        lambda p, key: fg.kfac_riemannian_sharpness(
            obj, p, batch, activation="relu", damping=0.1, num_iters=20, key=key, num_probes=64
        )
    )(params, key)
    assert float(damped.damping) == 0.1 and damped.num_probes == 64
    dm = k + 0.1 * np.eye(k.shape[0])
    exact_damped = np.trace(np.linalg.solve(dm, h))
    assert abs(float(damped.trace) - exact_damped) < 5 * float(damped.trace_stderr)
    assert rel_err(damped.lambda_max, scipy.linalg.eigh(h, dm, eigvals_only=True)[-1]) < 1e-9


def test_mlp_predict_matches_flax(relu_se, tanh_ce):
    for prob, act in ((relu_se, "relu"), (tanh_ce[0], "tanh")):
        ours = jax.vmap(lambda x, a=act, p=prob: fg.mlp_predict(p.params, x, activation=a))(
            prob.batch.inputs
        )
        np.testing.assert_allclose(
            ours, _outputs(prob.objective, prob.params, prob.batch), atol=1e-13
        )


# ------------------------------------------------------------------------- PAC-Bayes


def test_pac_bayes_terms_by_hand():
    params = {"w": jnp.array([1.0, 2.0])}
    kl = fg.fisher_posterior_kl(params, jnp.array([1.0, 4.0]), rho=0.5, prior_variance=2.0)
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
    got = fg.fisher_posterior_kl(
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
        fg.fisher_posterior_kl(
            {"t": jnp.asarray(theta)}, jnp.asarray(lam), rho=rho, prior_variance=var
        )
    )

    bound = fg.pac_bayes_bound(0.1, 3.0, 5.0, rho=0.2, n=100, delta=0.05, damping=1e-3)
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
            fg.fisher_pac_bayes_bound(obj, p, batch, metric="diagonal", n=1000, **kw),
            fg.fisher_pac_bayes_bound(obj, p, batch, metric="full", **kw),
            sj.dense(sj.hessian(obj, p, batch), p),
            sj.dense(sj.fisher(obj, p, batch), p),
            fg.empirical_fisher_diagonal(obj, p, batch),
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


# ----------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise(relu_se, tanh_ce):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    with pytest.raises(ValueError, match="> 0"):
        fg.rescale_layers(params, [-1.0, -1.0], activation="relu")
    with pytest.raises(ValueError, match="multiply to 1"):
        fg.rescale_layers(params, [2.0, 2.0], activation="relu")
    with pytest.raises(ValueError, match="one scale per layer"):
        fg.rescale_layers(params, [1.0], activation="relu")
    with pytest.raises(ValueError, match="homogeneous"):
        fg.rescale_layers(params, [2.0, 0.5], activation="tanh")
    with pytest.raises(ValueError, match="Dense_0"):
        fg.rescale_layers(
            {"params": {"Conv_0": params["params"]["Dense_0"]}}, [1.0], activation="relu"
        )
    with pytest.raises(ValueError, match="hidden layers"):
        fg.rescale_units(params, {"Dense_1": jnp.ones(2)}, activation="relu")
    with pytest.raises(ValueError, match="> 0"):
        fg.rescale_units(params, {"Dense_0": jnp.array([1.0, 0.0, 1.0])}, activation="relu")
    with pytest.raises(ValueError, match="shape"):
        fg.rescale_units(params, {"Dense_0": jnp.ones(2)}, activation="relu")
    with pytest.raises(ValueError, match="not a permutation"):
        fg.permute_units(params, {"Dense_0": jnp.array([0, 0, 1])})
    with pytest.raises(ValueError, match="homogeneous"):
        fg.rescale_units(
            {"w": jnp.ones((2, 3)), "a": jnp.ones((2, 1))}, jnp.ones(2), activation="tanh"
        )
    _, lin_params, _ = _linear_net()
    with pytest.raises(ValueError, match="invertible"):
        fg.linear_gauge(lin_params, jnp.array([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        fg.linear_gauge(lin_params, jnp.eye(3))
    deep = mlp_problem("relu", "squared_error_half", n=4, d=3, widths=(4, 3, 2))
    with pytest.raises(ValueError, match="two-layer"):
        fg.linear_gauge(deep.params, jnp.eye(4))
    with pytest.raises(ValueError, match="rho"):
        fg.pac_bayes_bound(0.1, 1.0, 1.0, rho=0.0, n=10, delta=0.1)
    with pytest.raises(ValueError, match="delta"):
        fg.pac_bayes_bound(0.1, 1.0, 1.0, rho=1.0, n=10, delta=1.0)
    with pytest.raises(ValueError, match="n must"):
        fg.pac_bayes_bound(0.1, 1.0, 1.0, rho=1.0, n=0, delta=0.1)
    with pytest.raises(ValueError, match="prior_variance"):
        fg.fisher_posterior_kl(params, jnp.ones(20), rho=1.0, prior_variance=-1.0)
    with pytest.raises(ValueError, match="eigenvalues"):
        fg.fisher_posterior_kl(params, jnp.ones(3), rho=1.0, prior_variance=1.0)
    with pytest.raises(ValueError, match="damping"):
        fg.diagonal_riemannian_sharpness(obj, params, batch, damping=-1.0)
    with pytest.raises(ValueError, match="both key and num_probes"):
        fg.diagonal_riemannian_sharpness(obj, params, batch, num_probes=4)
    with pytest.raises(ValueError, match="fisher must"):
        fg.diagonal_riemannian_sharpness(obj, params, batch, fisher="sampled")
    with pytest.raises(ValueError, match="same shape"):
        fg.riemannian_sharpness_from_matrices(jnp.eye(3), jnp.eye(2))
    # K-FAC with the wrong activation: the recomputed forward pass does not match the model.
    with pytest.raises(ValueError, match="does not match"):
        fg.kfac_factors(
            tanh_ce[0].objective, tanh_ce[0].params, tanh_ce[0].batch, activation="relu"
        )
    with pytest.raises(ValueError, match="unknown MLP activation"):
        fg.kfac_factors(obj, params, batch, activation="swishy")
