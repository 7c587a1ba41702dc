"""Function-preserving reparametrisations of MLPs and shallow nets (sharpness_jax.symmetries)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fisher_problems import linear_net, outputs
from fisher_problems import relu_se as _relu_se
from problems import flat, mlp_problem, rel_err
from shallow_problems import outputs as shallow_outputs
from shallow_problems import shallow_problem

import sharpness_jax as sj
from sharpness_jax import quotient as q
from sharpness_jax import shallow, symmetries


@pytest.fixture(scope="module")
def relu_se():
    return _relu_se()


def test_reparametrisations_preserve_predictions(relu_se):
    obj, params, batch = relu_se.objective, relu_se.params, relu_se.batch
    before = outputs(obj, params, batch)
    key = jax.random.PRNGKey(1)
    variants = [
        symmetries.rescale_layers(params, [0.1, 10.0], activation="relu"),
        symmetries.rescale_layers(params, [10.0, 0.1], activation="relu"),
        symmetries.random_rescale_layers(key, params, activation="relu", log_std=2.0),
        symmetries.rescale_units(
            params, {"Dense_0": jnp.array([0.1, 10.0, 3.0])}, activation="relu"
        ),
        symmetries.random_rescale_units(key, params, activation="relu"),
        symmetries.permute_units(params, {"Dense_0": jnp.array([2, 0, 1])}),
        symmetries.random_permute_units(key, params),
    ]
    for new in variants:
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
        assert flat(new).dtype == np.float64
        np.testing.assert_allclose(outputs(obj, new, batch), before, rtol=0, atol=1e-12)
        assert rel_err(flat(new), flat(params)) > 1e-3
    # Unwrapped layout (no "params" level) and a three-layer net with the product form.
    deep = mlp_problem("relu", "squared_error_half", n=4, d=3, widths=(4, 3, 2))
    alphas = [2.0, 0.25, 2.0]
    new = symmetries.rescale_layers(deep.params["params"], alphas, activation="relu")
    np.testing.assert_allclose(
        outputs(deep.objective, {"params": new}, deep.batch),
        outputs(deep.objective, deep.params, deep.batch),
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
        new = symmetries.rescale_units(params, c, activation=activation)
        np.testing.assert_allclose(new["a"], params["a"] / c[:, None] ** degree)
        before = predict(params, x, activation=activation)
        for variant in (new, symmetries.random_permute_units(key, params)):
            assert rel_err(flat(variant), flat(params)) > 1e-3
            np.testing.assert_allclose(
                predict(variant, x, activation=activation), before, atol=1e-12
            )


def test_linear_gauge_preserves_predictions():
    obj, params, x = linear_net()
    a = jnp.array([[2.0, 1.0], [-0.5, 0.3]])
    new = symmetries.linear_gauge(params, a)
    np.testing.assert_allclose(
        new["params"]["Dense_0"]["kernel"], params["params"]["Dense_0"]["kernel"] @ a
    )
    batch = sj.Batch(x, x)
    before = outputs(obj, params, batch)
    np.testing.assert_allclose(outputs(obj, new, batch), before, atol=1e-12)
    gauged = symmetries.random_linear_gauge(jax.random.PRNGKey(2), params)
    np.testing.assert_allclose(outputs(obj, gauged, batch), before, atol=1e-12)


def test_bad_inputs_raise(relu_se):
    params = relu_se.params
    with pytest.raises(ValueError, match="> 0"):
        symmetries.rescale_layers(params, [-1.0, -1.0], activation="relu")
    with pytest.raises(ValueError, match="multiply to 1"):
        symmetries.rescale_layers(params, [2.0, 2.0], activation="relu")
    with pytest.raises(ValueError, match="one scale per layer"):
        symmetries.rescale_layers(params, [1.0], activation="relu")
    with pytest.raises(ValueError, match="homogeneous"):
        symmetries.rescale_layers(params, [2.0, 0.5], activation="tanh")
    with pytest.raises(ValueError, match="Dense_0"):
        symmetries.rescale_layers(
            {"params": {"Conv_0": params["params"]["Dense_0"]}}, [1.0], activation="relu"
        )
    with pytest.raises(ValueError, match="hidden layers"):
        symmetries.rescale_units(params, {"Dense_1": jnp.ones(2)}, activation="relu")
    with pytest.raises(ValueError, match="> 0"):
        symmetries.rescale_units(params, {"Dense_0": jnp.array([1.0, 0.0, 1.0])}, activation="relu")
    with pytest.raises(ValueError, match="shape"):
        symmetries.rescale_units(params, {"Dense_0": jnp.ones(2)}, activation="relu")
    with pytest.raises(ValueError, match="not a permutation"):
        symmetries.permute_units(params, {"Dense_0": jnp.array([0, 0, 1])})
    with pytest.raises(ValueError, match="homogeneous"):
        symmetries.rescale_units(
            {"w": jnp.ones((2, 3)), "a": jnp.ones((2, 1))}, jnp.ones(2), activation="tanh"
        )
    _, lin_params, _ = linear_net()
    with pytest.raises(ValueError, match="invertible"):
        symmetries.linear_gauge(lin_params, jnp.array([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        symmetries.linear_gauge(lin_params, jnp.eye(3))
    deep = mlp_problem("relu", "squared_error_half", n=4, d=3, widths=(4, 3, 2))
    with pytest.raises(ValueError, match="two-layer"):
        symmetries.linear_gauge(deep.params, jnp.eye(4))


# ------------------------------------------------------------------ shallow-net orbit moves


def test_orbit_moves_preserve_the_function():
    x = jax.random.normal(jax.random.PRNGKey(5), (5, 3), jnp.float64)
    for act in ("relu", "quadratic", "tanh"):
        params, _ = shallow_problem(act, K=2)
        f0 = shallow_outputs(params, x, act)
        moves = [symmetries.permute_units(params, jnp.array([1, 2, 0]))]
        if act != "tanh":
            moves.append(
                symmetries.rescale_units(params, jnp.array([0.1, 2.0, 10.0]), activation=act)
            )
        if act != "relu":
            moves.append(
                symmetries.flip_units(params, jnp.array([True, False, True]), activation=act)
            )
        for moved in moves:
            np.testing.assert_allclose(shallow_outputs(moved, x, act), f0, rtol=1e-12, atol=1e-14)
            assert np.max(np.abs(flat(moved) - flat(params))) > 1e-2
    # Rescaling pushes the generators forward: v_i(D_c θ) = D_c v_i(θ).
    params, _ = shallow_problem("quadratic", K=2)
    c = jnp.array([0.5, 2.0, 4.0])
    gens = q.vertical_generators(params, activation="quadratic")
    pushed = jax.vmap(lambda t: symmetries.rescale_units(t, c, activation="quadratic"))(gens)
    moved = q.vertical_generators(
        symmetries.rescale_units(params, c, activation="quadratic"), activation="quadratic"
    )
    np.testing.assert_allclose(flat(pushed), flat(moved), rtol=1e-14)
    # Conserved quantities permute with the units.
    perm = jnp.array([2, 0, 1])
    np.testing.assert_allclose(
        q.conserved_quantities(symmetries.permute_units(params, perm), activation="quadratic"),
        q.conserved_quantities(params, activation="quadratic")[perm],
    )
    with pytest.raises(ValueError, match="positive"):
        symmetries.rescale_units(params, jnp.array([1.0, -1.0, 1.0]), activation="quadratic")
    with pytest.raises(ValueError, match="not a permutation"):
        symmetries.permute_units(params, jnp.array([0, 0, 1]))
    with pytest.raises(ValueError, match="sign-flip"):
        symmetries.flip_units(params, jnp.array([True, False, False]), activation="relu")


def test_random_rescale_is_layers_then_units():
    prob = mlp_problem("relu", "cross_entropy", n=5, d=3, widths=(4, 3))
    key = jax.random.PRNGKey(3)
    k_layers, k_units = jax.random.split(key)
    expected = symmetries.random_rescale_units(
        k_units,
        symmetries.random_rescale_layers(k_layers, prob.params, activation="relu", log_std=0.5),
        activation="relu",
        log_std=0.7,
    )
    got = symmetries.random_rescale(key, prob.params, layer_log_std=0.5, unit_log_std=0.7)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    xs = prob.batch.inputs
    f0 = jax.vmap(prob.objective.predict, (None, 0))(prob.params, xs)
    f1 = jax.vmap(prob.objective.predict, (None, 0))(got, xs)
    np.testing.assert_allclose(f1, f0, rtol=1e-12, atol=1e-12)
    moved = zip(jax.tree.leaves(got), jax.tree.leaves(prob.params), strict=True)
    assert max(rel_err(a, b) for a, b in moved) > 0.1
