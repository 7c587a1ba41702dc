"""K-FAC on the Dense interception against Kronecker products built by hand in float64."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fisher_problems import tanh_ce as _tanh_ce
from jax.flatten_util import ravel_pytree
from problems import cnn_problem, flat, rel_err

import sharpness_jax as sj
from sharpness_jax import kfac


@pytest.fixture(scope="module")
def tanh_ce():
    return _tanh_ce()


def _wbar_indices(params, name):
    """Flat (ravel_pytree) indices of layer ``name`` (a '/'-path) in the row-major
    [kernel; biasᵀ] order (no bias row when the layer has none)."""
    size = flat(params).size
    idx = sj.select(ravel_pytree(params)[1](jnp.arange(size, dtype=jnp.float64)), name)
    rows = [np.asarray(idx[f"{name}/kernel"])]
    if f"{name}/bias" in idx:
        rows.append(np.asarray(idx[f"{name}/bias"])[None, :])
    return np.concatenate(rows).astype(int).ravel()


def test_kfac_factors_match_explicit_kronecker_construction(tanh_ce):
    prob, ref = tanh_ce
    obj, params, batch = prob.objective, prob.params, prob.batch

    @jax.jit
    def run(p):
        factors = kfac.kfac_factors(obj, p, batch)
        chunked = kfac.kfac_factors(obj, p, batch, chunk_size=3)
        return factors, chunked, sj.dense(kfac.kfac_fisher(factors), p)

    factors, chunked, kfac_dense = run(params)
    assert sorted(factors) == ["params/Dense_0", "params/Dense_1"]
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
    layer_inputs = {"params/Dense_0": list(np.asarray(batch.inputs)), "params/Dense_1": hidden}
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
        factors = kfac.kfac_factors(obj, p, batch)
        return (
            sj.dense(kfac.kfac_fisher(factors), p),
            sj.dense(kfac.kfac_fisher_inverse(factors, damping=1e-3), p),
            sj.dense(kfac.kfac_fisher_inverse_sqrt(factors, damping=1e-3), p),
            sj.dense(kfac.kfac_fisher_inverse(factors, pinv=True), p),
            sj.dense(kfac.kfac_fisher_inverse_sqrt(factors, pinv=True), p),
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


# ------------------------------------------------------- any flax network of Dense layers


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4, name="inner")(x))
        return jax.nn.softplus(nn.Dense(3, use_bias=False, name="mix")(h))


class _Net(nn.Module):
    """A nested module, named layers, one layer without bias, two activations."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(_Block(name="encoder")(x.reshape(-1)))


def _by_hand(params, xs):
    """Per-example layer inputs ā_l and output Jacobians ∂f/∂z_l, by hand in NumPy."""
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    w0, b0 = p["encoder"]["inner"]["kernel"], p["encoder"]["inner"]["bias"]
    w1 = p["encoder"]["mix"]["kernel"]
    w2, b2 = p["head"]["kernel"], p["head"]["bias"]
    rows = []
    for x in np.asarray(xs):
        a0 = x.reshape(-1)
        z0 = a0 @ w0 + b0
        a1 = np.tanh(z0)
        z1 = a1 @ w1
        a2 = np.log1p(np.exp(z1))
        f = a2 @ w2 + b2
        j2 = np.eye(2)  # ∂f/∂z_head
        j1 = w2.T * (1 / (1 + np.exp(-z1)))[None, :]  # ∂f/∂z_mix
        j0 = (j1 @ w1.T) * (1 - a1**2)[None, :]  # ∂f/∂z_inner
        prob = np.exp(f - f.max()) / np.exp(f - f.max()).sum()
        f_out = np.diag(prob) - np.outer(prob, prob)  # softmax cross-entropy
        rows.append(
            {
                "params/encoder/inner": (np.append(a0, 1.0), j0, f_out),
                "params/encoder/mix": (a1, j1, f_out),
                "params/head": (np.append(a2, 1.0), j2, f_out),
            }
        )
    return rows


def test_kfac_on_a_nested_network_with_named_layers():
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(4), 3)
    xs = jax.random.normal(kx, (9, 2, 2), jnp.float64)
    ys = jax.random.randint(ky, (9,), 0, 2)
    module = _Net()
    params = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64), module.init(kp, xs[0].astype(jnp.float32))
    )
    obj = sj.Objective(module.apply, sj.get_loss("cross_entropy"))
    batch = sj.Batch(xs, ys)

    @jax.jit
    def run(p):
        factors = kfac.kfac_factors(obj, p, batch, chunk_size=4)
        return (
            factors,
            sj.dense(kfac.kfac_fisher(factors), p),
            sj.dense(kfac.kfac_fisher_inverse(factors, damping=1e-2), p),
            sj.dense(sj.fisher(obj, p, batch), p),
        )

    factors, kfac_dense, kfac_inv, fisher = (jax.device_get(a) for a in run(params))
    assert sorted(factors) == ["params/encoder/inner", "params/encoder/mix", "params/head"]
    rows = _by_hand(params, xs)
    size = flat(params).size
    ref = np.zeros((size, size))
    for name, fac in factors.items():
        a_bar = [r[name][0] for r in rows]
        g_p = [r[name][1].T @ r[name][2] @ r[name][1] for r in rows]
        a_ref, g_ref = np.mean([np.outer(a, a) for a in a_bar], 0), np.mean(g_p, 0)
        np.testing.assert_allclose(fac.A, a_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(fac.G, g_ref, rtol=1e-12, atol=1e-14)
        ids = _wbar_indices(params, name)
        # The hand-made per-example Kronecker products are the exact Fisher's diagonal block.
        exact_block = np.mean(
            [np.kron(np.outer(a, a), g) for a, g in zip(a_bar, g_p, strict=True)], 0
        )
        assert rel_err(fisher[np.ix_(ids, ids)], exact_block) < 1e-12
        ref[np.ix_(ids, ids)] = np.kron(a_ref, g_ref)
    assert rel_err(kfac_dense, ref) < 1e-12
    assert rel_err(kfac_inv, np.linalg.inv(ref + 1e-2 * np.eye(size))) < 1e-10


class _Tokens(nn.Module):
    @nn.compact
    def __call__(self, x):  # one example (T, d): a Dense call on T positions
        return nn.Dense(2)(x).reshape(-1)


class _Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.Dense(x.shape[-1])
        return layer(jnp.tanh(layer(x)))


def test_kfac_refuses_other_networks():
    cnn = cnn_problem()
    with pytest.raises(ValueError, match="K-FAC needs a network of flax Dense layers"):
        kfac.kfac_factors(cnn.objective, cnn.params, cnn.batch)
    xs = jnp.ones((3, 2, 4), jnp.float64)
    for module, x0, match in (
        (_Tokens(), xs[0], "one vector per example"),
        (_Shared(), xs[0, 0], "more than one Dense call"),
    ):
        params = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64),
            module.init(jax.random.PRNGKey(0), x0.astype(jnp.float32)),
        )
        obj = sj.Objective(module.apply, sj.get_loss("squared_error_half"))
        inputs = xs if x0.ndim == 2 else xs[:, 0]
        targets = jax.vmap(obj.predict, (None, 0))(params, inputs)
        with pytest.raises(ValueError, match=match):
            kfac.kfac_factors(obj, params, sj.Batch(inputs, targets))
    prob = _tanh_ce()[0]
    factors = kfac.kfac_factors(prob.objective, prob.params, prob.batch)
    with pytest.raises(ValueError, match="K-FAC factors are of layers"):
        kfac.kfac_fisher(factors)({"params": {"Dense_0": prob.params["params"]["Dense_0"]}})
