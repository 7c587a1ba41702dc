"""Per-token cross-entropy on a tiny causal LM with a padding mask: H, GGN, Fisher, the
Monte-Carlo Fisher, C and the empirical Fisher against dense float64 references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharpness_jax as sj

T, V, D = 5, 7, 4


class _TinyLM(nn.Module):
    """Embedding, a causal running mean over positions, a tanh layer, logits (T, V)."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(V, D)(tokens)
        causal = jnp.cumsum(h, axis=0) / jnp.arange(1, T + 1, dtype=h.dtype)[:, None]
        return nn.Dense(V)(jnp.tanh(nn.Dense(D)(causal) + h))


@pytest.fixture(scope="module")
def lm():
    model = _TinyLM()
    tokens = jax.random.randint(jax.random.PRNGKey(0), (6, T), 0, V)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones((6, T), bool).at[:, -1].set(False).at[0, 2:].set(False)
    params = model.init(jax.random.PRNGKey(1), tokens[0])
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)

    def predict(p, x):
        return model.apply(p, x)

    objective = sj.Objective(predict, sj.token_cross_entropy("mean"))
    return objective, params, sj.Batch(tokens, (targets, mask))


def _dense(op, params):
    return np.asarray(sj.linalg.dense(op, params))


def _references(objective, params, batch):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    n = batch.inputs.shape[0]
    ggn = np.zeros((flat.size, flat.size))
    for p in range(n):
        x = batch.inputs[p]
        y = jax.tree_util.tree_map(lambda a, p=p: a[p], batch.targets)
        jac = jax.jacfwd(lambda t: objective.predict(unravel(t), x).reshape(-1))(flat)
        f = objective.predict(params, x)
        lam = jax.hessian(lambda g: objective.loss(g.reshape(T, V), y))(f.reshape(-1))
        ggn += np.asarray(jac.T @ lam @ jac) / n

    def mean_loss(t):
        return jnp.mean(objective.batch_losses(unravel(t), batch))

    return np.asarray(jax.hessian(mean_loss)(flat)), ggn


def test_curvature_of_a_masked_token_loss_matches_dense_references(lm):
    objective, params, batch = lm
    hessian, ggn = _references(objective, params, batch)
    np.testing.assert_allclose(
        _dense(sj.hessian(objective, params, batch), params), hessian, atol=1e-12
    )
    np.testing.assert_allclose(
        _dense(sj.ggn(objective, params, batch, chunk_size=4), params), ggn, atol=1e-12
    )
    np.testing.assert_allclose(_dense(sj.fisher(objective, params, batch), params), ggn, atol=1e-12)
    mc = _dense(
        sj.fisher_monte_carlo(
            objective, params, batch, key=jax.random.PRNGKey(2), num_samples=3000
        ),
        params,
    )
    assert np.linalg.norm(mc - ggn) < 0.1 * np.linalg.norm(ggn)


def test_masked_positions_do_not_count(lm):
    objective, params, batch = lm
    tokens, mask = batch.targets
    changed = sj.Batch(batch.inputs, (jnp.where(mask, tokens, (tokens + 3) % V), mask))
    for ctor in (sj.hessian, sj.ggn, sj.gradient_covariance, sj.empirical_fisher):
        np.testing.assert_allclose(
            _dense(ctor(objective, params, changed), params),
            _dense(ctor(objective, params, batch), params),
            atol=1e-12,
        )


def test_the_empirical_fisher_and_c_use_per_example_gradients(lm):
    objective, params, batch = lm
    grads = np.stack(
        [
            jax.flatten_util.ravel_pytree(
                jax.grad(objective.example_loss)(
                    params,
                    batch.inputs[p],
                    jax.tree_util.tree_map(lambda a, p=p: a[p], batch.targets),
                )
            )[0]
            for p in range(batch.inputs.shape[0])
        ]
    )
    centred = grads - grads.mean(0)
    np.testing.assert_allclose(
        _dense(sj.empirical_fisher(objective, params, batch), params),
        grads.T @ grads / len(grads),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        _dense(sj.gradient_covariance(objective, params, batch), params),
        centred.T @ centred / len(grads),
        atol=1e-12,
    )


def test_sum_normalisation_and_bad_targets(lm):
    objective, params, batch = lm
    summed = sj.Objective(objective.predict, sj.token_cross_entropy("sum"))
    tokens, mask = batch.targets
    per_token = summed.batch_losses(params, batch) / jnp.sum(mask, axis=1).astype(jnp.float64)
    np.testing.assert_allclose(per_token, objective.batch_losses(params, batch), rtol=1e-12)
    with pytest.raises(ValueError, match="normalisation"):
        sj.token_cross_entropy("max")
    bad = sj.Batch(batch.inputs, (tokens.at[1, 1].set(V), mask))
    with pytest.raises(ValueError, match="outside"):
        sj.ggn(objective, params, bad)
