"""The chunked reduction and per-example quantities against explicit loops."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import Dense, cnn_problem, flat, mlp_problem

import sharpness_jax as sj


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 7, 100])
def test_sum_over_chunks_visits_every_example_once(chunk_size):
    n = 7
    batch = {"a": jnp.arange(n, dtype=jnp.float64), "b": jnp.ones((n, 2), jnp.float64)}

    def chunk_fn(chunk, mask, index):
        w = jnp.where(mask, 1.0, 0.0)
        return {
            "sum": jnp.sum(w * chunk["a"]),
            "count": jnp.sum(w),
            "index_sum": jnp.sum(jnp.where(mask, index, 0)),
            "b": jnp.sum(w[:, None] * chunk["b"], axis=0),
        }

    out = sj.sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    assert float(out["sum"]) == 21.0
    assert float(out["count"]) == 7.0
    assert int(out["index_sum"]) == 21
    np.testing.assert_array_equal(out["b"], [7.0, 7.0])


def test_sum_examples_and_map_examples():
    x = jnp.linspace(0.0, 1.0, 10, dtype=jnp.float64)
    for cs in (None, 3):
        np.testing.assert_allclose(sj.sum_examples(jnp.square, x, chunk_size=cs), jnp.sum(x**2))
        np.testing.assert_allclose(sj.map_examples(jnp.square, x, chunk_size=cs), x**2)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def prob(request):
    return mlp_problem("gelu") if request.param == "mlp" else cnn_problem()


@pytest.fixture(scope="module")
def dense(prob):
    return Dense(prob)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_example_grads_losses_hvps_jacobians(prob, dense, chunk_size):
    o, p, b = prob.objective, prob.params, prob.batch
    grads = sj.per_example_grads(o, p, b, chunk_size=chunk_size)
    g = np.stack([flat(jax.tree_util.tree_map(lambda a, i=i: a[i], grads)) for i in range(prob.n)])
    np.testing.assert_allclose(g, dense.g, rtol=1e-10, atol=1e-13)

    losses = sj.per_example_losses(o, p, b, chunk_size=chunk_size)
    expected = [dense.losses[i](dense.flat) for i in range(prob.n)]
    np.testing.assert_allclose(losses, expected, rtol=1e-12)

    v, vf = dense.random_vector(1)
    hv = sj.per_example_hvps(o, p, b, v, chunk_size=chunk_size)
    hv = np.stack([flat(jax.tree_util.tree_map(lambda a, i=i: a[i], hv)) for i in range(prob.n)])
    np.testing.assert_allclose(hv, dense.h @ vf, rtol=1e-10, atol=1e-13)

    jac = sj.per_example_jacobians(o.predict, p, b.inputs, chunk_size=chunk_size)
    leaves = jax.tree_util.tree_leaves(jac)
    jf = np.concatenate([np.asarray(a).reshape(a.shape[0], a.shape[1], -1) for a in leaves], -1)
    np.testing.assert_allclose(jf, dense.J, rtol=1e-10, atol=1e-13)


def test_loss_and_gradient_chunked(prob, dense):
    o, p, b = prob.objective, prob.params, prob.batch
    for cs in (None, 2, 3):
        np.testing.assert_allclose(
            sj.loss_value(o, p, b, chunk_size=cs),
            np.mean([lp(dense.flat) for lp in dense.losses]),
            rtol=1e-12,
        )
        np.testing.assert_allclose(
            flat(sj.gradient(o, p, b, chunk_size=cs)), dense.gbar, rtol=1e-10, atol=1e-14
        )


def _odd_layout_conv_fn(w, chunk):
    """Σ over a chunk of a strided, dilated, grouped NCHW/OIHW convolution net's outputs."""

    @jax.jit
    def conv(w, x):
        return jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=(2, 1),
            padding="SAME",
            rhs_dilation=(1, 2),
            feature_group_count=2,
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )

    y = jax.nn.relu(conv(w, chunk["x"]))  # relu is a custom_jvp: kept as such
    return jnp.sum(jnp.sin(y) * chunk["m"][:, None, None, None])


def test_chunked_convolutions_equal_unchunked():
    kx, kw = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, (7, 4, 6, 5), jnp.float64)
    w = jax.random.normal(kw, (6, 2, 3, 2), jnp.float64)
    batch = {"x": x, "m": jnp.linspace(0.5, 1.5, 7)}

    def chunk_fn(w, chunk, mask):
        chunk = {"x": chunk["x"], "m": jnp.where(mask, chunk["m"], 0.0)}
        value, grad = jax.value_and_grad(_odd_layout_conv_fn)(w, chunk)
        # input gradient and a forward-over-reverse product: every transposed convolution
        hvp = jax.jvp(jax.grad(_odd_layout_conv_fn), (w, chunk), (w, chunk))[1]
        return value, grad, hvp

    def one(w, ex):
        return jax.grad(_odd_layout_conv_fn)(w, jax.tree_util.tree_map(lambda a: a[None], ex))

    @functools.partial(jax.jit, static_argnums=1)
    def everything(w, chunk_size):
        def total(w):
            fn = functools.partial(lambda w, c, m, i: chunk_fn(w, c, m), w)
            return sj.sum_over_chunks(fn, batch, chunk_size=chunk_size)

        # Differentiating through the reduction; per-example gradients (batched convolutions).
        per_example = sj.map_examples(functools.partial(one, w), batch, chunk_size=chunk_size)
        return total(w), jax.grad(lambda w: total(w)[0])(w), per_example

    expected = everything(w, None)  # per-example gradients: vmap(grad) itself
    leaves = zip(jax.tree.leaves(everything(w, 3)), jax.tree.leaves(expected), strict=True)
    for got, want in leaves:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's convolution library")
def test_chunked_cnn_gradient_compiles_to_library_convolutions():
    """Inside the chunk loop every convolution is in the (batch, spatial, feature) ×
    (spatial, in, out) order that XLA CPU runs as a library call, not as a naive loop nest."""
    prob = cnn_problem(n=6)
    o, p, b = prob.objective, prob.params, prob.batch
    for fn in (
        lambda p, b: sj.gradient(o, p, b, chunk_size=2),
        lambda p, b: sj.hessian(o, p, b, chunk_size=2)(p),
    ):
        text = jax.jit(fn).lower(p, b).compile().as_text()
        labels = set(re.findall(r"dim_labels=([^,\s]+)", text))
        assert labels == {"b01f_01io->b01f"}, labels
