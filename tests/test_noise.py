"""SGD-noise covariance C, E_p[h_p²], commutators, alignment and power-law fits against dense
float64 references."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import Dense, flat, mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import noise

LAYER = "params/Dense_0"


@functools.cache
def _problem():
    return mlp_problem("tanh", "cross_entropy")  # n = 7, P = 43


@functools.cache
def _ref():
    return Dense(_problem())


def _layer_indices():
    """Flat indices of LAYER in the ravel_pytree ordering of the full params."""
    params = _problem().params
    paths = sj.leaf_paths(params)
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chosen = sj.select(params, LAYER)
    return np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i, path in enumerate(paths) if path in chosen]
    )


def prob_n():
    return _problem().n


def _opb():
    prob = _problem()
    return prob.objective, prob.params, prob.batch


def _run(fn, *args, **kwargs):
    """``fn(objective, params, batch, *args, **kwargs)`` on the test problem, under jit."""
    o, p, b = _opb()
    return jax.jit(lambda p, b, args: fn(o, p, b, *args, **kwargs))(p, b, args)


def _stack(vectors_np, template):
    _, unravel = ravel_pytree(template)
    return jax.vmap(unravel)(jnp.asarray(vectors_np))


def _top_eigh(mat, k):
    vals, vecs = np.linalg.eigh(mat)
    return vals[::-1][:k], vecs[:, ::-1][:, :k].T


# ------------------------------------------------------------------------------------- C


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_covariance_diagonal_trace_gram_dense(chunk_size):
    ref = _ref()
    kw = dict(chunk_size=chunk_size)
    diag = flat(_run(noise.gradient_covariance_diagonal, **kw))
    assert rel_err(diag, np.diag(ref.C)) < 1e-10
    assert np.all(diag >= 0)
    assert abs(_run(noise.gradient_covariance_trace, **kw) - np.trace(ref.C)) < 1e-10 * abs(
        np.trace(ref.C)
    )
    g_hat = ref.g - ref.gbar
    gram = _run(noise.gradient_covariance_gram, **kw)
    assert rel_err(gram, g_hat @ g_hat.T / prob_n()) < 1e-10
    dense = np.asarray(_run(noise.gradient_covariance_dense, **kw))
    assert rel_err(dense, ref.C) < 1e-10
    fro = _run(noise.gradient_covariance_frobenius_squared, **kw)
    assert abs(fro - np.sum(ref.C**2)) < 1e-10 * np.sum(ref.C**2)
    # C ⪰ 0 with rank ≤ n − 1.
    eig = np.linalg.eigvalsh(dense)
    assert eig.min() > -1e-12 * eig.max()
    assert np.sum(eig > 1e-10 * eig.max()) <= prob_n() - 1


@pytest.mark.parametrize("method", ["gram", "lanczos"])
def test_covariance_top_k_matches_eigh(method):
    ref = _ref()
    k = 3
    eig = _run(
        noise.gradient_covariance_top_k,
        k=k,
        method=method,
        num_iters=43,
        chunk_size=3,
        key=jax.random.PRNGKey(1),
    )
    want_vals, want_vecs = _top_eigh(ref.C, k)
    assert rel_err(eig.values, want_vals) < 1e-8
    got = np.stack(
        [flat(jax.tree_util.tree_map(lambda a, i=i: a[i], eig.vectors)) for i in range(k)]
    )
    np.testing.assert_allclose(np.abs(np.sum(got * want_vecs, axis=1)), 1.0, atol=1e-8)
    assert np.all(np.asarray(eig.residuals) < 1e-8 * want_vals[0])


def test_covariance_gram_route_beyond_rank_gives_zero_vectors():
    n = prob_n()
    eig = _run(noise.gradient_covariance_top_k, k=n)
    vals = np.asarray(eig.values)
    assert abs(vals[-1]) < 1e-12 * vals[0]  # rank C ≤ n − 1
    last = flat(jax.tree_util.tree_map(lambda a: a[-1], eig.vectors))
    assert np.all(last == 0)
    first = flat(jax.tree_util.tree_map(lambda a: a[0], eig.vectors))
    assert abs(np.linalg.norm(first) - 1) < 1e-10


def test_covariance_per_layer_is_the_block():
    ref = _ref()
    idx = _layer_indices()
    block = ref.C[np.ix_(idx, idx)]
    diag = flat(_run(noise.gradient_covariance_diagonal, chunk_size=2, subset=LAYER))
    assert rel_err(diag, np.diag(block)) < 1e-10
    eig = _run(noise.gradient_covariance_top_k, k=2, chunk_size=2, subset=LAYER)
    assert rel_err(eig.values, _top_eigh(block, 2)[0]) < 1e-8
    dense = _run(noise.gradient_covariance_dense, subset=LAYER)
    assert rel_err(dense, block) < 1e-10


def test_quadratic_forms_along_vectors_and_eigenpairs():
    o, p, b = _opb()
    ref = _ref()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4, ref.flat.size))
    stacked = _stack(vecs, p)
    qc = _run(noise.gradient_covariance_quadratic_forms, stacked, chunk_size=3)
    np.testing.assert_allclose(qc, np.einsum("ki,ij,kj->k", vecs, ref.C, vecs), rtol=1e-10)
    qh = _run(noise.hessian_second_moment_quadratic_forms, stacked, chunk_size=3)
    np.testing.assert_allclose(qh, np.einsum("ki,ij,kj->k", vecs, ref.H2, vecs), rtol=1e-10)
    # Given an Eigen of H: v_iᵀ C v_i along the Hessian eigenvectors.
    eig_h = sj.lanczos_top_k(sj.hessian(o, p, b), p, k=3, num_iters=43)
    _, h_vecs = _top_eigh(ref.H, 3)
    np.testing.assert_allclose(
        _run(noise.gradient_covariance_quadratic_forms, eig_h),
        np.einsum("ki,ij,kj->k", h_vecs, ref.C, h_vecs),
        rtol=1e-8,
    )


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_trace_hc(chunk_size):
    ref = _ref()
    got = _run(noise.hessian_covariance_trace, chunk_size=chunk_size)
    want = np.trace(ref.H @ ref.C)
    assert abs(got - want) < 1e-10 * abs(want)
    idx = np.ix_(_layer_indices(), _layer_indices())
    got = _run(noise.hessian_covariance_trace, chunk_size=chunk_size, subset=LAYER)
    want = np.trace(ref.H[idx] @ ref.C[idx])
    assert abs(got - want) < 1e-10 * abs(want)


def test_minibatch_noise_scale_matches_enumeration():
    """Cov(g_B) over all mini-batches equals s · C (with and without replacement)."""
    ref = _ref()
    g = ref.g[:5]
    n, bsz = 5, 2
    c = np.cov(g.T, bias=True)
    with_repl = [g[list(t)].mean(0) for t in itertools.product(range(n), repeat=bsz)]
    without = [g[list(t)].mean(0) for t in itertools.combinations(range(n), bsz)]
    for means, repl in ((with_repl, True), (without, False)):
        cov = np.cov(np.stack(means).T, bias=True)
        s = noise.minibatch_noise_scale(n, bsz, replacement=repl)
        np.testing.assert_allclose(cov, s * c, atol=1e-14)
    assert noise.minibatch_noise_scale(5, 5, replacement=False) == 0.0
    # The operator is s · C.
    o, p, b = _opb()
    v, v_np = ref.random_vector(3)
    for repl in (True, False):
        mv = noise.minibatch_noise_covariance(o, p, b, batch_size=3, replacement=repl)
        s = noise.minibatch_noise_scale(prob_n(), 3, replacement=repl)
        np.testing.assert_allclose(flat(mv(v)), s * ref.C @ v_np, rtol=1e-10)


# ------------------------------------------------------------------------------ E_p[h_p²]


@pytest.mark.parametrize("chunk_size,basis_chunk_size", [(None, None), (3, 7)])
def test_second_moment_diagonal_trace_dense_top_k(chunk_size, basis_chunk_size):
    ref = _ref()
    kw = dict(chunk_size=chunk_size, basis_chunk_size=basis_chunk_size)
    diag = flat(_run(noise.hessian_second_moment_diagonal, **kw))
    assert rel_err(diag, np.diag(ref.H2)) < 1e-10
    tr = _run(noise.hessian_second_moment_trace, **kw)
    want = np.mean([np.sum(hp**2) for hp in ref.h])  # (1/n) Σ_p ‖h_p‖_F²
    assert abs(tr - want) < 1e-10 * want
    dense = _run(noise.hessian_second_moment_dense, **kw)
    assert rel_err(dense, ref.H2) < 1e-10
    eig = _run(noise.hessian_second_moment_top_k, k=3, num_iters=43, chunk_size=chunk_size)
    assert rel_err(eig.values, _top_eigh(ref.H2, 3)[0]) < 1e-8


def test_second_moment_per_layer_both_conventions():
    p = _problem().params
    ref = _ref()
    idx = _layer_indices()
    sq_of_block = np.mean([hp[np.ix_(idx, idx)] @ hp[np.ix_(idx, idx)] for hp in ref.h], axis=0)
    block_of_sq = ref.H2[np.ix_(idx, idx)]
    # The two conventions differ.
    assert rel_err(sq_of_block, block_of_sq) > 1e-3
    # E_p[(h_p)_SS²] ⪯ (E_p[h_p²])_SS.
    assert np.linalg.eigvalsh(block_of_sq - sq_of_block).min() > -1e-12
    for restricted, want in ((True, sq_of_block), (False, block_of_sq)):
        kw = dict(subset=LAYER, restricted=restricted, chunk_size=3)
        diag = flat(_run(noise.hessian_second_moment_diagonal, basis_chunk_size=5, **kw))
        assert rel_err(diag, np.diag(want)) < 1e-10, restricted
        dense = _run(noise.hessian_second_moment_dense, **kw)
        assert rel_err(dense, want) < 1e-10, restricted
        vecs = np.random.default_rng(1).standard_normal((2, idx.size))
        sub = sj.select(p, LAYER)
        q = _run(noise.hessian_second_moment_quadratic_forms, _stack(vecs, sub), **kw)
        np.testing.assert_allclose(q, np.einsum("ki,ij,kj->k", vecs, want, vecs), rtol=1e-10)


def test_second_moment_dominates_hessian_square():
    """E_p[h_p²] − H² = E_p[(h_p − H)²] ⪰ 0, so also diag(E_p[h_p²]) ≥ diag(H²) ≥ 0."""
    o, p, b = _opb()
    h2 = np.asarray(_run(noise.hessian_second_moment_dense))
    h = np.asarray(sj.dense(sj.hessian(o, p, b), p))
    gap = np.linalg.eigvalsh(h2 - h @ h)
    assert gap.min() > -1e-12 * np.abs(gap).max()
    diag = flat(_run(noise.hessian_second_moment_diagonal))
    assert np.all(diag >= np.diag(h @ h) - 1e-14)
    assert np.all(diag >= np.diag(h) ** 2 - 1e-14)


def test_second_moment_hutchinson_diagonal_within_5_se():
    ref = _ref()
    exact = np.diag(ref.H2)
    ses = []
    for m, key in ((100, 0), (400, 1)):
        est = _run(
            noise.hessian_second_moment_diagonal_hutchinson,
            key=jax.random.PRNGKey(key),
            num_probes=m,
            probe_chunk=64,
            chunk_size=3,
        )
        assert est.num_probes == m
        value, se = flat(est.value), flat(est.stderr)
        assert np.all(np.abs(value - exact) <= 5 * se + 1e-13 * exact.max())
        ses.append(se)
    ratio = np.sum(ses[1]) / np.sum(ses[0])
    assert 0.35 < ratio < 0.65  # SE ∝ 1/√m: 1/2 for 4× the probes
    # The SE matches the exact one: the i-th sample is zᵀ M_i z with
    # M_i = (1/n) Σ_p h_p[i] h_p[i]ᵀ, and Var(zᵀMz) = 2(‖M‖_F² − Σ_j M_jj²) for Rademacher z.
    n = prob_n()
    gram = np.einsum("pij,qij->ipq", ref.h, ref.h) / n  # ‖M_i‖_F² = Σ_pq (h_p[i]·h_q[i])²/n²
    fro_sq = np.sum(gram**2, axis=(1, 2))
    diag_sq = np.sum(np.mean(ref.h**2, axis=0) ** 2, axis=1)
    se_exact = np.sqrt(2 * (fro_sq - diag_sq) / 400)
    np.testing.assert_allclose(np.median(ses[1] / se_exact), 1.0, atol=0.15)
    # Per layer, both conventions.
    idx = _layer_indices()
    for restricted, want in (
        (True, np.mean([np.sum(hp[np.ix_(idx, idx)] ** 2, 1) for hp in ref.h], axis=0)),
        (False, exact[idx]),
    ):
        est = _run(
            noise.hessian_second_moment_diagonal_hutchinson,
            key=jax.random.PRNGKey(2),
            num_probes=200,
            subset=LAYER,
            restricted=restricted,
        )
        value, se = flat(est.value), flat(est.stderr)
        assert np.all(np.abs(value - want) <= 5 * se + 1e-13 * want.max()), restricted


# ---------------------------------------------------------------------------- commutation


def test_commutator_exact_matches_dense():
    ref = _ref()
    c, h = ref.C, ref.H
    want = np.linalg.norm(c @ h - h @ c) / np.linalg.norm(c @ h)
    assert abs(noise.relative_commutator(c, h) - want) < 1e-12 * want
    out = _run(
        noise.noise_curvature_commutation, key=jax.random.PRNGKey(0), num_rotations=4, chunk_size=3
    )
    assert abs(out.relative - want) < 1e-8 * want
    base = out.baseline
    assert base.values.shape == (4,)
    np.testing.assert_allclose(base.mean, np.mean(base.values), rtol=1e-12)
    np.testing.assert_allclose(base.std, np.std(base.values, ddof=1), rtol=1e-12)
    assert np.all(base.stderr == 0)
    # Per layer: the commutator of the blocks.
    idx = np.ix_(_layer_indices(), _layer_indices())
    out = _run(noise.noise_curvature_commutation, key=jax.random.PRNGKey(0), subset=LAYER)
    assert abs(out.relative - noise.relative_commutator(c[idx], h[idx])) < 1e-8 * want


def test_rotation_baseline_properties():
    h = _ref().H
    q = np.asarray(noise.haar_orthogonal(jax.random.PRNGKey(3), h.shape[0], dtype=jnp.float64))
    np.testing.assert_allclose(q.T @ q, np.eye(h.shape[0]), atol=1e-12)
    np.testing.assert_allclose(
        np.linalg.eigvalsh(q @ h @ q.T), np.linalg.eigvalsh(h), atol=1e-12 * np.abs(h).max()
    )
    # A function of H commutes with H exactly; a random rotation of H does not.
    c = h @ h
    assert noise.relative_commutator(c, h) < 1e-12
    base = noise.rotation_baseline(c, h, key=jax.random.PRNGKey(4), num_rotations=3)
    assert float(base.mean) > 0.1
    assert np.isfinite(base.std) and float(base.std) < float(base.mean)


def test_commutator_estimate_within_5_se():
    ref = _ref()
    exact = np.linalg.norm(ref.C @ ref.H - ref.H @ ref.C) / np.linalg.norm(ref.C @ ref.H)
    out = _run(
        noise.noise_curvature_commutation_estimate,
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
    zero = noise.relative_commutator_estimate(
        mv_c, mv_h, jnp.zeros(h.shape[0]), key=jax.random.PRNGKey(6), num_probes=8
    )
    assert float(zero.value) < 1e-7 and float(zero.stderr) < 1e-7


def test_commutator_estimate_standard_error_is_calibrated():
    """The delta-method SE matches the spread of independent estimates."""
    ref = _ref()
    c, h = jnp.asarray(ref.C), jnp.asarray(ref.H)
    exact = noise.relative_commutator(c, h)

    @jax.jit
    def estimates(keys):
        def one(key):
            est = noise.relative_commutator_estimate(
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
    ref = _ref()
    want = np.trace(ref.H @ ref.C) / (np.linalg.norm(ref.H) * np.linalg.norm(ref.C))
    assert abs(noise.alignment(ref.H, ref.C) - want) < 1e-12
    got = _run(noise.noise_curvature_alignment, chunk_size=3)
    assert abs(got - want) < 1e-10 * abs(want)
    est = _run(noise.noise_curvature_alignment, key=jax.random.PRNGKey(7), num_probes=64)
    assert 0 < est.stderr and abs(est.value - want) < 5 * est.stderr


# ------------------------------------------------------------------------------ power laws


def _synthetic(key, size=100, gamma=1.5, sigma=0.3):
    kx, ke = jax.random.split(key)
    x = jnp.exp(jax.random.uniform(kx, (size,), jnp.float64, jnp.log(1e-3), 0.0))
    y = 2.0 * x**gamma * jnp.exp(sigma * jax.random.normal(ke, (size,), jnp.float64))
    return x, y


def test_power_law_recovers_gamma_with_calibrated_interval():
    gamma = 1.5
    fit = jax.jit(functools.partial(noise.fit_power_law, num_resamples=400, level=0.95))

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
    fit = noise.fit_power_law(x, y, key=jax.random.PRNGKey(0), num_resamples=50)
    assert abs(fit.gamma - 1.7) < 1e-10 and abs(fit.intercept - np.log(3.0)) < 1e-10
    assert abs(fit.r2 - 1) < 1e-12
    assert abs(fit.ci_low - 1.7) < 1e-10 and abs(fit.ci_high - 1.7) < 1e-10
    # Non-positive or non-finite entries are excluded and counted (the last pair in both).
    bad_x = jnp.asarray([0.0, -1.0, np.nan, 2.0, -1.0])
    bad_y = jnp.asarray([1.0, 1.0, 1.0, 0.0, -3.0])
    xx, yy = jnp.concatenate([x, bad_x]), jnp.concatenate([y, bad_y])
    fit2 = noise.fit_power_law(xx, yy, key=jax.random.PRNGKey(0), num_resamples=50)
    assert int(fit2.num_used) == 30 and int(fit2.num_excluded) == 5
    assert int(fit2.num_excluded_x) == 4 and int(fit2.num_excluded_y) == 2
    assert abs(fit2.gamma - 1.7) < 1e-10 and abs(fit2.ci_high - 1.7) < 1e-10


def test_diagonal_power_law_wrappers_match_dense():
    ref = _ref()
    key = jax.random.PRNGKey(8)
    kw = dict(key=key, num_resamples=50)
    for against, y in (("covariance", np.diag(ref.C)), ("second_moment", np.diag(ref.H2))):
        got = _run(noise.diagonal_power_law, against=against, chunk_size=3, **kw)
        want = noise.fit_power_law(jnp.asarray(np.diag(ref.H)), jnp.asarray(y), **kw)
        assert abs(got.gamma - want.gamma) < 1e-8 * abs(want.gamma), against
        assert int(got.num_excluded) == int(want.num_excluded), against
        assert int(got.num_excluded_x) == int(np.sum(np.diag(ref.H) <= 0)), against
        assert abs(got.ci_low - want.ci_low) < 1e-8 and abs(got.ci_high - want.ci_high) < 1e-8


def test_eigenbasis_power_law_per_layer_matches_dense():
    ref = _ref()
    idx = np.ix_(_layer_indices(), _layer_indices())
    h, c = ref.H[idx], ref.C[idx]
    sq_block = np.mean([hp[idx] @ hp[idx] for hp in ref.h], axis=0)
    vals, vecs = _top_eigh(h, 6)
    kw = dict(key=jax.random.PRNGKey(9), num_resamples=50)
    for against, mat in (("covariance", c), ("second_moment", sq_block)):
        got = _run(
            noise.eigenbasis_power_law,
            num_eigen=6,
            num_iters=25,
            against=against,
            subset=LAYER,
            **kw,
        )
        _, key = jax.random.split(kw["key"])  # the wrapper keeps one half for Lanczos
        want = noise.fit_power_law(
            jnp.asarray(vals),
            jnp.asarray(np.einsum("ki,ij,kj->k", vecs, mat, vecs)),
            key=key,
            num_resamples=50,
        )
        assert abs(got.gamma - want.gamma) < 1e-6 * abs(want.gamma), against
        assert int(got.num_used) == int(want.num_used) == int(np.sum(vals > 0))


# ------------------------------------------------------------------------- dtypes, errors


def test_float32_and_jit():
    prob = _problem()
    o = prob.objective
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), prob.params)
    b = sj.Batch(prob.batch.inputs.astype(jnp.float32), prob.batch.targets)
    ref = _ref()

    @jax.jit
    def run(p, b):
        return (
            noise.gradient_covariance_diagonal(o, p, b, chunk_size=3),
            noise.gradient_covariance_top_k(o, p, b, k=2, chunk_size=3).values,
            noise.hessian_second_moment_diagonal(o, p, b, chunk_size=3, basis_chunk_size=8),
            noise.hessian_second_moment_diagonal_hutchinson(
                o, p, b, key=jax.random.PRNGKey(0), num_probes=4
            ).value,
            noise.relative_commutator_estimate(
                sj.gradient_covariance(o, p, b),
                sj.hessian(o, p, b),
                p,
                key=jax.random.PRNGKey(0),
                num_probes=4,
            ).value,
            noise.hessian_covariance_trace(o, p, b, chunk_size=3),
        )

    c_diag, c_top, h2_diag, h2_hutch, comm, trace_hc = run(p, b)
    for tree in (c_diag, h2_diag, h2_hutch):
        assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(tree))
    assert c_top.dtype == comm.dtype == trace_hc.dtype == jnp.float32
    assert rel_err(flat(c_diag), np.diag(ref.C)) < 1e-4
    assert rel_err(flat(h2_diag), np.diag(ref.H2)) < 1e-4
    x = jnp.asarray(np.geomspace(1e-2, 1.0, 10), jnp.float32)
    fit = jax.jit(lambda x, y, k: noise.fit_power_law(x, y, key=k, num_resamples=20))(
        x, 2 * x**1.3, jax.random.PRNGKey(0)
    )
    assert fit.gamma.dtype == jnp.float32 and abs(fit.gamma - 1.3) < 1e-4


def test_bad_inputs():
    o, p, b = _opb()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        noise.gradient_covariance_top_k(o, p, b, k=44)
    with pytest.raises(ValueError, match="exceeds the number of examples"):
        noise.gradient_covariance_top_k(o, p, b, k=8)
    with pytest.raises(ValueError, match="method"):
        noise.gradient_covariance_top_k(o, p, b, k=1, method="svd")
    with pytest.raises(ValueError, match="k must be a positive int"):
        noise.gradient_covariance_top_k(o, p, b, k=0)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        noise.hessian_second_moment_top_k(o, p, b, k=44)
    with pytest.raises(ValueError, match="without replacement"):
        noise.minibatch_noise_covariance(o, p, b, batch_size=8, replacement=False)
    with pytest.raises(ValueError, match="batch_size"):
        noise.minibatch_noise_scale(7, 0, replacement=True)
    with pytest.raises(ValueError, match="basis_chunk_size"):
        noise.hessian_second_moment_diagonal(o, p, b, basis_chunk_size=0)
    with pytest.raises(TypeError, match="restricted"):
        noise.hessian_second_moment_diagonal(o, p, b, restricted="yes")
    with pytest.raises(ValueError, match="num_probes"):
        noise.hessian_second_moment_diagonal_hutchinson(o, p, b, key=key, num_probes=0)
    with pytest.raises(ValueError, match="matches no parameter"):
        noise.gradient_covariance_diagonal(o, p, b, subset="params/nope")
    with pytest.raises(TypeError, match="chunk_size"):
        noise.gradient_covariance_gram(o, p, b, chunk_size=2.5)
    with pytest.raises(ValueError, match="tree structure"):
        noise.gradient_covariance_quadratic_forms(o, p, b, {"w": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="shape"):
        bad = jax.tree_util.tree_map(lambda a: jnp.zeros((2, *a.shape, 1)), p)
        noise.hessian_second_moment_quadratic_forms(o, p, b, bad)
    with pytest.raises(ValueError, match="square"):
        noise.relative_commutator(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="one shape"):
        noise.alignment(jnp.eye(2), jnp.eye(3))
    with pytest.raises(ValueError, match="both key and num_probes"):
        noise.noise_curvature_alignment(o, p, b, key=key)
    with pytest.raises(ValueError, match="against"):
        noise.diagonal_power_law(o, p, b, key=key, against="fisher")
    with pytest.raises(ValueError, match="exactly one"):
        noise.eigenbasis_power_law(o, p, b, key=key)
    x = jnp.linspace(1.0, 2.0, 5)
    with pytest.raises(ValueError, match="1-D"):
        noise.fit_power_law(x, x[:4], key=key)
    with pytest.raises(ValueError, match="level"):
        noise.fit_power_law(x, x, key=key, level=1.0)
    with pytest.raises(ValueError, match="num_resamples"):
        noise.fit_power_law(x, x, key=key, num_resamples=1)
    with pytest.raises(TypeError, match="floating"):
        noise.fit_power_law(jnp.arange(5), jnp.arange(5), key=key)
    with pytest.raises(ValueError, match="num_rotations"):
        noise.rotation_baseline(jnp.eye(2), jnp.eye(2), key=key, num_rotations=0)
