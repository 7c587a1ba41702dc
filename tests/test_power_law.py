"""Power-law fits (sharpness_jax.power_law): synthetic data with a known exponent, and the
noise–curvature wrappers against fits of dense float64 references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noise_problem import (
    LAYER,
    layer_indices,
    operands,
    reference,
    run,
    top_eigh,
)

from sharpness_jax import power_law


def _synthetic(key, size=100, gamma=1.5, sigma=0.3):
    kx, ke = jax.random.split(key)
    x = jnp.exp(jax.random.uniform(kx, (size,), jnp.float64, jnp.log(1e-3), 0.0))
    y = 2.0 * x**gamma * jnp.exp(sigma * jax.random.normal(ke, (size,), jnp.float64))
    return x, y


def test_power_law_recovers_gamma_with_calibrated_interval():
    gamma = 1.5
    fit = jax.jit(functools.partial(power_law.fit_power_law, num_resamples=400, level=0.95))

    def one(key):
        kd, kb = jax.random.split(key)
        x, y = _synthetic(kd, gamma=gamma)
        return fit(x, y, key=kb), x

    fits, xs = jax.vmap(one)(jax.random.split(jax.random.PRNGKey(0), 40))
    covered = np.sum((fits.ci_low <= gamma) & (gamma <= fits.ci_high))
    assert 34 <= covered <= 40, covered  # nominal 38 of 40
    # The interval width matches the OLS standard error of the slope.
    lx = np.log(np.asarray(xs))
    se = 0.3 / np.sqrt(np.sum((lx - lx.mean(1, keepdims=True)) ** 2, axis=1))
    ratio = np.asarray(fits.ci_high - fits.ci_low) / (2 * 1.96 * se)
    assert 0.75 < np.median(ratio) < 1.25
    assert np.all(np.abs(fits.gamma - gamma) < 6 * se)
    assert np.all(fits.num_used == 100) and np.all(fits.num_excluded == 0)


def test_power_law_noise_free_and_exclusions():
    x = jnp.asarray(np.geomspace(1e-3, 10.0, 30))
    y = 3.0 * x**1.7
    fit = power_law.fit_power_law(x, y, key=jax.random.PRNGKey(0), num_resamples=50)
    assert abs(fit.gamma - 1.7) < 1e-10 and abs(fit.intercept - np.log(3.0)) < 1e-10
    assert abs(fit.r2 - 1) < 1e-12
    assert abs(fit.ci_low - 1.7) < 1e-10 and abs(fit.ci_high - 1.7) < 1e-10
    # Non-positive or non-finite entries are excluded and counted (the last pair in both).
    bad_x = jnp.asarray([0.0, -1.0, np.nan, 2.0, -1.0])
    bad_y = jnp.asarray([1.0, 1.0, 1.0, 0.0, -3.0])
    xx, yy = jnp.concatenate([x, bad_x]), jnp.concatenate([y, bad_y])
    fit2 = power_law.fit_power_law(xx, yy, key=jax.random.PRNGKey(0), num_resamples=50)
    assert int(fit2.num_used) == 30 and int(fit2.num_excluded) == 5
    assert int(fit2.num_excluded_x) == 4 and int(fit2.num_excluded_y) == 2
    assert abs(fit2.gamma - 1.7) < 1e-10 and abs(fit2.ci_high - 1.7) < 1e-10


def test_diagonal_power_law_wrappers_match_dense():
    ref = reference()
    key = jax.random.PRNGKey(8)
    kw = dict(key=key, num_resamples=50)
    for against, y in (("covariance", np.diag(ref.C)), ("second_moment", np.diag(ref.H2))):
        got = run(power_law.diagonal_power_law, against=against, chunk_size=3, **kw)
        want = power_law.fit_power_law(jnp.asarray(np.diag(ref.H)), jnp.asarray(y), **kw)
        assert abs(got.gamma - want.gamma) < 1e-8 * abs(want.gamma), against
        assert int(got.num_excluded) == int(want.num_excluded), against
        assert int(got.num_excluded_x) == int(np.sum(np.diag(ref.H) <= 0)), against
        assert abs(got.ci_low - want.ci_low) < 1e-8 and abs(got.ci_high - want.ci_high) < 1e-8


def test_eigenbasis_power_law_per_layer_matches_dense():
    ref = reference()
    idx = np.ix_(layer_indices(), layer_indices())
    h, c = ref.H[idx], ref.C[idx]
    sq_block = np.mean([hp[idx] @ hp[idx] for hp in ref.h], axis=0)
    vals, vecs = top_eigh(h, 6)
    kw = dict(key=jax.random.PRNGKey(9), num_resamples=50)
    for against, mat in (("covariance", c), ("second_moment", sq_block)):
        got = run(
            power_law.eigenbasis_power_law,
            num_eigen=6,
            num_iters=25,
            against=against,
            subset=LAYER,
            **kw,
        )
        _, key = jax.random.split(kw["key"])  # the wrapper keeps one half for Lanczos
        want = power_law.fit_power_law(
            jnp.asarray(vals),
            jnp.asarray(np.einsum("ki,ij,kj->k", vecs, mat, vecs)),
            key=key,
            num_resamples=50,
        )
        assert abs(got.gamma - want.gamma) < 1e-6 * abs(want.gamma), against
        assert int(got.num_used) == int(want.num_used) == int(np.sum(vals > 0))


# ------------------------------------------------------------------------- dtypes, errors


def test_float32_and_jit():
    x = jnp.asarray(np.geomspace(1e-2, 1.0, 10), jnp.float32)
    fit = jax.jit(lambda x, y, k: power_law.fit_power_law(x, y, key=k, num_resamples=20))(
        x, 2 * x**1.3, jax.random.PRNGKey(0)
    )
    assert fit.gamma.dtype == jnp.float32 and abs(fit.gamma - 1.3) < 1e-4


def test_bad_inputs():
    o, p, b = operands()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="against"):
        power_law.diagonal_power_law(o, p, b, key=key, against="fisher")
    with pytest.raises(ValueError, match="exactly one"):
        power_law.eigenbasis_power_law(o, p, b, key=key)
    x = jnp.linspace(1.0, 2.0, 5)
    with pytest.raises(ValueError, match="1-D"):
        power_law.fit_power_law(x, x[:4], key=key)
    with pytest.raises(ValueError, match="level"):
        power_law.fit_power_law(x, x, key=key, level=1.0)
    with pytest.raises(ValueError, match="num_resamples"):
        power_law.fit_power_law(x, x, key=key, num_resamples=1)
    with pytest.raises(TypeError, match="floating"):
        power_law.fit_power_law(jnp.arange(5), jnp.arange(5), key=key)
