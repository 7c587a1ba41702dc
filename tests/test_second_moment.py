"""The per-example Hessian second moment E_p[h_p²] (sharpness_jax.second_moment) against
dense float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noise_problem import (
    LAYER,
    layer_indices,
    num_examples,
    operands,
    problem,
    reference,
    run,
    stack,
    top_eigh,
)
from problems import flat, rel_err

import sharpness_jax as sj
from sharpness_jax import second_moment


@pytest.mark.parametrize("chunk_size,basis_chunk_size", [(None, None), (3, 7)])
def test_second_moment_diagonal_trace_dense_top_k(chunk_size, basis_chunk_size):
    ref = reference()
    kw = dict(chunk_size=chunk_size, basis_chunk_size=basis_chunk_size)
    for method in ("factored", "per_example"):
        diag = flat(run(second_moment.hessian_second_moment_diagonal, method=method, **kw))
        assert rel_err(diag, np.diag(ref.H2)) < 1e-10, method
    tr = run(second_moment.hessian_second_moment_trace, **kw)
    want = np.mean([np.sum(hp**2) for hp in ref.h])  # (1/n) Σ_p ‖h_p‖_F²
    assert abs(tr - want) < 1e-10 * want
    dense = run(second_moment.hessian_second_moment_dense, **kw)
    assert rel_err(dense, ref.H2) < 1e-10
    eig = run(second_moment.hessian_second_moment_top_k, k=3, num_iters=43, chunk_size=chunk_size)
    assert rel_err(eig.values, top_eigh(ref.H2, 3)[0]) < 1e-8


def test_second_moment_per_layer_both_conventions():
    p = problem().params
    ref = reference()
    idx = layer_indices()
    sq_of_block = np.mean([hp[np.ix_(idx, idx)] @ hp[np.ix_(idx, idx)] for hp in ref.h], axis=0)
    block_of_sq = ref.H2[np.ix_(idx, idx)]
    # The two conventions differ.
    assert rel_err(sq_of_block, block_of_sq) > 1e-3
    # E_p[(h_p)_SS²] ⪯ (E_p[h_p²])_SS.
    assert np.linalg.eigvalsh(block_of_sq - sq_of_block).min() > -1e-12
    for restricted, want in ((True, sq_of_block), (False, block_of_sq)):
        kw = dict(subset=LAYER, restricted=restricted, chunk_size=3)
        dense = run(second_moment.hessian_second_moment_dense, **kw)
        assert rel_err(dense, want) < 1e-10, restricted
        vecs = np.random.default_rng(1).standard_normal((2, idx.size))
        sub = sj.select(p, LAYER)
        # The factored route holds the rows of the free (subset) parameters only.
        for method in ("auto", "factored", "per_example")[: 3 if restricted else 1]:
            diag = run(
                second_moment.hessian_second_moment_diagonal,
                basis_chunk_size=5,
                method=method,
                **kw,
            )
            assert rel_err(flat(diag), np.diag(want)) < 1e-10, (restricted, method)
            q = run(
                second_moment.hessian_second_moment_quadratic_forms,
                stack(vecs, sub),
                method=method,
                **kw,
            )
            want_q = np.einsum("ki,ij,kj->k", vecs, want, vecs)
            np.testing.assert_allclose(q, want_q, rtol=1e-10, err_msg=method)
    with pytest.raises(ValueError, match="restricted=True"):
        run(second_moment.hessian_second_moment_diagonal, subset=LAYER, restricted=False,
            method="factored")  # fmt: skip


def test_second_moment_and_hessian_diagonals_in_one_pass():
    ref = reference()
    for subset, restricted in ((None, True), (LAYER, True), (LAYER, False)):
        kw = dict(chunk_size=3, basis_chunk_size=5, subset=subset, restricted=restricted)
        sq, diag_h = run(second_moment.second_moment_and_hessian_diagonals, **kw)
        want = run(second_moment.hessian_second_moment_diagonal, **kw)
        np.testing.assert_allclose(flat(sq), flat(want), rtol=1e-12)
        idx = np.arange(ref.flat.size) if subset is None else layer_indices()
        assert rel_err(flat(diag_h), np.diag(ref.H)[idx]) < 1e-10


def test_quadratic_forms_along_vectors():
    _, p, _ = operands()
    ref = reference()
    vecs = np.random.default_rng(0).standard_normal((4, ref.flat.size))
    for method in ("factored", "per_example"):
        qh = run(
            second_moment.hessian_second_moment_quadratic_forms,
            stack(vecs, p),
            chunk_size=3,
            method=method,
        )
        want = np.einsum("ki,ij,kj->k", vecs, ref.H2, vecs)
        np.testing.assert_allclose(qh, want, rtol=1e-10, err_msg=method)


def test_second_moment_dominates_hessian_square():
    """E_p[h_p²] − H² = E_p[(h_p − H)²] ⪰ 0, so also diag(E_p[h_p²]) ≥ diag(H²) ≥ 0."""
    o, p, b = operands()
    h2 = np.asarray(run(second_moment.hessian_second_moment_dense))
    h = np.asarray(sj.dense(sj.hessian(o, p, b), p))
    gap = np.linalg.eigvalsh(h2 - h @ h)
    assert gap.min() > -1e-12 * np.abs(gap).max()
    diag = flat(run(second_moment.hessian_second_moment_diagonal))
    assert np.all(diag >= np.diag(h @ h) - 1e-14)
    assert np.all(diag >= np.diag(h) ** 2 - 1e-14)


def test_second_moment_hutchinson_diagonal_within_5_se():
    ref = reference()
    exact = np.diag(ref.H2)
    ses = []
    for m, key in ((100, 0), (400, 1)):
        est = run(
            second_moment.hessian_second_moment_diagonal_hutchinson,
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
    n = num_examples()
    gram = np.einsum("pij,qij->ipq", ref.h, ref.h) / n  # ‖M_i‖_F² = Σ_pq (h_p[i]·h_q[i])²/n²
    fro_sq = np.sum(gram**2, axis=(1, 2))
    diag_sq = np.sum(np.mean(ref.h**2, axis=0) ** 2, axis=1)
    se_exact = np.sqrt(2 * (fro_sq - diag_sq) / 400)
    np.testing.assert_allclose(np.median(ses[1] / se_exact), 1.0, atol=0.15)
    # Per layer, both conventions.
    idx = layer_indices()
    for restricted, want in (
        (True, np.mean([np.sum(hp[np.ix_(idx, idx)] ** 2, 1) for hp in ref.h], axis=0)),
        (False, exact[idx]),
    ):
        est = run(
            second_moment.hessian_second_moment_diagonal_hutchinson,
            key=jax.random.PRNGKey(2),
            num_probes=200,
            subset=LAYER,
            restricted=restricted,
        )
        value, se = flat(est.value), flat(est.stderr)
        assert np.all(np.abs(value - want) <= 5 * se + 1e-13 * want.max()), restricted


# ------------------------------------------------------------------------- dtypes, errors


def test_float32_and_jit():
    prob = problem()
    o = prob.objective
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), prob.params)
    b = sj.Batch(prob.batch.inputs.astype(jnp.float32), prob.batch.targets)
    ref = reference()

    @jax.jit
    def run(p, b):
        return (
            second_moment.hessian_second_moment_diagonal(o, p, b, chunk_size=3, basis_chunk_size=8),
            second_moment.hessian_second_moment_diagonal_hutchinson(
                o, p, b, key=jax.random.PRNGKey(0), num_probes=4
            ).value,
        )

    h2_diag, h2_hutch = run(p, b)
    for tree in (h2_diag, h2_hutch):
        assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(tree))
    assert rel_err(flat(h2_diag), np.diag(ref.H2)) < 1e-4


def test_bad_inputs():
    o, p, b = operands()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        second_moment.hessian_second_moment_top_k(o, p, b, k=44)
    with pytest.raises(ValueError, match="basis_chunk_size"):
        second_moment.hessian_second_moment_diagonal(o, p, b, basis_chunk_size=0)
    with pytest.raises(TypeError, match="restricted"):
        second_moment.hessian_second_moment_diagonal(o, p, b, restricted="yes")
    with pytest.raises(ValueError, match="num_probes"):
        second_moment.hessian_second_moment_diagonal_hutchinson(o, p, b, key=key, num_probes=0)
    with pytest.raises(ValueError, match="shape"):
        bad = jax.tree_util.tree_map(lambda a: jnp.zeros((2, *a.shape, 1)), p)
        second_moment.hessian_second_moment_quadratic_forms(o, p, b, bad)
