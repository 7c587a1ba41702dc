"""Reduced and generalised spectra of shallow nets, and the regular set
(sharpness_jax.quotient_spectra)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree
from problems import flat
from shallow_problems import HALF_SE, outputs, shallow_problem

import sharpness_jax as sj
from sharpness_jax import quotient as q
from sharpness_jax import quotient_spectra as qs
from sharpness_jax import symmetries

regularity = jax.jit(qs.regularity, static_argnames="activation")


def flat_(tree):
    return ravel_pytree(tree)[0]


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


# ------------------------------------------------------------------- reduced Hessian spectra


@functools.partial(jax.jit, static_argnames=("activation", "metric"))
def _spectra(params, batch, *, activation, metric):
    obj = qs.shallow_objective(HALF_SE, activation=activation)
    return qs.quotient_spectra(obj, params, batch, activation=activation, metric=metric)


@functools.partial(jax.jit, static_argnames="activation")
def _horizontal_hessian_dense(params, batch, *, activation):
    obj = qs.shallow_objective(HALF_SE, activation=activation)
    return sj.dense(qs.horizontal_hessian(obj, params, batch, activation=activation), params)


def teacher_problem(n, noise, seed=0, K=2):
    """ReLU teacher m=3, d=2 with non-zero biases; targets = teacher + noise."""
    params, batch = shallow_problem("relu", m=3, d=2, K=K, n=n, seed=seed)
    y = outputs(params, batch.inputs, "relu")
    y = y + noise * jax.random.normal(jax.random.PRNGKey(99), y.shape, y.dtype)
    return params, sj.Batch(batch.inputs, y)


def test_interpolating_minimum_false_flat_directions():
    act = "relu"
    params, batch = teacher_problem(n=40, noise=0.0)
    obj = qs.shallow_objective(HALF_SE, activation=act)
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
    obj = qs.shallow_objective(HALF_SE, activation=act)
    scales = jnp.array([0.1, 10.0, 3.0])

    # (a) Any regular point, scale-invariant horizontal space.
    start = jax.tree_util.tree_map(
        lambda a: a + 0.2 * jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params
    )
    assert float(jnp.linalg.norm(flat_(sj.gradient(obj, start, batch)))) > 1e-2
    moved = symmetries.rescale_units(start, scales, activation=act)
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
    moved = symmetries.rescale_units(crit, scales, activation=act)
    c0 = _spectra(crit, batch, activation=act, metric="euclidean")
    c1 = _spectra(moved, batch, activation=act, metric="euclidean")
    ratio = c1.ambient[0] / c0.ambient[0]
    assert ratio > 10 or ratio < 0.1, ratio
    assert _rel_dev(c1.generalised, c0.generalised) < 1e-8
    assert _rel_dev(c1.reduced, c0.reduced) > 1e-2
    assert np.min(c0.reduced) > 0  # a strict minimum on the quotient
    assert np.max(np.abs(c0.generalised - 1.0)) > 1e-3  # H ≠ G: the residual term matters
    # Permutations: everything is invariant.
    perm = symmetries.permute_units(crit, jnp.array([2, 0, 1]))
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
    obj = qs.shallow_objective(HALF_SE, activation=activation)
    flat0, unravel = ravel_pytree(params)
    kw = {"activation": activation}
    return {
        "hessian": jax.hessian(lambda f: sj.loss_value(obj, unravel(f), batch))(flat0),
        "reduced_h": qs.reduced_hessian(obj, params, batch, **kw),
        "reduced_g": qs.reduced_realisation_metric(params, batch.inputs, **kw),
        "metric": q.realisation_metric_dense(params, batch.inputs, **kw),
        "jac": jax.jacfwd(lambda f: q.realisation_map(unravel(f), batch.inputs, **kw))(flat0),
        "basis": q.horizontal_basis(params, **kw),
    }


def test_bad_inputs_raise_clear_errors():
    params, batch = shallow_problem("relu")
    obj = qs.shallow_objective(HALF_SE, activation="relu")
    with pytest.raises(ValueError, match="damping"):
        qs.quotient_spectra(obj, params, batch, activation="relu", damping=-1.0)
    with pytest.raises(ValueError, match="unknown shallow-net activation"):
        qs.shallow_objective(HALF_SE, activation="gelu")
