"""SGD-noise covariance C (sharpness_jax.noise) against dense float64 references."""

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
from sharpness_jax import minibatch, noise

# ------------------------------------------------------------------------------------- C


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_covariance_diagonal_trace_gram_dense(chunk_size):
    ref = reference()
    kw = dict(chunk_size=chunk_size)
    diag = flat(run(noise.gradient_covariance_diagonal, **kw))
    assert rel_err(diag, np.diag(ref.C)) < 1e-10
    assert np.all(diag >= 0)
    assert abs(run(noise.gradient_covariance_trace, **kw) - np.trace(ref.C)) < 1e-10 * abs(
        np.trace(ref.C)
    )
    g_hat = ref.g - ref.gbar
    gram = run(noise.gradient_covariance_gram, **kw)
    assert rel_err(gram, g_hat @ g_hat.T / num_examples()) < 1e-10
    dense = np.asarray(run(noise.gradient_covariance_dense, **kw))
    assert rel_err(dense, ref.C) < 1e-10
    fro = run(noise.gradient_covariance_frobenius_squared, **kw)
    assert abs(fro - np.sum(ref.C**2)) < 1e-10 * np.sum(ref.C**2)
    # C ⪰ 0 with rank ≤ n − 1.
    eig = np.linalg.eigvalsh(dense)
    assert eig.min() > -1e-12 * eig.max()
    assert np.sum(eig > 1e-10 * eig.max()) <= num_examples() - 1


@pytest.mark.parametrize("method", ["gram", "lanczos"])
def test_covariance_top_k_matches_eigh(method):
    ref = reference()
    k = 3
    eig = run(
        noise.gradient_covariance_top_k,
        k=k,
        method=method,
        num_iters=43,
        chunk_size=3,
        key=jax.random.PRNGKey(1),
    )
    want_vals, want_vecs = top_eigh(ref.C, k)
    assert rel_err(eig.values, want_vals) < 1e-8
    got = np.stack(
        [flat(jax.tree_util.tree_map(lambda a, i=i: a[i], eig.vectors)) for i in range(k)]
    )
    np.testing.assert_allclose(np.abs(np.sum(got * want_vecs, axis=1)), 1.0, atol=1e-8)
    assert np.all(np.asarray(eig.residuals) < 1e-8 * want_vals[0])


def test_covariance_gram_route_beyond_rank_gives_zero_vectors():
    n = num_examples()
    eig = run(noise.gradient_covariance_top_k, k=n)
    vals = np.asarray(eig.values)
    assert abs(vals[-1]) < 1e-12 * vals[0]  # rank C ≤ n − 1
    last = flat(jax.tree_util.tree_map(lambda a: a[-1], eig.vectors))
    assert np.all(last == 0)
    first = flat(jax.tree_util.tree_map(lambda a: a[0], eig.vectors))
    assert abs(np.linalg.norm(first) - 1) < 1e-10


def test_covariance_per_layer_is_the_block():
    ref = reference()
    idx = layer_indices()
    block = ref.C[np.ix_(idx, idx)]
    diag = flat(run(noise.gradient_covariance_diagonal, chunk_size=2, subset=LAYER))
    assert rel_err(diag, np.diag(block)) < 1e-10
    eig = run(noise.gradient_covariance_top_k, k=2, chunk_size=2, subset=LAYER)
    assert rel_err(eig.values, top_eigh(block, 2)[0]) < 1e-8
    dense = run(noise.gradient_covariance_dense, subset=LAYER)
    assert rel_err(dense, block) < 1e-10


def test_quadratic_forms_along_vectors_and_eigenpairs():
    o, p, b = operands()
    ref = reference()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4, ref.flat.size))
    stacked = stack(vecs, p)
    qc = run(noise.gradient_covariance_quadratic_forms, stacked, chunk_size=3)
    np.testing.assert_allclose(qc, np.einsum("ki,ij,kj->k", vecs, ref.C, vecs), rtol=1e-10)
    # Given an Eigen of H: v_iᵀ C v_i along the Hessian eigenvectors.
    eig_h = sj.lanczos_top_k(sj.hessian(o, p, b), p, k=3, num_iters=43)
    _, h_vecs = top_eigh(ref.H, 3)
    np.testing.assert_allclose(
        run(noise.gradient_covariance_quadratic_forms, eig_h),
        np.einsum("ki,ij,kj->k", h_vecs, ref.C, h_vecs),
        rtol=1e-8,
    )


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_trace_hc(chunk_size):
    ref = reference()
    got = run(noise.hessian_covariance_trace, chunk_size=chunk_size)
    want = np.trace(ref.H @ ref.C)
    assert abs(got - want) < 1e-10 * abs(want)
    idx = np.ix_(layer_indices(), layer_indices())
    got = run(noise.hessian_covariance_trace, chunk_size=chunk_size, subset=LAYER)
    want = np.trace(ref.H[idx] @ ref.C[idx])
    assert abs(got - want) < 1e-10 * abs(want)


def test_minibatch_noise_covariance_is_scaled_c():
    """The operator is s · C with s = minibatch.minibatch_noise_scale."""
    ref = reference()
    o, p, b = operands()
    v, v_np = ref.random_vector(3)
    for repl in (True, False):
        mv = noise.minibatch_noise_covariance(o, p, b, batch_size=3, replacement=repl)
        s = minibatch.minibatch_noise_scale(num_examples(), 3, replacement=repl)
        np.testing.assert_allclose(flat(mv(v)), s * ref.C @ v_np, rtol=1e-10)


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
            noise.gradient_covariance_diagonal(o, p, b, chunk_size=3),
            noise.gradient_covariance_top_k(o, p, b, k=2, chunk_size=3).values,
            noise.hessian_covariance_trace(o, p, b, chunk_size=3),
        )

    c_diag, c_top, trace_hc = run(p, b)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(c_diag))
    assert c_top.dtype == trace_hc.dtype == jnp.float32
    assert rel_err(flat(c_diag), np.diag(ref.C)) < 1e-4


def test_bad_inputs():
    o, p, b = operands()
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        noise.gradient_covariance_top_k(o, p, b, k=44)
    with pytest.raises(ValueError, match="exceeds the number of examples"):
        noise.gradient_covariance_top_k(o, p, b, k=8)
    with pytest.raises(ValueError, match="method"):
        noise.gradient_covariance_top_k(o, p, b, k=1, method="svd")
    with pytest.raises(ValueError, match="k must be a positive int"):
        noise.gradient_covariance_top_k(o, p, b, k=0)
    with pytest.raises(ValueError, match="without replacement"):
        noise.minibatch_noise_covariance(o, p, b, batch_size=8, replacement=False)
    with pytest.raises(ValueError, match="matches no parameter"):
        noise.gradient_covariance_diagonal(o, p, b, subset="params/nope")
    with pytest.raises(TypeError, match="chunk_size"):
        noise.gradient_covariance_gram(o, p, b, chunk_size=2.5)
    with pytest.raises(ValueError, match="tree structure"):
        noise.gradient_covariance_quadratic_forms(o, p, b, {"w": jnp.zeros((2, 3))})
