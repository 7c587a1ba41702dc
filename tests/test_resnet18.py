"""The CIFAR-style ResNet-18 with batch norm: eval-mode curvature against dense float64
references, train-mode statistics against the batch-norm update written out, and the
example-mixing check in both modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sharpness_jax as sj
from sharpness_jax.adapters import check_no_example_mixing
from sharpness_jax.resnet18 import MOMENTUM, build_resnet18, with_state

KEY = jax.random.PRNGKey(0)
SHAPE = (4, 4, 3)
K = 3


@pytest.fixture(scope="module")
def tiny():
    """Widths (1, 1, 2, 4) (835 parameters), float64, running statistics moved away from
    (0, 1) by two train steps so that eval mode uses nontrivial frozen statistics."""
    model = build_resnet18(
        input_shape=SHAPE, num_outputs=K, width_multiplier=1 / 128, param_dtype="float64"
    )
    params, state = model.init(KEY)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, *SHAPE), jnp.float64) * 2.0 + 0.5
    train_apply = jax.jit(model.train_apply)
    for _ in range(2):
        _, state = train_apply(params, state, x)
    y = jnp.array([0, 1, 2], jnp.int32)
    return model, params, state, sj.Batch(x, y)


def test_layout_and_published_parameter_count():
    model = build_resnet18(input_shape=(32, 32, 3), num_outputs=10)
    shapes = jax.eval_shape(model.init, KEY)
    count = sum(a.size for a in jax.tree.leaves(shapes[0]))
    assert count == 11_173_962  # the CIFAR ResNet-18 (kuangliu/pytorch-cifar), without conv biases
    stats = jax.tree.leaves(shapes[1])
    assert len(stats) == 2 * 20  # 17 convs + 3 projections, a mean and a variance each


def test_eval_mode_curvature_equals_dense_references(tiny):
    model, params, state, batch = tiny
    obj = sj.Objective(with_state(model, state).predict, sj.get_loss("cross_entropy"))
    flat, unravel = ravel_pytree(params)
    loss = lambda f: jnp.mean(obj.batch_losses(unravel(f), batch))
    dense_h = jax.jit(jax.hessian(loss))(flat)
    outputs = lambda f: jax.vmap(lambda x: model.eval_predict(unravel(f), state, x))(batch.inputs)
    jac = jax.jacobian(outputs)(flat)  # (N, K, P)
    probs = jax.nn.softmax(outputs(flat))
    out_h = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(probs)
    dense_g = jnp.einsum("nkp,nkl,nlq->pq", jac, out_h, jac) / batch.inputs.shape[0]
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape, jnp.float64)
    hv = ravel_pytree(sj.hessian(obj, params, batch)(unravel(v)))[0]
    gv = ravel_pytree(sj.ggn(obj, params, batch)(unravel(v)))[0]
    assert np.abs(dense_h @ v).max() > 1e-6
    np.testing.assert_allclose(hv, dense_h @ v, rtol=1e-9, atol=1e-11 * np.abs(dense_h).max())
    np.testing.assert_allclose(gv, dense_g @ v, rtol=1e-9, atol=1e-11 * np.abs(dense_g).max())
    # The frozen statistics are used: the initial ones (0, 1) give another Hessian.
    init_state = model.init(KEY)[1]
    other = sj.Objective(with_state(model, init_state).predict, sj.get_loss("cross_entropy"))
    hv0 = ravel_pytree(sj.hessian(other, params, batch)(unravel(v)))[0]
    assert np.abs(hv0 - hv).max() > 1e-3 * np.abs(hv).max()


def test_running_statistics_are_not_differentiated(tiny):
    model, params, state, batch = tiny
    grad = jax.grad(lambda s: jnp.sum(model.eval_predict(params, s, batch.inputs[0])))(state)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grad))


def test_train_mode_updates_statistics_by_the_batch_norm_rule(tiny):
    """m' = μ m + (1 − μ) mean_B(z), v' = μ v + (1 − μ) var_B(z) (biased), z the stem conv's
    output over batch, height and width; every other layer: as flax's own train-mode apply."""
    model, params, state, batch = tiny
    outputs, new = model.train_apply(params, state, batch.inputs)
    dims = ("NHWC", "HWIO", "NHWC")
    kernel = params["Conv_0"]["kernel"]
    z = jax.lax.conv_general_dilated(batch.inputs, kernel, (1, 1), "SAME", dimension_numbers=dims)
    old = state["BatchNorm_0"]
    mean = MOMENTUM * old["mean"] + (1 - MOMENTUM) * z.mean(axis=(0, 1, 2))
    var = MOMENTUM * old["var"] + (1 - MOMENTUM) * z.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new["BatchNorm_0"]["mean"], mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new["BatchNorm_0"]["var"], var, rtol=1e-12)
    variables = {"params": params, "batch_stats": state}
    ref, upd = model.module.apply(variables, batch.inputs, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(outputs, ref)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(upd["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_mode_does_not_mix_examples_and_train_mode_does(tiny):
    model, params, state, batch = tiny
    evaluate = lambda p, xs: jax.vmap(lambda x: model.eval_predict(p, state, x))(xs)
    check_no_example_mixing(evaluate, params, batch.inputs)
    train = lambda p, xs: model.train_apply(p, state, xs)[0]
    with pytest.raises(ValueError):
        check_no_example_mixing(train, params, batch.inputs)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="H, W, C"):
        build_resnet18(input_shape=(784,), num_outputs=10)
    with pytest.raises(ValueError, match="width_multiplier"):
        build_resnet18(input_shape=SHAPE, num_outputs=10, width_multiplier=0)
    model = build_resnet18(input_shape=SHAPE, num_outputs=K, width_multiplier=1 / 128)
    params, state = jax.eval_shape(model.init, KEY)
    with pytest.raises(ValueError, match="ONE example"):
        model.eval_predict(params, state, jnp.zeros((2, *SHAPE), jnp.float32))
