"""Quotient geometry of shallow nets: generators, projectors, the split of an update, and
the conserved quantities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import flat
from shallow_problems import HALF_SE, outputs, shallow_problem

import sharpness_jax as sj
from sharpness_jax import quotient as q
from sharpness_jax import quotient_spectra as qs
from sharpness_jax import symmetries


@functools.partial(jax.jit, static_argnames=("activation", "metric"))
def dense_projector(params, *, activation, metric="euclidean"):
    return sj.dense(q.horizontal_projector(params, activation=activation, metric=metric), params)


def unit_mask(params, i):
    return jax.tree_util.tree_map(
        lambda a: (
            a * (jnp.arange(a.shape[0]) == i).astype(a.dtype).reshape((-1,) + (1,) * (a.ndim - 1))
        ),
        params,
    )


def row(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


# ------------------------------------------------------------------ generators are symmetries


@functools.partial(jax.jit, static_argnames="activation")
def _symmetry_quantities(params, batch, *, activation):
    obj = qs.shallow_objective(HALF_SE, activation=activation)
    gens = q.vertical_generators(params, activation=activation)
    gen_flat = jax.vmap(lambda t: ravel_pytree(t)[0])(gens)  # (m, P)
    jac = q.realisation_jacobian(params, batch.inputs, activation=activation)
    jvp = sj.jacobian_vp(obj.predict, params, batch.inputs)
    grad = sj.gradient(obj, params, batch)
    hvp = sj.hessian(obj, params, batch)
    k = sj.shallow.HOMOGENEITY[activation]
    # A_i ∇L: d v_i/dθ applied to ∇L (−k on a_i, 1 on w_i, b_i), unit i's block only.
    a_grad = {key: (-k * g if key == "a" else g) for key, g in grad.items()}
    a_grad_i = jax.vmap(lambda i: ravel_pytree(unit_mask(a_grad, i))[0])(jnp.arange(3))
    basis = q.vertical_basis(params, activation=activation)
    metric = q.realisation_metric(params, batch.inputs, activation=activation)
    v0 = jax.tree_util.tree_map(
        lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params
    )
    return {
        "jac": jac,
        "gen": gen_flat,
        "jvp_gen": jax.vmap(jvp)(gens),
        "grad": flat_(grad),
        "grad_components": q.vertical_components(grad, params, activation=activation),
        "hv": jax.vmap(lambda t: ravel_pytree(hvp(t))[0])(gens),
        "a_grad": a_grad_i,
        "basis": jax.vmap(lambda t: ravel_pytree(t)[0])(basis.vectors),
        "dim": basis.dim,
        "metric_v0": flat_(metric(v0)),
        "v0": flat_(v0),
    }


def flat_(tree):
    return ravel_pytree(tree)[0]


SYMMETRY_CASES = [
    ("relu", True, 1),
    ("leaky_relu", False, 3),
    ("quadratic", True, 2),
    ("quadratic", False, 1),
]


@pytest.mark.parametrize("activation,bias,K", SYMMETRY_CASES)
def test_generators_lie_in_the_kernel_of_the_jacobian(activation, bias, K):
    params, batch = shallow_problem(activation, K=K, bias=bias)
    out = jax.device_get(_symmetry_quantities(params, batch, activation=activation))
    jac, gen = out["jac"], out["gen"]
    scale = np.linalg.norm(jac, 2) * np.linalg.norm(gen, axis=1)
    # J v_i = 0 (dense and matrix-free).
    assert np.max(np.linalg.norm(jac @ gen.T, axis=0) / scale) < 1e-10
    assert np.max(np.linalg.norm(out["jvp_gen"].reshape(3, -1), axis=1) / scale) < 1e-10
    # The dense Jacobian is the matrix-free one.
    np.testing.assert_allclose(jac @ gen.T, out["jvp_gen"].reshape(3, -1).T, atol=1e-13)
    # ⟨∇L, v_i⟩ = 0 and H v_i = −A_i ∇L at every (non-critical) point.
    g_norm = np.linalg.norm(out["grad"])
    assert g_norm > 1e-3
    assert np.max(np.abs(gen @ out["grad"]) / (g_norm * np.linalg.norm(gen, axis=1))) < 1e-12
    assert np.max(np.abs(out["grad_components"])) < 1e-12 * g_norm
    np.testing.assert_allclose(out["hv"], -out["a_grad"], atol=1e-11 * g_norm)
    assert np.max(np.abs(out["a_grad"])) > 1e-4  # so H v_i ≠ 0 here: the point is not critical
    # Orthonormal vertical basis spanning the generators.
    np.testing.assert_allclose(out["basis"] @ out["basis"].T, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(
        out["basis"], gen / np.linalg.norm(gen, axis=1, keepdims=True), atol=1e-14
    )
    assert int(out["dim"]) == 3
    # G v = JᵀJ v / n.
    np.testing.assert_allclose(
        out["metric_v0"], jac.T @ (jac @ out["v0"]) / batch.inputs.shape[0], rtol=1e-11
    )


def test_tanh_has_no_vertical_space():
    params, _ = shallow_problem("tanh", K=2)
    basis = q.vertical_basis(params, activation="tanh")
    assert int(basis.dim) == 0 and not np.any(basis.valid)
    assert all(np.all(a == 0) for a in jax.tree_util.tree_leaves(basis.vectors))
    size = flat(params).size
    np.testing.assert_array_equal(q.horizontal_basis(params, activation="tanh"), np.eye(size))
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    h, vert = q.split_update(params, v, activation="tanh")
    np.testing.assert_array_equal(flat(h), flat(v))
    assert np.all(flat(vert) == 0)
    with pytest.raises(ValueError, match="no rescaling symmetry"):
        q.conserved_quantities(params, activation="tanh")
    with pytest.raises(ValueError, match="no rescaling symmetry"):
        symmetries.rescale_units(params, jnp.ones(3), activation="tanh")


# ------------------------------------------------------------------ projectors and the split


@pytest.mark.parametrize("metric", q.METRICS)
def test_horizontal_projector_basis_and_split(metric):
    act = "relu"
    params, _ = shallow_problem(act, K=2)
    size = flat(params).size
    proj = q.horizontal_projector(params, activation=act, metric=metric)
    qd = np.asarray(dense_projector(params, activation=act, metric=metric))
    np.testing.assert_allclose(qd, qd.T, atol=1e-15)
    np.testing.assert_allclose(qd @ qd, qd, atol=1e-14)
    assert round(np.trace(qd)) == size - 3
    basis = np.asarray(q.horizontal_basis(params, activation=act, metric=metric))
    assert basis.shape == (size, size - 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(size - 3), atol=1e-14)
    np.testing.assert_allclose(basis @ basis.T, qd, atol=1e-14)

    delta = jax.tree_util.tree_map(
        lambda a: jnp.sin(1.0 + jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params
    )
    h, v = q.split_update(params, delta, activation=act, metric=metric)
    np.testing.assert_allclose(flat(h) + flat(v), flat(delta), atol=1e-15)
    # δ_h ∈ W (its projection on W is itself); δ_v ∈ V (a combination of the generators).
    np.testing.assert_allclose(basis @ (basis.T @ flat(h)), flat(h), atol=1e-14)
    gens = np.asarray(jax.vmap(flat_)(q.vertical_generators(params, activation=act)))
    coeff, *_ = np.linalg.lstsq(gens.T, flat(v), rcond=None)
    np.testing.assert_allclose(gens.T @ coeff, flat(v), atol=1e-14)
    assert np.linalg.norm(flat(v)) > 1e-2
    # The split is a projection: splitting δ_h or δ_v again changes nothing.
    h2, v2 = q.split_update(params, h, activation=act, metric=metric)
    np.testing.assert_allclose(flat(h2), flat(h), atol=1e-14)
    assert np.max(np.abs(flat(v2))) < 1e-14
    h3, _ = q.split_update(params, v, activation=act, metric=metric)
    assert np.max(np.abs(flat(h3))) < 1e-14
    # Q is the orthogonal projector onto W; for the Euclidean metric it is the split itself.
    np.testing.assert_allclose(flat(proj(delta)), qd @ flat(delta), atol=1e-14)
    if metric == "euclidean":
        np.testing.assert_allclose(flat(proj(delta)), flat(h), atol=1e-14)
        assert np.max(np.abs(qd @ gens.T)) < 1e-14
    else:
        assert np.max(np.abs(flat(proj(delta)) - flat(h))) > 1e-3  # oblique vs orthogonal


def test_degenerate_units_are_flagged_and_dropped():
    act = "relu"
    params, batch = shallow_problem(act, K=2)
    params = {key: leaf.at[1].set(0.0) for key, leaf in params.items()}  # unit 1 is all zero
    basis = jax.jit(q.vertical_basis, static_argnames="activation")(params, activation=act)
    np.testing.assert_array_equal(basis.valid, [True, False, True])
    assert int(basis.dim) == 2
    assert np.all(flat(row(basis.vectors, 1)) == 0)
    qd = np.asarray(dense_projector(params, activation=act))
    assert round(np.trace(qd)) == flat(params).size - 2
    np.testing.assert_allclose(qd @ qd, qd, atol=1e-14)
    with pytest.raises(ValueError, match=r"units \[1\] are degenerate"):
        q.horizontal_basis(params, activation=act)
    pruned = q.drop_units(params, np.array([True, False, True]))
    np.testing.assert_allclose(
        outputs(pruned, batch.inputs, act), outputs(params, batch.inputs, act), atol=1e-15
    )
    assert q.horizontal_basis(pruned, activation=act).shape == (12, 10)


# ----------------------------------------------------------------------- update decomposition


def test_decompose_gradient_sgd_and_weight_decay_steps():
    act = "relu"
    params, batch = shallow_problem(act, K=2, n=8, seed=3)
    obj = qs.shallow_objective(HALF_SE, activation=act)
    sub = jax.tree_util.tree_map(lambda a: a[:3], batch)

    @jax.jit
    def parts(params, eta):
        g, g_sub = sj.gradient(obj, params, batch), sj.gradient(obj, params, sub)
        steps = {
            "gd": g,
            "sgd": g_sub,
            "sgd_weight_decay": jax.tree_util.tree_map(lambda a, p: a + 0.5 * p, g_sub, params),
        }
        return {
            (metric, name): q.decompose_update(
                params,
                jax.tree_util.tree_map(lambda a: -eta * a, step),
                batch.inputs,
                activation=act,
                metric=metric,
            )
            for name, step in steps.items()
            for metric in q.METRICS
        }

    big, small = parts(params, 1e-2), parts(params, 5e-3)
    for metric, name in big:
        s_big, s_small = big[metric, name], small[metric, name]
        norm_h = np.linalg.norm(s_big.first_order_horizontal)
        assert norm_h > 1e-4
        assert np.linalg.norm(s_big.first_order_vertical) < 1e-12 * norm_h
        np.testing.assert_allclose(
            s_big.change_total,
            outputs(
                jax.tree_util.tree_map(
                    jnp.add,
                    params,
                    jax.tree_util.tree_map(jnp.add, s_big.horizontal, s_big.vertical),
                ),
                batch.inputs,
                act,
            )
            - outputs(params, batch.inputs, act),
            atol=1e-15,
        )
        # The horizontal change agrees with J δ_h to first order.
        rem_big = np.linalg.norm(s_big.change_horizontal - s_big.first_order_horizontal)
        rem_small = np.linalg.norm(s_small.change_horizontal - s_small.first_order_horizontal)
        assert rem_big < 1e-2 * norm_h and 3.0 < rem_big / rem_small < 5.0
        vertical_norm = np.linalg.norm(flat(s_big.vertical))
        if metric == "euclidean" and name != "sgd_weight_decay":
            # Every (mini-batch) gradient is orthogonal to the generators: no vertical part.
            assert vertical_norm < 1e-14 * np.linalg.norm(flat(s_big.horizontal))
            continue
        assert vertical_norm > 1e-5
        # The exact vertical change is second order: halving the step quarters it.
        ratio = np.linalg.norm(s_big.change_vertical) / np.linalg.norm(s_small.change_vertical)
        assert 3.5 < ratio < 4.5, (name, ratio)


# --------------------------------------------------------------------- conserved quantities


@pytest.mark.parametrize("activation,K", [("relu", 2), ("quadratic", 1)])
def test_conserved_quantities_under_gradient_descent(activation, K):
    params, batch = shallow_problem(activation, K=K, n=8, seed=1)
    obj = qs.shallow_objective(HALF_SE, activation=activation)
    k = sj.shallow.HOMOGENEITY[activation]

    # One GD step changes Q_i by exactly η²(k‖g_a‖² − ‖g_w‖² − g_b²).
    eta = 0.1
    g = sj.gradient(obj, params, batch)
    after = jax.tree_util.tree_map(lambda p, gi: p - eta * gi, params, g)
    dq = q.conserved_quantities(after, activation=activation) - q.conserved_quantities(
        params, activation=activation
    )
    expected = eta**2 * (k * jnp.sum(g["a"] ** 2, 1) - jnp.sum(g["w"] ** 2, 1) - g["b"] ** 2)
    np.testing.assert_allclose(dq, expected, rtol=1e-9, atol=1e-16)

    @jax.jit
    def run(params, eta, steps):
        def body(_, p):
            grad = sj.gradient(obj, p, batch)
            return jax.tree_util.tree_map(lambda a, b: a - eta * b, p, grad)

        return jax.lax.fori_loop(0, steps, body, params)

    q0 = np.asarray(q.conserved_quantities(params, activation=activation))
    ends = [run(params, 1.0 / steps, steps) for steps in (100, 200)]  # time 1, η = 1/steps
    drift = [np.max(np.abs(q.conserved_quantities(e, activation=activation) - q0)) for e in ends]
    assert 1.7 < drift[0] / drift[1] < 2.3, drift  # drift ∝ η
    moved = np.max(np.abs(flat(ends[1]) - flat(params)))
    assert moved > 0.05 and drift[1] < 1e-2 * moved
    # The factor k matters: for k = 2, ‖a_i‖² − ‖w_i‖² − b_i² is NOT conserved.
    if k == 2:
        wrong = lambda p: jnp.sum(p["a"] ** 2, 1) - jnp.sum(p["w"] ** 2, 1) - p["b"] ** 2
        assert np.max(np.abs(wrong(ends[1]) - wrong(params))) > 20 * drift[1]


def test_bad_inputs_raise_clear_errors():
    params, _ = shallow_problem("relu")
    with pytest.raises(ValueError, match="unknown shallow-net activation"):
        q.vertical_basis(params, activation="gelu")
    with pytest.raises(ValueError, match="metric must be one of"):
        q.horizontal_projector(params, activation="relu", metric="fisher")
    with pytest.raises(ValueError, match="need keys"):
        q.vertical_generators({"w": params["w"]}, activation="relu")
    with pytest.raises(ValueError, match=r"params\['a'\] must have shape"):
        q.vertical_generators({**params, "a": params["a"][:2]}, activation="relu")
    with pytest.raises(TypeError, match="floating-point"):
        q.vertical_generators(
            {k: v.astype(jnp.int32) for k, v in params.items()}, activation="relu"
        )
    with pytest.raises(ValueError, match="delta"):
        q.split_update(params, {"w": params["w"], "a": params["a"]}, activation="relu")


def test_float32_under_jit():
    act = "leaky_relu"
    params, batch = shallow_problem(act, K=2)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    x = batch.inputs.astype(jnp.float32)
    delta = jax.tree_util.tree_map(lambda a: jnp.cos(a * 3.0), params)

    @jax.jit
    def go(params, delta):
        split = q.decompose_update(params, delta, x, activation=act, metric="scale_invariant")
        proj = q.horizontal_projector(params, activation=act)(delta)
        return split, proj, q.vertical_basis(params, activation=act).dim

    split, proj, dim = go(params, delta)
    assert split.first_order_horizontal.dtype == jnp.float32 and flat(proj).dtype == np.float32
    assert int(dim) == 3
    assert np.linalg.norm(split.first_order_vertical) < 1e-5 * np.linalg.norm(
        split.first_order_horizontal
    )
