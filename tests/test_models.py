"""Model zoo: shapes, parameter layouts, initialisations, closed forms, per-example checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sharpness_jax as sj
from sharpness_jax.models import MODELS, build_model, check_per_example

KEY = jax.random.PRNGKey(0)

# Tiny float64 instances of every model (name, input shape, options).
TINY = {
    "mlp": ((3, 2), {"widths": (5, 4), "activation": "tanh", "normalization": "layernorm"}),
    "cnn": ((4, 4, 2), {"channels": (3, 2), "pooling": "max"}),
    "resnet": ((4, 4, 1), {"widths": (2, 3)}),
    "shallow": ((4,), {"width": 3, "activation": "leaky_relu"}),
    "quadratic": ((2, 2), {"width": 3}),
}


def _tiny(name, **extra):
    shape, options = TINY[name]
    return build_model(
        name, input_shape=shape, num_outputs=3, param_dtype="float64", **{**options, **extra}
    )


@pytest.fixture(scope="module")
def tiny():
    """name -> (model, float64 params, a batch of 3 inputs), initialised once."""
    out = {}
    for i, name in enumerate(MODELS):
        model = _tiny(name)
        x = jax.random.normal(jax.random.PRNGKey(i + 1), (3, *model.input_shape), jnp.float64)
        out[name] = (model, jax.jit(model.init)(KEY), x)
    return out


def test_every_model_has_a_tiny_instance():
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_per_example_outputs_under_vmap_and_jit(tiny, name):
    model, params, x = tiny[name]
    assert model.name == name and model.num_outputs == 3
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
    batched = jax.jit(jax.vmap(model.predict, in_axes=(None, 0)))(params, x)
    assert batched.shape == (3, 3) and batched.dtype == jnp.float64
    assert np.all(np.isfinite(batched)) and np.ptp(np.asarray(batched), axis=0).max() > 0
    check_per_example(model.predict, params, x)  # vmap == one example at a time
    with pytest.raises(ValueError, match="ONE example"):
        model.predict(params, x)


def test_float32_parameters_compute_in_float32():
    model = build_model("mlp", input_shape=(2,), num_outputs=2, widths=(3,))
    params = model.init(KEY)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    out = model.predict(params, jnp.ones((2,), jnp.float64))  # input cast to the params' dtype
    assert out.dtype == jnp.float32


def test_mlp_layout_and_parameter_count():
    model = build_model("mlp", input_shape=(28, 28, 1), num_outputs=10, widths=(512, 512))
    shapes = jax.eval_shape(model.init, KEY)
    assert list(shapes) == ["params"]
    layers = shapes["params"]
    assert sorted(layers) == ["Dense_0", "Dense_1", "Dense_2"]
    assert layers["Dense_0"]["kernel"].shape == (784, 512)
    assert layers["Dense_1"]["kernel"].shape == (512, 512)
    assert layers["Dense_2"]["kernel"].shape == (512, 10)
    assert layers["Dense_2"]["bias"].shape == (10,)
    assert sj.num_params(shapes) == 669_706
    no_bias = build_model("mlp", input_shape=(784,), num_outputs=10, widths=(50, 50), bias=False)
    assert sj.num_params(jax.eval_shape(no_bias.init, KEY)) == 784 * 50 + 50 * 50 + 50 * 10


def test_cnn_parameter_count():
    model = build_model("cnn", input_shape=(32, 32, 3), num_outputs=10, channels=(32, 32))
    count = (3 * 3 * 3 * 32 + 32) + (3 * 3 * 32 * 32 + 32) + (8 * 8 * 32 * 10 + 10)
    assert sj.num_params(jax.eval_shape(model.init, KEY)) == count


def test_torch_init_is_uniform_with_fan_in_bounds():
    model = build_model("mlp", input_shape=(100,), num_outputs=4, widths=(400,), init="torch")
    layers = model.init(KEY)["params"]
    w, b = np.asarray(layers["Dense_0"]["kernel"]), np.asarray(layers["Dense_0"]["bias"])
    bound = 1 / math.sqrt(100)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.var() - bound**2 / 3) < 0.03 * bound**2 / 3
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.9 * bound
    w2, b2 = layers["Dense_1"]["kernel"], layers["Dense_1"]["bias"]
    assert np.abs(w2).max() <= 1 / math.sqrt(400) and np.abs(b2).max() <= 1 / math.sqrt(400)


def test_torch_init_of_convolutions_uses_kh_kw_cin_fan_in(tiny):
    _, params, _ = tiny["cnn"]  # torch init is the default
    for layer, fan_in in [("Conv_0", 3 * 3 * 2), ("Conv_1", 3 * 3 * 3), ("Dense_0", 2)]:
        for leaf in params["params"][layer].values():
            bound = 1 / math.sqrt(fan_in)
            assert np.abs(leaf).max() <= bound
    kernel = np.abs(params["params"]["Conv_0"]["kernel"])  # 54 draws of U(±1/√18)
    assert kernel.max() > 0.8 / math.sqrt(18)


@pytest.mark.parametrize("init, gain", [("lecun", 1.0), ("he", 2.0)])
def test_normal_inits_have_fan_in_variance_and_zero_bias(init, gain):
    model = build_model("mlp", input_shape=(100,), num_outputs=4, widths=(400,), init=init)
    layers = model.init(KEY)["params"]
    w = np.asarray(layers["Dense_0"]["kernel"])
    assert abs(w.var() / (gain / 100) - 1) < 0.03  # 40,000 draws: sd of the ratio ≈ 0.007
    assert np.abs(w).max() > 3.5 * math.sqrt(gain / 100)  # not truncated
    assert not np.any(layers["Dense_0"]["bias"])


@pytest.mark.parametrize("name", ["mlp", "shallow"])
def test_init_scale_multiplies_the_initial_parameters(tiny, name):
    _, base, _ = tiny[name]
    scaled = jax.jit(_tiny(name, init_scale=0.2).init)(KEY)
    flat_base = jax.tree_util.tree_flatten_with_path(base)[0]
    flat_scaled = jax.tree_util.tree_flatten_with_path(scaled)[0]
    for (path, a), (_, b) in zip(flat_base, flat_scaled, strict=True):
        # Kernels and biases are scaled; layer-norm gains and offsets keep 1 and 0.
        factor = 1.0 if "LayerNorm" in jax.tree_util.keystr(path) else 0.2
        np.testing.assert_allclose(b, factor * a, rtol=1e-15)
    assert sum(np.count_nonzero(leaf) for leaf in jax.tree.leaves(base)) > 20


def test_quadratic_model_is_the_quadratic_form(tiny):
    model, params, xs = tiny["quadratic"]
    x = xs[0]
    w, a, v = np.asarray(params["w"]), np.asarray(params["a"]), np.asarray(x).reshape(-1)
    assert set(params) == {"w", "a"}
    expected = [v @ sum(a[i, k] * np.outer(w[i], w[i]) for i in range(3)) @ v for k in range(3)]
    np.testing.assert_allclose(model.predict(params, x), expected, rtol=1e-12)


def test_shallow_model_is_the_two_layer_sum(tiny):
    model, params, xs = tiny["shallow"]
    assert not np.any(params["b"])  # the shallow init: LeCun normal, zero bias
    params = {**params, "b": jnp.array([0.3, -0.2, 0.1], jnp.float64)}
    x = xs[0]
    w, b, a = (np.asarray(params[k]) for k in ("w", "b", "a"))
    v = np.asarray(x)
    pre = w @ v + b
    expected = np.where(pre >= 0, pre, 0.1 * pre) @ a
    np.testing.assert_allclose(model.predict(params, x), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_hessian_products_through_every_layer_type(tiny, name):
    """fwd-over-rev Hessian products (the library's) equal rev-over-rev ones through layer
    norm, max pooling, and strided residual blocks with projections."""
    model, params, x = tiny[name]
    batch = sj.Batch(x, jnp.arange(3, dtype=jnp.int32))
    obj = sj.Objective(model.predict, sj.get_loss("cross_entropy"))
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape, jnp.float64)

    @jax.jit
    def both(flat, v):
        loss = lambda f: jnp.mean(obj.batch_losses(unravel(f), batch))
        reverse = jax.grad(lambda f: jnp.vdot(jax.grad(loss)(f), v))(flat)
        library, _ = ravel_pytree(sj.hessian(obj, unravel(flat), batch)(unravel(v)))
        return library, reverse

    library, reverse = both(flat, v)
    assert np.abs(reverse).max() > 1e-6
    np.testing.assert_allclose(library, reverse, rtol=1e-10, atol=1e-12 * np.abs(reverse).max())


def test_check_per_example_detects_batch_mixing():
    def batch_normalised(xs):  # sees the whole batch under vmap, like batch norm
        xs = np.asarray(xs)
        if xs.ndim == 1:
            return xs
        return (xs - xs.mean(0)) / (xs.std(0) + 1.0)

    def predict(params, x):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return params * jax.pure_callback(batch_normalised, shape, x, vmap_method="expand_dims")

    x = jax.random.normal(KEY, (4, 3), jnp.float64)
    with pytest.raises(ValueError, match="not per-example"):
        check_per_example(predict, jnp.float64(1.0), x)
    with pytest.raises(ValueError, match=r"vector \(K,\)"):
        check_per_example(lambda p, x: jnp.sum(p * x), jnp.float64(1.0), x)


@pytest.mark.parametrize("normalization", ["batchnorm", "BatchNorm"])
@pytest.mark.parametrize("name", MODELS)
def test_batch_norm_is_refused(name, normalization):
    with pytest.raises(ValueError, match="per-example"):
        build_model(name, input_shape=(8, 8, 1), num_outputs=2, normalization=normalization)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("vgg", {}, "choose one of"),
        ("mlp", {"depth": 3}, "its options"),
        ("mlp", {"activation": "sigmoid"}, "choose one of"),
        ("mlp", {"init": "xavier"}, "choose one of"),
        ("mlp", {"init_scale": 0.0}, "positive"),
        ("mlp", {"widths": (5, -1)}, "positive ints"),
        ("mlp", {"param_dtype": "int32"}, "choose one of"),
        ("mlp", {"normalization": "groupnorm"}, "choose one of"),
        ("cnn", {"pooling": "min"}, "choose one of"),
        ("cnn", {"channels": ()}, "positive ints"),
        ("resnet", {"residual_scale": -1.0}, "positive"),
        ("shallow", {"init": "torch"}, "choose one of"),
        ("shallow", {"activation": "gelu"}, "choose one of"),
        ("quadratic", {"activation": "relu"}, "its options"),
    ],
)
def test_invalid_models_and_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, input_shape=(8, 8, 1), num_outputs=2, **options)


def test_conv_models_need_images():
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        build_model("cnn", input_shape=(784,), num_outputs=10)
