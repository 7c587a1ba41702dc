"""Commutators, their rotation baseline and alignment (sharpness_jax.comparisons) against
dense float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noise_problem import (
    LAYER,
    layer_indices,
    operands,
    problem,
    reference,
    run,
)

import sharpness_jax as sj
from sharpness_jax import comparisons

# ---------------------------------------------------------------------------- commutation


def test_commutator_exact_matches_dense():
    ref = reference()
    c, h = ref.C, ref.H
    want = np.linalg.norm(c @ h - h @ c) / np.linalg.norm(c @ h)
    assert abs(comparisons.relative_commutator(c, h) - want) < 1e-12 * want
    out = run(
        comparisons.noise_curvature_commutation,
        key=jax.random.PRNGKey(0),
        num_rotations=4,
        chunk_size=3,
    )
    assert abs(out.relative - want) < 1e-8 * want
    base = out.baseline
    assert base.values.shape == (4,)
    np.testing.assert_allclose(base.mean, np.mean(base.values), rtol=1e-12)
    np.testing.assert_allclose(base.std, np.std(base.values, ddof=1), rtol=1e-12)
    assert np.all(base.stderr == 0)
    # Per layer: the commutator of the blocks.
    idx = np.ix_(layer_indices(), layer_indices())
    out = run(comparisons.noise_curvature_commutation, key=jax.random.PRNGKey(0), subset=LAYER)
    assert abs(out.relative - comparisons.relative_commutator(c[idx], h[idx])) < 1e-8 * want


def test_symmetric_products_agree():
    """For symmetric C and H, BA = (AB)ᵀ: the one-product route gives the same numbers."""
    ref = reference()
    c, h = jnp.asarray(ref.C), jnp.asarray((ref.H + ref.H.T) / 2)
    for a, b in ((c, h), (c, c @ c)):
        want = comparisons.relative_commutator(a, b)
        got = comparisons.relative_commutator(a, b, symmetric=True)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-14)
    key = jax.random.PRNGKey(5)
    want = comparisons.rotation_baseline(c, h, key=key, num_rotations=3)
    got = comparisons.rotation_baseline(c, h, key=key, num_rotations=3, symmetric=True)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-10)


def test_rotation_baseline_properties():
    h = reference().H
    q = np.asarray(
        comparisons.haar_orthogonal(jax.random.PRNGKey(3), h.shape[0], dtype=jnp.float64)
    )
    np.testing.assert_allclose(q.T @ q, np.eye(h.shape[0]), atol=1e-12)
    np.testing.assert_allclose(
        np.linalg.eigvalsh(q @ h @ q.T), np.linalg.eigvalsh(h), atol=1e-12 * np.abs(h).max()
    )
    # A function of H commutes with H exactly; a random rotation of H does not.
    c = h @ h
    assert comparisons.relative_commutator(c, h) < 1e-12
    base = comparisons.rotation_baseline(c, h, key=jax.random.PRNGKey(4), num_rotations=3)
    assert float(base.mean) > 0.1
    assert np.isfinite(base.std) and float(base.std) < float(base.mean)


def test_commutator_estimate_within_5_se():
    ref = reference()
    exact = np.linalg.norm(ref.C @ ref.H - ref.H @ ref.C) / np.linalg.norm(ref.C @ ref.H)
    out = run(
        comparisons.noise_curvature_commutation_estimate,
        key=jax.random.PRNGKey(5),
        num_probes=200,
        num_rotations=2,
        chunk_size=4,
    )
    est = out.relative
    assert est.num_probes == 200
    assert 0 < est.stderr < 0.2 * exact
    assert abs(est.value - exact) < 5 * est.stderr
    assert out.baseline.values.shape == (2,)
    assert np.all(np.asarray(out.baseline.stderr) > 0)
    assert float(out.baseline.mean) > exact  # C and H are closer to commuting than chance
    # Generic matvecs: a commuting pair is estimated at exactly 0.
    h = jnp.asarray(ref.H)
    mv_h = lambda v: h @ v
    mv_c = lambda v: h @ (h @ v)
    zero = comparisons.relative_commutator_estimate(
        mv_c, mv_h, jnp.zeros(h.shape[0]), key=jax.random.PRNGKey(6), num_probes=8
    )
    assert float(zero.value) < 1e-7 and float(zero.stderr) < 1e-7


def test_commutator_estimate_standard_error_is_calibrated():
    """The delta-method SE matches the spread of independent estimates."""
    ref = reference()
    c, h = jnp.asarray(ref.C), jnp.asarray(ref.H)
    exact = comparisons.relative_commutator(c, h)

    @jax.jit
    def estimates(keys):
        def one(key):
            est = comparisons.relative_commutator_estimate(
                lambda v: c @ v, lambda v: h @ v, jnp.zeros(c.shape[0]), key=key, num_probes=50
            )
            return est.value, est.stderr

        return jax.vmap(one)(keys)

    values, ses = estimates(jax.random.split(jax.random.PRNGKey(11), 40))
    spread = np.std(np.asarray(values), ddof=1)
    assert 0.7 < np.mean(ses) / spread < 1.4
    assert abs(np.mean(values) - exact) < 4 * spread / np.sqrt(40) + 0.02 * exact


# ------------------------------------------------------------------------------ alignment


def test_alignment_exact_and_stochastic():
    ref = reference()
    want = np.trace(ref.H @ ref.C) / (np.linalg.norm(ref.H) * np.linalg.norm(ref.C))
    assert abs(comparisons.alignment(ref.H, ref.C) - want) < 1e-12
    got = run(comparisons.noise_curvature_alignment, chunk_size=3)
    assert abs(got - want) < 1e-10 * abs(want)
    est = run(comparisons.noise_curvature_alignment, key=jax.random.PRNGKey(7), num_probes=64)
    assert 0 < est.stderr and abs(est.value - want) < 5 * est.stderr


# ------------------------------------------------------------------------- dtypes, errors


def test_float32_and_jit():
    prob = problem()
    o = prob.objective
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), prob.params)
    b = sj.Batch(prob.batch.inputs.astype(jnp.float32), prob.batch.targets)

    @jax.jit
    def run(p, b):
        return comparisons.relative_commutator_estimate(
            sj.gradient_covariance(o, p, b),
            sj.hessian(o, p, b),
            p,
            key=jax.random.PRNGKey(0),
            num_probes=4,
        ).value

    assert run(p, b).dtype == jnp.float32


def test_bad_inputs():
    o, p, b = operands()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="square"):
        comparisons.relative_commutator(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="one shape"):
        comparisons.alignment(jnp.eye(2), jnp.eye(3))
    with pytest.raises(ValueError, match="both key and num_probes"):
        comparisons.noise_curvature_alignment(o, p, b, key=key)
    with pytest.raises(ValueError, match="num_rotations"):
        comparisons.rotation_baseline(jnp.eye(2), jnp.eye(2), key=key, num_rotations=0)
