"""The GPT-style causal LM of the zoo: causality, H and GGN products with the per-token
cross-entropy and a padding mask against dense float64 references, no example mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sharpness_jax as sj
from sharpness_jax.adapters import check_no_example_mixing

T, V, D, N = 4, 7, 8, 3


def _build(**options):
    kw = {"num_layers": 1, "width": D, "num_heads": 2, "mlp_width": D, "param_dtype": "float64"}
    kw.update(options)
    return sj.models.build_model("gpt", input_shape=(T,), num_outputs=V, **kw)


@pytest.fixture(scope="module")
def lm():
    """One block, d = 8, two heads, MLP width 8 (568 parameters), float64; the parameters
    moved away from GPT-2's N(0, 0.02²) initialisation (where attention is nearly uniform) by
    N(0, 0.5²)."""
    model = _build()
    params = model.init(jax.random.PRNGKey(0))
    flat, unravel = ravel_pytree(params)
    params = unravel(flat + 0.5 * jax.random.normal(jax.random.PRNGKey(1), flat.shape))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (N, T + 1), 0, V)
    mask = jnp.ones((N, T), bool).at[1, 2:].set(False)  # sequence 1 padded after 2 tokens
    batch = sj.Batch(tokens[:, :-1], (tokens[:, 1:], mask))
    objective = sj.Objective(model.predict, sj.token_cross_entropy("mean"))
    return model, objective, params, batch


def test_layout_sizes_and_bad_options():
    model = sj.models.build_model("gpt", input_shape=(64,), num_outputs=256)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    # wte 256·128 + wpe 64·128 + 2 blocks (2·2·128 LN + 128·384+384 + 128·128+128
    # + 128·512+512 + 512·128+128) + 2·128 final LN; the head is tied.
    per_block = 4 * 128 + (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512) + 512 * 128
    assert sj.num_params(shapes) == 256 * 128 + 64 * 128 + 2 * (per_block + 128) + 256
    untied = _build(tied_head=False)
    assert untied.init(jax.random.PRNGKey(0))["params"]["head"]["kernel"].shape == (D, V)
    assert model.num_outputs == 256 and model.input_shape == (64,)
    with pytest.raises(ValueError, match="divisible"):
        _build(num_heads=3)
    with pytest.raises(ValueError, match="no option"):
        _build(dropout=0.1)
    with pytest.raises(ValueError, match="param_dtype"):
        _build(param_dtype="int32")
    with pytest.raises(ValueError, match="ONE sequence"):
        model.predict(shapes, jnp.zeros((2, 64), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        model.predict(shapes, jnp.zeros((64,), jnp.float32))


def test_output_at_t_depends_on_tokens_up_to_t_only(lm):
    model, _, params, batch = lm
    predict = jax.jit(model.predict)
    x = batch.inputs[0]
    base = np.asarray(predict(params, x))
    assert base.shape == (T, V) and base.dtype == np.float64
    for t in range(T):
        for s in range(T):
            changed = np.asarray(predict(params, x.at[s].set((x[s] + 1 + t) % V)))
            diff = np.abs(changed - base).max(axis=1)  # per output position
            if s > t:  # a later token leaves position t exactly unchanged
                assert diff[t] == 0.0, (t, s)
            else:  # an earlier (or the same) token moves it: attention is not trivial
                assert diff[t] > 1e-6, (t, s)


def _dense_references(objective, params, batch):
    flat, unravel = ravel_pytree(params)

    def mean_loss(theta):
        return jnp.mean(objective.batch_losses(unravel(theta), batch))

    def example_ggn(x, y):
        jac = jax.jacfwd(lambda theta: objective.predict(unravel(theta), x).reshape(-1))(flat)
        f = objective.predict(params, x).reshape(-1)
        out = jax.hessian(lambda g: objective.loss(g.reshape(T, V), y))(f)
        return jac.T @ out @ jac

    @jax.jit
    def both(theta, batch):
        ggn = jnp.mean(jax.vmap(example_ggn)(batch.inputs, batch.targets), axis=0)
        return jax.hessian(mean_loss)(theta), ggn

    return tuple(np.asarray(a) for a in both(flat, batch))


def test_hessian_and_ggn_products_match_dense_references(lm):
    _, objective, params, batch = lm
    hessian, ggn = _dense_references(objective, params, batch)
    flat, unravel = ravel_pytree(params)
    vs = jax.random.normal(jax.random.PRNGKey(3), (2, flat.size), jnp.float64)
    # H in one chunk, the GGN in two (the second padded).
    for name, ctor, dense, chunk in (("H", sj.hessian, hessian, None), ("GGN", sj.ggn, ggn, 2)):
        op = jax.jit(lambda p, b, v, ctor=ctor, c=chunk: ctor(objective, p, b, chunk_size=c)(v))
        for v in vs:
            got = ravel_pytree(op(params, batch, unravel(v)))[0]
            want = dense @ np.asarray(v)
            assert np.abs(want).max() > 1e-3, name
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * np.abs(dense).max())
    # The Hessian is not the GGN here (the network is not linear in its parameters).
    assert np.abs(hessian - ggn).max() > 1e-3 * np.abs(hessian).max()


def test_no_example_mixing(lm):
    model, objective, params, batch = lm
    batched = jax.jit(jax.vmap(model.predict, in_axes=(None, 0)))
    check_no_example_mixing(batched, params, batch.inputs)
    # Per-example gradients of sequence 0 ignore what the other sequences hold.
    others = (batch.inputs[1:] + 3) % V
    changed = sj.Batch(jnp.concatenate([batch.inputs[:1], others]), batch.targets)
    grads = jax.jit(lambda b: sj.per_example_grads(objective, params, b, chunk_size=2))
    first = jax.tree_util.tree_map(lambda a: a[0], grads(batch))
    again = jax.tree_util.tree_map(lambda a: a[0], grads(changed))
    np.testing.assert_allclose(ravel_pytree(again)[0], ravel_pytree(first)[0], rtol=1e-12)
    rest = ravel_pytree(jax.tree_util.tree_map(lambda a: a[1:], grads(changed)))[0]
    assert (
        np.abs(rest - ravel_pytree(jax.tree_util.tree_map(lambda a: a[1:], grads(batch)))[0]).max()
        > 1e-6
    )


def test_half_precision_forward():
    model = _build(param_dtype="bfloat16")
    params = model.init(jax.random.PRNGKey(0))
    logits = jax.jit(model.predict)(params, jnp.arange(T) % V)
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))
