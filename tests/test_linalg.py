"""Eigen-solvers and trace / diagonal estimators on explicit matrices and on a model Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import Dense, mlp_problem

import sharpness_jax as sj
from sharpness_jax import linalg
from sharpness_jax.linalg import lanczos

P = 30


def _template():
    return {"a": jnp.zeros((4, 5), jnp.float64), "b": jnp.zeros((10,), jnp.float64)}


def _operator(mat):
    template = _template()
    _, unravel = ravel_pytree(template)
    return (lambda v: unravel(mat @ ravel_pytree(v)[0])), template


def _sym(eigs, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return jnp.asarray((q * np.asarray(eigs)) @ q.T)


SPECTRA = {
    "indefinite": np.linspace(-3.0, 5.0, P) ** 3 / 25,
    "repeated": np.array([5.0, 3.0, 1.0] + [0.0] * (P - 3)),  # breakdown after 4 steps
    "low_rank_psd": np.concatenate([np.geomspace(10.0, 0.1, 6), np.zeros(P - 6)]),
    "clustered_top": np.concatenate([[4.0, 4.0 - 1e-3, 2.0], np.linspace(-1, 1, P - 3)]),
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_lanczos_matches_eigh(spectrum):
    eigs = SPECTRA[spectrum]
    mat = _sym(eigs)
    mv, template = _operator(mat)
    want = np.sort(eigs)[::-1][:3]
    result = jax.jit(lambda: sj.lanczos_top_k(mv, template, k=3, num_iters=P))()
    np.testing.assert_allclose(result.values, want, rtol=1e-6, atol=1e-10)
    vecs = jax.vmap(lambda t: ravel_pytree(t)[0])(result.vectors)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(3), atol=1e-8)
    residual = np.linalg.norm(vecs @ np.asarray(mat) - result.values[:, None] * vecs, axis=1)
    assert np.all(residual < 1e-6 * np.abs(eigs).max())
    assert np.all(np.asarray(result.residuals) < 1e-6 * np.abs(eigs).max())


def test_lanczos_tolerance_stops_early_and_warm_start_is_cheaper():
    prob = mlp_problem("tanh", "cross_entropy", widths=(12, 3), n=9)
    ref = Dense(prob)
    H = sj.hessian(prob.objective, prob.params, prob.batch)
    want = np.linalg.eigvalsh(ref.H)[::-1][:2]
    cold = sj.lanczos_top_k(H, prob.params, k=2, num_iters=60, tol=1e-6)
    np.testing.assert_allclose(cold.values, want, rtol=1e-8)
    assert int(cold.num_matvecs) < 60
    warm = sj.lanczos_top_k(H, prob.params, k=2, num_iters=60, tol=1e-6, init=cold.vectors)
    np.testing.assert_allclose(warm.values, want, rtol=1e-8)
    assert int(warm.num_matvecs) < int(cold.num_matvecs)


def _outliers_and_bulk(size, dtype):
    """Three outliers over a Gaussian bulk: plain Lanczos loses orthogonality (and repeats
    the outliers as ghosts) once they converge."""
    rng = np.random.default_rng(0)
    eigs = np.concatenate([[10.0, 9.0, 8.5], rng.standard_normal(size - 3)])
    return eigs, jnp.asarray(eigs, dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_partial_reorthogonalisation_keeps_the_basis_semi_orthogonal(dtype):
    size, num_iters = 400, 80
    eigs, diag = _outliers_and_bulk(size, dtype)
    v0 = jax.random.normal(jax.random.PRNGKey(0), (size,), dtype)
    eps = float(jnp.finfo(dtype).eps)
    want = np.sort(eigs)[::-1][:5]
    results = {}
    for mode in ("partial", "full"):
        run = jax.jit(
            lambda v, mode=mode: lanczos._lanczos(
                lambda x: diag * x,
                v,
                num_iters=num_iters,
                key=jax.random.PRNGKey(1),
                k=1,
                tol=None,
                reorthogonalisation=mode,
                num_vectors=num_iters,
            )
        )
        alpha, beta, used, count, vectors = run(v0)
        assert int(used) == num_iters
        # All Ritz vectors V = Sᵀ Q with S orthogonal: V Vᵀ − I is Q's loss of orthogonality.
        gram = np.asarray(vectors, np.float64) @ np.asarray(vectors, np.float64).T
        assert np.max(np.abs(gram - np.eye(num_iters))) < 10 * np.sqrt(eps)
        values = np.asarray(lanczos._ritz(alpha, beta, used)[0][:5])
        np.testing.assert_allclose(values, want, rtol=100 * eps)
        results[mode] = int(count)
    assert results["full"] == num_iters
    # Once the outliers converge, float32 needs a pair of orthogonalisations about every
    # fourth step, float64 rarely.
    assert results["partial"] <= (0.6 if dtype == jnp.float32 else 0.3) * num_iters


def test_two_stage_basis_equals_one_stage(monkeypatch):
    size = 400
    _, diag = _outliers_and_bulk(size, jnp.float64)
    template = jnp.zeros((size,), jnp.float64)

    def top(tol):
        return sj.lanczos_top_k(lambda x: diag * x, template, k=2, num_iters=60, tol=tol)

    one = {tol: top(tol) for tol in (1e-2, 1e-11)}
    # A first stage of 16 vectors: the loose tolerance stops inside it, the tight one moves on.
    monkeypatch.setattr(lanczos, "_FIRST_STAGE_BYTES", 8 * size * 8)
    assert lanczos._first_stage_rows(64, size, 8) == lanczos._FIRST_STAGE_MIN_ROWS == 16
    for tol, want in one.items():
        got = top(tol)
        assert int(got.num_matvecs) == int(want.num_matvecs)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-13)
        np.testing.assert_allclose(np.abs(got.vectors @ want.vectors.T), np.eye(2), atol=1e-10)
    assert int(one[1e-2].num_matvecs) <= 16 < int(one[1e-11].num_matvecs)


def test_power_iteration_and_lobpcg():
    eigs = SPECTRA["indefinite"]
    mv, template = _operator(_sym(eigs, seed=1))
    power = sj.power_iteration(mv, template, num_iters=2000, tol=1e-12)
    top_abs = eigs[np.argmax(np.abs(eigs))]
    np.testing.assert_allclose(power.values[0], top_abs, rtol=1e-8)
    lob = sj.lobpcg_top_k(mv, template, k=2, num_iters=200)
    np.testing.assert_allclose(lob.values, np.sort(eigs)[::-1][:2], rtol=1e-6)
    with pytest.raises(ValueError, match="5k < P"):
        sj.lobpcg_top_k(mv, template, k=6)


def test_exact_dense_trace_diagonal_frobenius():
    mat = _sym(SPECTRA["indefinite"], seed=2)
    mv, template = _operator(mat)
    for cs in (None, 7):
        np.testing.assert_allclose(sj.dense(mv, template, chunk_size=cs), mat, atol=1e-12)
        diag = ravel_pytree(sj.diagonal_exact(mv, template, chunk_size=cs))[0]
        np.testing.assert_allclose(diag, np.diag(mat), atol=1e-12)
        np.testing.assert_allclose(sj.trace_exact(mv, template, chunk_size=cs), np.trace(mat))
        np.testing.assert_allclose(
            sj.frobenius_squared_exact(mv, template, chunk_size=cs), np.sum(np.square(mat))
        )


def _within(est, exact, k=5.0):
    return abs(float(est.value) - exact) < k * float(est.stderr)


def test_stochastic_estimators_are_unbiased_and_shrink():
    mat = _sym(SPECTRA["low_rank_psd"], seed=3) + 0.1 * jnp.eye(P)
    mv, template = _operator(mat)
    key = jax.random.PRNGKey(0)
    trace, fro = float(np.trace(mat)), float(np.sum(np.square(mat)))
    small = sj.hutchinson_trace(mv, template, key=key, num_probes=25)
    big = sj.hutchinson_trace(mv, template, key=key, num_probes=400, probe_chunk=64)
    assert _within(small, trace) and _within(big, trace)
    assert float(big.stderr) < 0.5 * float(small.stderr)
    assert big.num_probes == 400
    f = sj.frobenius_squared(mv, template, key=key, num_probes=300, probe_chunk=100)
    assert _within(f, fro)
    x = sj.xtrace(mv, template, key=key, num_probes=10)
    assert _within(x, trace) and float(x.stderr) < float(small.stderr)
    d = sj.hutchinson_diagonal(mv, template, key=key, num_probes=500)
    dv, ds = ravel_pytree(d.value)[0], ravel_pytree(d.stderr)[0]
    assert np.all(np.abs(dv - np.diag(mat)) < 5 * ds + 1e-12)


def test_trace_dispatch_is_each_estimator():
    """linalg.trace: "exact" is trace_exact with standard error 0, the stochastic methods are
    hutchinson_trace and xtrace with the same key and probes, bit for bit."""
    mat = _sym(SPECTRA["low_rank_psd"], seed=5) + 0.1 * jnp.eye(P)
    mv, template = _operator(mat)
    key = jax.random.PRNGKey(2)
    exact = linalg.trace(mv, template, method="exact", basis_chunk=7)
    assert exact.num_probes == 0 and float(exact.stderr) == 0.0
    assert float(exact.value) == float(sj.trace_exact(mv, template, chunk_size=7))
    np.testing.assert_allclose(exact.value, np.trace(mat), rtol=1e-12)
    pairs = (
        (
            linalg.trace(mv, template, method="hutchinson", key=key, num_probes=40, probe_chunk=16),
            sj.hutchinson_trace(mv, template, key=key, num_probes=40, probe_chunk=16),
        ),
        (
            linalg.trace(mv, template, method="xtrace", key=key, num_probes=8),
            sj.xtrace(mv, template, key=key, num_probes=8),
        ),
    )
    for got, want in pairs:
        assert float(got.value) == float(want.value)
        assert float(got.stderr) == float(want.stderr) and got.num_probes == want.num_probes
        assert _within(got, float(np.trace(mat)))
    assert set(linalg.TRACE_METHODS) == {"exact", "hutchinson", "xtrace"}
    with pytest.raises(ValueError, match="method must be one of"):
        linalg.trace(mv, template, method="hutch++")
    with pytest.raises(ValueError, match="needs key and num_probes"):
        linalg.trace(mv, template, method="hutchinson", num_probes=4)
    # One call serves every method: the options a method does not use are ignored.
    kw = dict(key=key, num_probes=8, probe_chunk=4, basis_chunk=7)
    assert float(linalg.trace(mv, template, method="exact", **kw).value) == float(exact.value)
    assert float(linalg.trace(mv, template, method="xtrace", **kw).value) == float(
        pairs[1][0].value
    )


def test_spectral_density_moments():
    """SLQ reproduces, per probe, z̃ᵀAz̃ (first moment) and ‖Az̃‖² (second), z̃ = z/√P."""
    eigs = SPECTRA["indefinite"]
    mat = _sym(eigs, seed=4)
    mv, template = _operator(mat)
    sd = sj.spectral_density(
        mv, template, key=jax.random.PRNGKey(1), num_probes=50, num_iters=P, num_points=4000
    )
    dx = float(sd.grid[1] - sd.grid[0])
    mass = float(jnp.sum(sd.density) * dx)
    mean = float(jnp.sum(sd.grid * sd.density) * dx)
    assert abs(mass - 1) < 1e-6
    # With full-depth Lanczos the quadrature is exact: E[mean] = tr(A)/P; 50 probes.
    assert abs(mean - np.mean(eigs)) < 0.15 * np.abs(eigs).max()
    assert float(sd.sigma) > 0 and sd.num_probes == 50


def test_bad_arguments():
    mv, template = _operator(jnp.eye(P))
    with pytest.raises(ValueError, match="k="):
        sj.lanczos_top_k(mv, template, k=5, num_iters=3)
    with pytest.raises(ValueError, match="num_probes"):
        sj.hutchinson_trace(mv, template, key=jax.random.PRNGKey(0), num_probes=0)
    with pytest.raises(ValueError, match="chunk_size"):
        sj.dense(mv, template, chunk_size=0)
    with pytest.raises(TypeError, match="floating"):
        sj.dense(mv, {"a": jnp.zeros(3, jnp.int32)})
    with pytest.raises(ValueError, match="num_probes <= P"):
        sj.xtrace(mv, template, key=jax.random.PRNGKey(0), num_probes=P + 1)
    with pytest.raises(ValueError, match="reorthogonalisation"):
        sj.lanczos_top_k(mv, template, reorthogonalisation="none")
    with pytest.raises(ValueError, match="reorthogonalisation"):
        sj.spectral_density(mv, template, key=jax.random.PRNGKey(0), reorthogonalisation="")


def test_results_print_their_numbers_not_their_vectors():
    from sharpness_jax.linalg.estimators import Estimate
    from sharpness_jax.linalg.lanczos import Eigen

    vectors = {"a": jnp.ones((2, 500), jnp.float32), "b": jnp.ones((2, 3, 3), jnp.float32)}
    eigen = Eigen(jnp.array([3.0, 1.0]), vectors, jnp.array([1e-7, 2e-6]), jnp.array(40))
    assert repr(eigen) == (
        "Eigen(values=[3., 1.], vectors={a: float32[2, 500], b: float32[2, 3, 3]}, "
        "residuals=[1.e-07, 2.e-06], num_matvecs=40)"
    )
    assert repr(Estimate(jnp.array(2.5), jnp.array(0.125), 10)) == (
        "Estimate(2.5 ± 0.125, num_probes=10)"
    )
    diagonal = Estimate({"w": jnp.ones(3, jnp.float32)}, {"w": jnp.ones(3, jnp.float32)}, 4)
    assert repr(diagonal) == "Estimate(value={w: float32[3]}, stderr={w: float32[3]}, num_probes=4)"
