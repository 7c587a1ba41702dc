"""The factored E_p[h_p²] route (dense layers) against dense references and the generic route."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import Dense, cnn_problem, flat, mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import dense_factors, models


def _both(prob, v, **kw):
    o, p, b = prob.objective, prob.params, prob.batch
    return {
        m: flat(
            jax.jit(lambda p, v, m=m: sj.hessian_second_moment(o, p, b, method=m, **kw)(v))(p, v)
        )
        for m in ("factored", "per_example")
    }


@pytest.mark.parametrize(
    "activation,loss",
    [("tanh", "cross_entropy"), ("relu", "squared_error_half"), ("gelu", "softmax_squared_error")],
)
def test_factored_matches_dense_reference(activation, loss):
    prob = mlp_problem(activation, loss, widths=(5, 4, 3))
    if loss == "softmax_squared_error":
        prob.batch = sj.Batch(prob.batch.inputs, jax.nn.one_hot(prob.batch.targets, 3))
    ref = Dense(prob)
    v, v_flat = ref.random_vector(1)
    out = _both(prob, v, chunk_size=3)
    want = ref.H2 @ v_flat
    assert rel_err(out["factored"], want) < 1e-10
    assert rel_err(out["per_example"], want) < 1e-10


class _Tokens(nn.Module):
    """Dense layers on T positions per example (rank-2T factors), mean-pooled, then a head."""

    bias: bool

    @nn.compact
    def __call__(self, x):  # one example (T, d)
        h = jnp.tanh(nn.Dense(4, use_bias=self.bias)(x))
        h = jax.nn.gelu(nn.Dense(3, use_bias=self.bias)(h))
        return nn.Dense(2)(jnp.mean(h, axis=0))


@pytest.mark.parametrize("bias", [True, False])
def test_dense_layers_over_positions(bias):
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(kx, (6, 5, 3), jnp.float64)
    y = jax.random.randint(ky, (6,), 0, 2)
    module = _Tokens(bias)
    params = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64), module.init(kp, x[0].astype(jnp.float32))
    )
    o = sj.Objective(module.apply, sj.get_loss("cross_entropy"))
    layout = dense_factors.dense_layout(o, params, x[0])
    assert layout.applicable and [c.positions for c in layout.calls] == [5, 5, 1]
    prob = type(mlp_problem())("tokens", o, params, sj.Batch(x, y))
    ref = Dense(prob)
    v, v_flat = ref.random_vector(2)
    out = _both(prob, v, chunk_size=4)
    assert rel_err(out["factored"], ref.H2 @ v_flat) < 1e-10


def test_zoo_mlp_takes_the_factored_route_and_is_symmetric_psd():
    model = models.build_model(
        "mlp", input_shape=(2, 3), num_outputs=3, widths=(4,), param_dtype="float64"
    )
    params = model.init(jax.random.PRNGKey(0))
    o = sj.Objective(model.predict, sj.get_loss("cross_entropy"))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 3), jnp.float64)
    b = sj.Batch(x, jnp.arange(5) % 3)
    assert dense_factors.dense_layout(o, params, x[0]).applicable
    m = np.asarray(sj.dense(sj.hessian_second_moment(o, params, b, method="factored"), params))
    ref = np.asarray(sj.dense(sj.hessian_second_moment(o, params, b, method="per_example"), params))
    assert rel_err(m, ref) < 1e-10
    np.testing.assert_allclose(m, m.T, atol=1e-12 * np.abs(m).max())
    assert np.linalg.eigvalsh(m).min() > -1e-10 * np.abs(m).max()


def test_other_layers_fall_back_or_restrict_to_the_dense_ones():
    prob = cnn_problem()
    o, p, b = prob.objective, prob.params, prob.batch
    layout = dense_factors.dense_layout(o, p, b.inputs[0])
    assert not layout.applicable and "not the kernel or bias" in layout.reason
    with pytest.raises(ValueError, match="does not apply"):
        sj.hessian_second_moment(o, p, b, method="factored")
    v = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), p)
    auto = flat(sj.hessian_second_moment(o, p, b, chunk_size=2)(v))
    generic = flat(sj.hessian_second_moment(o, p, b, chunk_size=2, method="per_example")(v))
    np.testing.assert_array_equal(auto, generic)  # the same route (vs dense: test_operators)
    # The dense head alone (convolution frozen): the factored route applies to the subset.
    sv = sj.select(v, "params/Dense_0")
    res = {
        m: flat(sj.hessian_second_moment(o, p, b, subset="params/Dense_0", method=m)(sv))
        for m in ("factored", "per_example")
    }
    restricted = sj.subsets.restrict(o, p, "params/Dense_0")
    assert dense_factors.dense_layout(*restricted, b.inputs[0]).applicable
    assert rel_err(res["factored"], res["per_example"]) < 1e-10


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.Dense(x.shape[-1])
        return layer(jnp.tanh(layer(x)))


def test_shared_layers_and_non_flax_models_use_the_generic_route():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float64)
    b = sj.Batch(x, jnp.arange(4) % 3)
    module = _Tied()
    params = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64),
        module.init(jax.random.PRNGKey(1), x[0].astype(jnp.float32)),
    )
    o = sj.Objective(module.apply, sj.get_loss("cross_entropy"))
    layout = dense_factors.dense_layout(o, params, x[0])
    assert not layout.applicable and "more than one" in layout.reason
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    auto = flat(sj.hessian_second_moment(o, params, b)(v))
    generic = flat(sj.hessian_second_moment(o, params, b, method="per_example")(v))
    np.testing.assert_array_equal(auto, generic)

    shallow = models.build_model(
        "shallow", input_shape=(3,), num_outputs=3, width=4, param_dtype="float64"
    )
    sp = shallow.init(jax.random.PRNGKey(2))
    so = sj.Objective(shallow.predict, sj.get_loss("cross_entropy"))
    assert not dense_factors.dense_layout(so, sp, x[0]).applicable
    with pytest.raises(ValueError, match="unknown E_p"):
        sj.hessian_second_moment(so, sp, b, method="fast")


def test_dense_call_vjp_gives_layer_inputs_and_output_gradients():
    prob = mlp_problem("tanh", "cross_entropy", widths=(5, 4, 3))
    obj, params = prob.objective, prob.params
    x = prob.batch.inputs[0]
    layout = dense_factors.dense_layout(obj, params, x)
    f, inputs, vjp = dense_factors.dense_call_vjp(obj, params, x, layout)
    np.testing.assert_array_equal(f, obj.predict(params, x))
    assert len(inputs) == 3
    np.testing.assert_array_equal(inputs[0], x)
    u = jnp.array([0.3, -1.0, 2.0])
    deltas = vjp(u)
    # z = a W + b: the output-gradient of a layer is the gradient of uᵀf with respect to its bias.
    bias_grads = jax.grad(lambda p: u @ obj.predict(p, x))(params)["params"]
    for i, delta in enumerate(deltas):
        np.testing.assert_allclose(delta, bias_grads[f"Dense_{i}"]["bias"], rtol=1e-13)
    np.testing.assert_array_equal(deltas[-1], u)
