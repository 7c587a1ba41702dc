"""Every sharpness of one net at once (sharpness_jax.net_sharpness) against dense float64
references, its invariance under a rescaling, and its one path to the diagonal sharpness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import mlp_problem, rel_err

from sharpness_jax import net_sharpness, riemannian, symmetries


class _Reference:
    """Dense H, diagonal of F_emp, true Fisher F = GGN, computed the slow obvious way."""

    def __init__(self, prob):
        flat, unravel = ravel_pytree(prob.params)
        xs, ys = prob.batch

        def losses(f):
            return jax.vmap(prob.objective.example_loss, (None, 0, 0))(unravel(f), xs, ys)

        def outputs(f):
            return jax.vmap(prob.objective.predict, (None, 0))(unravel(f), xs)

        self.flat = np.asarray(flat)
        self.loss = float(jnp.mean(losses(flat)))
        self.H = np.asarray(jax.jit(jax.hessian(lambda f: jnp.mean(losses(f))))(flat))
        g = np.asarray(jax.jit(jax.jacrev(losses))(flat))  # (n, P) per-example gradients
        self.Femp = g.T @ g / g.shape[0]
        jac = np.asarray(jax.jit(jax.jacfwd(outputs))(flat))  # (n, K, P)
        p = np.asarray(jax.nn.softmax(outputs(flat)))
        lam = np.stack([np.diag(q) - np.outer(q, q) for q in p])
        self.G = np.einsum("nkp,nkl,nlq->pq", jac, lam, jac) / g.shape[0]


@pytest.fixture(scope="module")
def relu_problem():
    prob = mlp_problem("relu", "cross_entropy", n=7, d=4, widths=(5, 3))
    return prob, _Reference(prob)


@pytest.fixture(scope="module")
def measured(relu_problem):
    """measure_net (XTrace) of the problem's net and of a rescaled copy, with the same key."""
    prob, _ = relu_problem
    fn = jax.jit(
        lambda p, b, k: net_sharpness.measure_net(
            prob.objective,
            p,
            b,
            k,
            damping=1e-3,
            estimator="xtrace",
            num_probes=20,
            probe_chunk=None,
            lanczos_iters=43,
            lanczos_tol=None,
            full_fisher_subset="params/Dense_1",
        )
    )
    rescaled = symmetries.random_rescale(
        jax.random.PRNGKey(7), prob.params, layer_log_std=1.0, unit_log_std=1.0
    )
    key = jax.random.PRNGKey(0)
    out = [
        {k: np.asarray(v) for k, v in fn(p, prob.batch, key).items()}
        for p in (prob.params, rescaled)
    ]
    return rescaled, out[0], out[1]


def test_measure_net_matches_dense_references(relu_problem, measured):
    prob, ref = relu_problem
    _, out, _ = measured
    d = np.diag(ref.Femp)
    keep = d > 0
    h = np.diag(ref.H)
    exact = {
        "riemannian_sharpness": np.sum(h[keep] / d[keep]),
        "riemannian_sharpness_damped": np.sum(h / (d + 1e-3)),
        "trace_hessian": np.trace(ref.H),
    }
    for name, value in exact.items():  # XTrace: within 5 standard errors
        assert 0 <= out[f"{name}_stderr"] < 0.2 * abs(value), name
        assert abs(out[name] - value) <= 5 * out[f"{name}_stderr"] + 1e-10 * abs(value), name
    assert out["num_excluded"] == np.sum(~keep)
    np.testing.assert_allclose(out["fisher_diagonal"], d, rtol=1e-12, atol=1e-300)
    assert rel_err(out["lambda_max"], np.linalg.eigvalsh(ref.H)[-1]) < 1e-8
    s = np.where(keep, 1 / np.sqrt(np.where(keep, d, 1)), 0)
    whitened = s[:, None] * ref.H * s[None, :]
    assert rel_err(out["riemannian_lambda_max"], np.linalg.eigvalsh(whitened)[-1]) < 1e-8
    # tr(F⁺H) on the output layer's block, F the true Fisher (= GGN for cross-entropy).
    marks = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.full(a.shape, "Dense_1" in jax.tree_util.keystr(path), bool),
        prob.params,
    )
    block = np.asarray(ravel_pytree(marks)[0])
    hb, fb = ref.H[np.ix_(block, block)], ref.G[np.ix_(block, block)]
    mu, u = np.linalg.eigh(fb)
    kept = mu > block.sum() * np.finfo(float).eps * mu.max()
    w = u[:, kept] / np.sqrt(mu[kept])
    assert rel_err(out["full_fisher_sharpness"], np.trace(w.T @ hb @ w)) < 1e-8
    assert out["full_fisher_rank"] == kept.sum() < block.sum()  # singular: softmax shift
    assert rel_err(out["analysis_loss"], ref.loss) < 1e-12


def test_measure_net_is_invariant_under_rescaling(relu_problem, measured):
    """With the same key the Riemannian estimates of a rescaled net are the same numbers,
    while λ_max(H), tr(H) and the damped Ŝ_R,ε move."""
    prob, _ = relu_problem
    rescaled, out, after = measured
    xs = prob.batch.inputs
    f0 = jax.vmap(prob.objective.predict, (None, 0))(prob.params, xs)
    f1 = jax.vmap(prob.objective.predict, (None, 0))(rescaled, xs)
    np.testing.assert_allclose(f1, f0, rtol=1e-12, atol=1e-12)
    for name in ("riemannian_sharpness", "riemannian_lambda_max", "full_fisher_sharpness"):
        assert abs(after[name] - out[name]) / abs(out[name]) < 1e-9, name
    damped = "riemannian_sharpness_damped"
    assert abs(after[damped] - out[damped]) / abs(out[damped]) > 1e-6
    for name in ("lambda_max", "trace_hessian"):
        assert out[name] > 0 and after[name] > 0, name
        assert max(after[name] / out[name], out[name] / after[name]) > 1.05, name


def test_output_layer_is_the_last_dense_layer(relu_problem):
    prob, _ = relu_problem
    assert net_sharpness.output_layer(prob.params) == "params/Dense_1"
    params = {"params": {f"Dense_{i}": {"kernel": np.zeros((2, 2))} for i in range(12)}}
    assert net_sharpness.output_layer(params) == "params/Dense_11"


def test_measure_net_exact_traces_are_the_diagonal_sharpness(relu_problem):
    """measure_net's exact Ŝ_R and Ŝ_R,ε are diagonal_riemannian_sharpness's (one path)."""
    prob, ref = relu_problem
    out = net_sharpness.measure_net(
        prob.objective,
        prob.params,
        prob.batch,
        jax.random.PRNGKey(0),
        damping=1e-3,
        estimator="exact",
        lanczos_iters=20,
        full_fisher_subset="params/Dense_1",
    )
    for name, damping in (("riemannian_sharpness", 0.0), ("riemannian_sharpness_damped", 1e-3)):
        diagonal = riemannian.diagonal_riemannian_sharpness(
            prob.objective, prob.params, prob.batch, damping=damping
        )
        assert rel_err(out[name], diagonal.value) < 1e-12, name
        assert float(out[f"{name}_stderr"]) == 0, name
    assert rel_err(out["trace_hessian"], np.trace(ref.H)) < 1e-12
    assert int(out["num_excluded"]) == int(
        riemannian.diagonal_riemannian_sharpness(
            prob.objective, prob.params, prob.batch
        ).num_excluded
    )
