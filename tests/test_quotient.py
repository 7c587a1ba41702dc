"""Quotient geometry of shallow nets: symmetries, projectors, reduced spectra, invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree
from problems import flat

import sharpness_jax as sj
from sharpness_jax import quotient as q
from sharpness_jax.shallow import init_shallow, shallow_predict

HALF_SE = sj.get_loss("squared_error_half")


def shallow_problem(activation, *, m=3, d=3, K=1, bias=True, n=6, seed=0, noise=1.0):
    """Random regular params (non-zero biases) and a batch with Gaussian targets."""
    kp, kx, ky, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = init_shallow(kp, input_dim=d, width=m, num_outputs=K, bias=bias, dtype=jnp.float64)
    if bias:
        params["b"] = 0.3 * jax.random.normal(kb, (m,), jnp.float64)
    x = jax.random.normal(kx, (n, d), jnp.float64)
    y = noise * jax.random.normal(ky, (n, K), jnp.float64)
    return params, sj.Batch(x, y)


regularity = jax.jit(q.regularity, static_argnames="activation")


@functools.partial(jax.jit, static_argnames=("activation", "metric"))
def dense_projector(params, *, activation, metric="euclidean"):
    return sj.dense(q.horizontal_projector(params, activation=activation, metric=metric), params)


def outputs(params, x, activation):
    return jax.vmap(lambda xi: shallow_predict(params, xi, activation=activation))(x)


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
    obj = q.shallow_objective(HALF_SE, activation=activation)
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
        q.rescale_units(params, jnp.ones(3), activation="tanh")


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


# ---------------------------------------------------------------------------- regular set


@pytest.mark.parametrize(
    "activation,m,d,K,expected_deficit",
    [
        ("relu", 3, 2, 1, 0),
        ("tanh", 3, 2, 1, 0),
        ("quadratic", 3, 4, 2, 0),
        # K = 1: the indefinite orthogonal group of Wᵀdiag(a)W adds m(m−1)/2 = 3 directions.
        ("quadratic", 3, 4, 1, 3),
    ],
)
def test_regularity_rank(activation, m, d, K, expected_deficit):
    params, batch = shallow_problem(activation, m=m, d=d, K=K, n=24)
    reg = regularity(params, batch.inputs, activation=activation)
    size = flat(params).size
    assert int(reg.expected_rank) == size - (0 if activation == "tanh" else m)
    assert int(reg.rank) == int(reg.expected_rank) - expected_deficit
    assert bool(reg.is_regular) == (expected_deficit == 0)
    assert not np.any(reg.duplicated)


def test_regularity_flags_duplicates():
    params, batch = shallow_problem("relu", m=3, d=2, n=24)
    dup = {
        "w": params["w"].at[2].set(2.0 * params["w"][0]),
        "b": params["b"].at[2].set(2.0 * params["b"][0]),
        "a": params["a"],
    }
    reg = regularity(dup, batch.inputs, activation="relu")
    np.testing.assert_array_equal(reg.duplicated, [True, False, True])
    assert int(reg.rank) < int(reg.expected_rank) and not bool(reg.is_regular)
    # For ReLU an anti-parallel unit is not a duplicate; for the even quadratic it is.
    anti = {
        **dup,
        "w": dup["w"].at[2].set(-params["w"][0]),
        "b": dup["b"].at[2].set(-params["b"][0]),
    }
    assert not np.any(regularity(anti, batch.inputs, activation="relu").duplicated)
    # A unit with a_i = 0 (or w_i = 0) is flagged.
    zero_a = {**params, "a": params["a"].at[1].set(0.0)}
    reg = regularity(zero_a, batch.inputs, activation="relu")
    np.testing.assert_array_equal(reg.a_nonzero, [True, False, True])
    assert np.all(reg.w_nonzero) and not bool(reg.is_regular)
    zero_w = {**params, "w": params["w"].at[0].set(0.0)}
    reg = regularity(zero_w, batch.inputs, activation="relu")
    np.testing.assert_array_equal(reg.w_nonzero, [False, True, True])
    assert not bool(reg.is_regular)
    assert np.all(
        regularity(anti, batch.inputs, activation="quadratic").duplicated[np.array([0, 2])]
    )


# ----------------------------------------------------------------------- update decomposition


def test_decompose_gradient_sgd_and_weight_decay_steps():
    act = "relu"
    params, batch = shallow_problem(act, K=2, n=8, seed=3)
    obj = q.shallow_objective(HALF_SE, activation=act)
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
    obj = q.shallow_objective(HALF_SE, activation=activation)
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


# ------------------------------------------------------------------- reduced Hessian spectra


@functools.partial(jax.jit, static_argnames=("activation", "metric"))
def _spectra(params, batch, *, activation, metric):
    obj = q.shallow_objective(HALF_SE, activation=activation)
    return q.quotient_spectra(obj, params, batch, activation=activation, metric=metric)


@functools.partial(jax.jit, static_argnames="activation")
def _horizontal_hessian_dense(params, batch, *, activation):
    obj = q.shallow_objective(HALF_SE, activation=activation)
    return sj.dense(q.horizontal_hessian(obj, params, batch, activation=activation), params)


def teacher_problem(n, noise, seed=0, K=2):
    """ReLU teacher m=3, d=2 with non-zero biases; targets = teacher + noise."""
    params, batch = shallow_problem("relu", m=3, d=2, K=K, n=n, seed=seed)
    y = outputs(params, batch.inputs, "relu")
    y = y + noise * jax.random.normal(jax.random.PRNGKey(99), y.shape, y.dtype)
    return params, sj.Batch(batch.inputs, y)


def test_interpolating_minimum_false_flat_directions():
    act = "relu"
    params, batch = teacher_problem(n=40, noise=0.0)
    obj = q.shallow_objective(HALF_SE, activation=act)
    assert float(sj.loss_value(obj, params, batch)) < 1e-30
    spec = _spectra(params, batch, activation=act, metric="euclidean")
    top = spec.ambient[0]
    near_zero = np.abs(spec.ambient) <= 1e-10 * top
    assert spec.vertical_dim == 3 and np.sum(near_zero) == 3  # the m orbit directions
    assert np.min(spec.reduced) > 1e-5 * top  # the reduced Hessian has none of them
    np.testing.assert_allclose(np.sort(spec.reduced), np.sort(spec.ambient[~near_zero]), rtol=1e-9)
    # H = G at an interpolating minimum of ½‖f − y‖²: every generalised eigenvalue is 1.
    np.testing.assert_allclose(spec.generalised, 1.0, rtol=1e-8)
    # Matrix-free Q H Q: reduced spectrum plus dim V zeros.
    qhq = np.linalg.eigvalsh(np.asarray(_horizontal_hessian_dense(params, batch, activation=act)))
    np.testing.assert_allclose(np.sort(qhq)[3:], np.sort(spec.reduced), rtol=1e-9)
    assert np.max(np.abs(np.sort(qhq)[:3])) < 1e-12 * top


def _newton_to_critical_point(obj, params, batch, *, activation, steps=6):
    """Newton steps restricted to the horizontal space, to ‖∇L‖ ~ 1e-16."""
    flat0, unravel = ravel_pytree(params)
    loss = lambda f: sj.loss_value(obj, unravel(f), batch)

    @jax.jit
    def step(f):
        g, hess = jax.grad(loss)(f), jax.hessian(loss)(f)
        basis = q.horizontal_basis(unravel(f), activation=activation)
        return f - basis @ jnp.linalg.solve(basis.T @ hess @ basis, basis.T @ g)

    f = flat0
    for _ in range(steps):
        f = step(f)
    return unravel(f), float(jnp.linalg.norm(jax.grad(loss)(f)))


def _rel_dev(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_generalised_spectrum_is_rescaling_invariant():
    act = "relu"
    params, batch = teacher_problem(n=40, noise=0.01)
    obj = q.shallow_objective(HALF_SE, activation=act)
    scales = jnp.array([0.1, 10.0, 3.0])

    # (a) Any regular point, scale-invariant horizontal space.
    start = jax.tree_util.tree_map(
        lambda a: a + 0.2 * jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params
    )
    assert float(jnp.linalg.norm(flat_(sj.gradient(obj, start, batch)))) > 1e-2
    moved = q.rescale_units(start, scales, activation=act)
    np.testing.assert_allclose(
        outputs(moved, batch.inputs, act), outputs(start, batch.inputs, act), rtol=1e-12
    )
    s0 = _spectra(start, batch, activation=act, metric="scale_invariant")
    s1 = _spectra(moved, batch, activation=act, metric="scale_invariant")
    ratio = s1.ambient[0] / s0.ambient[0]
    assert ratio > 10 or ratio < 0.1, ratio  # ambient sharpness is not invariant
    assert _rel_dev(s1.generalised, s0.generalised) < 1e-8
    assert _rel_dev(s1.reduced, s0.reduced) > 1e-2  # the Euclidean-basis spectrum is not
    # The Euclidean horizontal space is not equivariant: off critical points it differs.
    e0 = _spectra(start, batch, activation=act, metric="euclidean")
    e1 = _spectra(moved, batch, activation=act, metric="euclidean")
    assert _rel_dev(e1.generalised, e0.generalised) > 1e-3

    # (b) A critical point (non-interpolating minimum): the Euclidean one is invariant too.
    crit, grad_norm = _newton_to_critical_point(obj, params, batch, activation=act)
    assert grad_norm < 1e-13 and float(sj.loss_value(obj, crit, batch)) > 1e-6
    moved = q.rescale_units(crit, scales, activation=act)
    c0 = _spectra(crit, batch, activation=act, metric="euclidean")
    c1 = _spectra(moved, batch, activation=act, metric="euclidean")
    ratio = c1.ambient[0] / c0.ambient[0]
    assert ratio > 10 or ratio < 0.1, ratio
    assert _rel_dev(c1.generalised, c0.generalised) < 1e-8
    assert _rel_dev(c1.reduced, c0.reduced) > 1e-2
    assert np.min(c0.reduced) > 0  # a strict minimum on the quotient
    assert np.max(np.abs(c0.generalised - 1.0)) > 1e-3  # H ≠ G: the residual term matters
    # Permutations: everything is invariant.
    perm = q.permute_units(crit, jnp.array([2, 0, 1]))
    c2 = _spectra(perm, batch, activation=act, metric="euclidean")
    for a, b in (
        (c2.ambient, c0.ambient),
        (c2.reduced, c0.reduced),
        (c2.generalised, c0.generalised),
    ):
        assert _rel_dev(a, b) < 1e-10

    # The dense building blocks against independent references (jax.hessian, scipy's eigh).
    parts = jax.device_get(_dense_parts(crit, batch, activation=act))
    np.testing.assert_allclose(np.linalg.eigvalsh(parts["hessian"])[::-1], c0.ambient, atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(parts["reduced_h"])[::-1], c0.reduced, atol=1e-12)
    basis = parts["basis"]
    np.testing.assert_allclose(parts["reduced_h"], basis.T @ parts["hessian"] @ basis, atol=1e-12)
    np.testing.assert_allclose(parts["reduced_g"], basis.T @ parts["metric"] @ basis, atol=1e-13)
    jac = parts["jac"]
    np.testing.assert_allclose(parts["metric"], jac.T @ jac / batch.inputs.shape[0], atol=1e-13)
    expected = scipy.linalg.eigh(parts["reduced_h"], parts["reduced_g"], eigvals_only=True)
    np.testing.assert_allclose(c0.generalised, expected[::-1], rtol=1e-8)


@functools.partial(jax.jit, static_argnames="activation")
def _dense_parts(params, batch, *, activation):
    obj = q.shallow_objective(HALF_SE, activation=activation)
    flat0, unravel = ravel_pytree(params)
    kw = {"activation": activation}
    return {
        "hessian": jax.hessian(lambda f: sj.loss_value(obj, unravel(f), batch))(flat0),
        "reduced_h": q.reduced_hessian(obj, params, batch, **kw),
        "reduced_g": q.reduced_realisation_metric(params, batch.inputs, **kw),
        "metric": q.realisation_metric_dense(params, batch.inputs, **kw),
        "jac": jax.jacfwd(lambda f: q.realisation_map(unravel(f), batch.inputs, **kw))(flat0),
        "basis": q.horizontal_basis(params, **kw),
    }


# ------------------------------------------------------------------------------- orbit moves


def test_orbit_moves_preserve_the_function():
    x = jax.random.normal(jax.random.PRNGKey(5), (5, 3), jnp.float64)
    for act in ("relu", "quadratic", "tanh"):
        params, _ = shallow_problem(act, K=2)
        f0 = outputs(params, x, act)
        moves = [q.permute_units(params, jnp.array([1, 2, 0]))]
        if act != "tanh":
            moves.append(q.rescale_units(params, jnp.array([0.1, 2.0, 10.0]), activation=act))
        if act != "relu":
            moves.append(q.flip_units(params, jnp.array([True, False, True]), activation=act))
        for moved in moves:
            np.testing.assert_allclose(outputs(moved, x, act), f0, rtol=1e-12, atol=1e-14)
            assert np.max(np.abs(flat(moved) - flat(params))) > 1e-2
    # Rescaling pushes the generators forward: v_i(D_c θ) = D_c v_i(θ).
    params, _ = shallow_problem("quadratic", K=2)
    c = jnp.array([0.5, 2.0, 4.0])
    gens = q.vertical_generators(params, activation="quadratic")
    pushed = jax.vmap(lambda t: q.rescale_units(t, c, activation="quadratic"))(gens)
    moved = q.vertical_generators(
        q.rescale_units(params, c, activation="quadratic"), activation="quadratic"
    )
    np.testing.assert_allclose(flat(pushed), flat(moved), rtol=1e-14)
    # Conserved quantities permute with the units.
    perm = jnp.array([2, 0, 1])
    np.testing.assert_allclose(
        q.conserved_quantities(q.permute_units(params, perm), activation="quadratic"),
        q.conserved_quantities(params, activation="quadratic")[perm],
    )
    with pytest.raises(ValueError, match="positive"):
        q.rescale_units(params, jnp.array([1.0, -1.0, 1.0]), activation="quadratic")
    with pytest.raises(ValueError, match="not a permutation"):
        q.permute_units(params, jnp.array([0, 0, 1]))
    with pytest.raises(ValueError, match="sign-flip"):
        q.flip_units(params, jnp.array([True, False, False]), activation="relu")


# ------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    params, batch = shallow_problem("relu")
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
    obj = q.shallow_objective(HALF_SE, activation="relu")
    with pytest.raises(ValueError, match="damping"):
        q.quotient_spectra(obj, params, batch, activation="relu", damping=-1.0)


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
