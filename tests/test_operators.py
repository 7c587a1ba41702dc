"""Every exact operator against a dense reference, column by column, in float64."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import Dense, all_problems, flat, mlp_problem, rel_err

import sharpness_jax as sj

PROBLEMS = {p.name: p for p in all_problems()}


@functools.cache
def dense_ref(name):
    return Dense(PROBLEMS[name])


OPERATORS = {
    "hessian": (sj.hessian, lambda d: d.H),
    "hessian_rev_rev": (functools.partial(sj.hessian, method="rev_rev"), lambda d: d.H),
    "ggn": (sj.ggn, lambda d: d.G),
    "fisher": (sj.fisher, lambda d: d.G),  # true Fisher = GGN for CE and squared error
    "empirical_fisher": (sj.empirical_fisher, lambda d: d.Femp),
    "gradient_covariance": (sj.gradient_covariance, lambda d: d.C),
    "hessian_second_moment": (sj.hessian_second_moment, lambda d: d.H2),
}


CASES = [(name, 3) for name in sorted(PROBLEMS)] + [
    ("mlp-relu-cross_entropy", None),
    ("cnn-squared_error_half", None),
]


@pytest.mark.parametrize("name,chunk_size", CASES)
def test_operators_match_dense_references(name, chunk_size):
    prob, ref = PROBLEMS[name], dense_ref(name)
    o, p, b = prob.objective, prob.params, prob.batch

    @jax.jit
    def all_dense(p, b):
        return {
            k: sj.dense(c(o, p, b, chunk_size=chunk_size), p) for k, (c, _) in OPERATORS.items()
        }

    mats = all_dense(p, b)
    for op_name, (_, expected) in OPERATORS.items():
        err = rel_err(mats[op_name], expected(ref))
        assert err < 1e-8, (op_name, err)


def test_dense_reference_hessian_is_mean_of_per_example_hessians():
    for name in sorted(PROBLEMS):
        ref = dense_ref(name)
        assert rel_err(ref.H, ref.H_direct) < 1e-12


def _subset_indices(params, selector):
    """Flat indices of the selected leaves in the ravel_pytree ordering."""
    paths = sj.leaf_paths(params)
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chosen = sj.select(params, selector)
    return np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i, path in enumerate(paths) if path in chosen]
    )


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_layer_restricted_operators_are_blocks(chunk_size):
    name = "mlp-tanh-cross_entropy"
    prob, ref = PROBLEMS[name], dense_ref(name)
    o, p, b = prob.objective, prob.params, prob.batch
    selector = "params/Dense_1"
    idx = _subset_indices(p, selector)
    block = np.ix_(idx, idx)

    @jax.jit
    def all_dense(p, b):
        sub = sj.select(p, selector)
        return {
            k: sj.dense(c(o, p, b, chunk_size=chunk_size, subset=selector), sub)
            for k, (c, _) in OPERATORS.items()
        }

    mats = all_dense(p, b)
    for op_name, (_, expected) in OPERATORS.items():
        mat = mats[op_name]
        if op_name == "hessian_second_moment":
            # Per layer, E_p[h_p²] squares the layer's block of each h_p.
            want = np.mean([hp[block] @ hp[block] for hp in ref.h], axis=0)
        else:
            want = expected(ref)[block]
        assert rel_err(mat, want) < 1e-8, op_name


def test_restricted_vectors_and_embedding():
    prob = PROBLEMS["mlp-relu-cross_entropy"]
    p = prob.params
    sub = sj.select(p, ["params/Dense_0/kernel", "params/Dense_1/bias"])
    assert list(sub) == ["params/Dense_0/kernel", "params/Dense_1/bias"]
    full = sj.embed(sub, p)
    assert float(jnp.sum(jnp.abs(full["params"]["Dense_1"]["kernel"]))) == 0.0
    np.testing.assert_array_equal(
        full["params"]["Dense_0"]["kernel"], p["params"]["Dense_0"]["kernel"]
    )
    with pytest.raises(ValueError, match="matches no parameter"):
        sj.select(p, "params/Dense_9")


def test_identities_and_definiteness():
    for name in ["mlp-relu-cross_entropy", "mlp-tanh-squared_error_half", "cnn-cross_entropy"]:
        prob = PROBLEMS[name]
        o, p, b = prob.objective, prob.params, prob.batch

        @jax.jit
        def matrices(p, b):
            return (
                sj.dense(sj.ggn(o, p, b), p),
                sj.dense(sj.fisher(o, p, b), p),
                sj.dense(sj.empirical_fisher(o, p, b), p),
                sj.dense(sj.gradient_covariance(o, p, b, chunk_size=2), p),
                sj.dense(sj.hessian(o, p, b), p),
                sj.dense(sj.hessian_second_moment(o, p, b), p),
                flat_jnp(sj.gradient(o, p, b)),
            )

        G, F, Femp, C, H, H2, gbar = map(np.asarray, matrices(p, b))
        assert rel_err(G, F) < 1e-12
        assert rel_err(Femp - np.outer(gbar, gbar), C) < 1e-10
        for mat in (G, C, Femp, H2, H2 - H @ H):
            np.testing.assert_allclose(mat, mat.T, atol=1e-12 * np.abs(mat).max())
            eig = np.linalg.eigvalsh(mat)
            assert eig.min() >= -1e-10 * max(eig.max(), 1e-300), name


def test_monte_carlo_fisher_is_unbiased():
    prob = PROBLEMS["mlp-tanh-cross_entropy"]
    o, p, b = prob.objective, prob.params, prob.batch
    v, vf = dense_ref(prob.name).random_vector(3)
    exact = float(vf @ dense_ref(prob.name).G @ vf)

    @jax.jit
    @jax.vmap
    def quad(key):
        mv = sj.fisher_monte_carlo(o, p, b, key=key, num_samples=4, chunk_size=3)
        return jnp.vdot(flat_jnp(v), flat_jnp(mv(v)))

    samples = np.asarray(quad(jax.random.split(jax.random.PRNGKey(0), 200)))
    se = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - exact) < 5 * se
    # Fixed key: the same PSD matrix for every chunking.
    key = jax.random.PRNGKey(7)
    mc = jax.jit(
        lambda cs: sj.dense(
            sj.fisher_monte_carlo(o, p, b, key=key, num_samples=2, chunk_size=cs), p
        ),
        static_argnums=0,
    )
    a, c = mc(None), mc(2)
    assert rel_err(a, c) < 1e-12
    assert np.linalg.eigvalsh(a).min() > -1e-12


def flat_jnp(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def test_jacobian_products():
    prob = PROBLEMS["cnn-squared_error_half"]
    ref = dense_ref(prob.name)
    o, p, b = prob.objective, prob.params, prob.batch
    v, vf = ref.random_vector(4)
    u = np.random.default_rng(0).standard_normal((prob.n, ref.J.shape[1]))
    for cs in (None, 2):
        jv = sj.jacobian_vp(o.predict, p, b.inputs, chunk_size=cs)(v)
        np.testing.assert_allclose(jv, np.einsum("pkq,q->pk", ref.J, vf), rtol=1e-10, atol=1e-13)
        jtu = sj.jacobian_tvp(o.predict, p, b.inputs, chunk_size=cs)(jnp.asarray(u))
        np.testing.assert_allclose(flat(jtu), np.einsum("pkq,pk->q", ref.J, u), rtol=1e-10)


def test_no_recompilation_with_new_arrays_of_the_same_shapes():
    prob = mlp_problem("tanh", "cross_entropy")
    o = prob.objective

    @jax.jit
    @chex.assert_max_traces(n=1)
    def products(params, batch, v):
        return (
            sj.hessian(o, params, batch, chunk_size=3)(v),
            sj.gradient_covariance(o, params, batch, chunk_size=3)(v),
            sj.hessian_second_moment(o, params, batch, chunk_size=3)(v),
        )

    chex.clear_trace_counter()
    p, b = prob.params, prob.batch
    products(p, b, p)
    p2 = jax.tree_util.tree_map(lambda a: a + 0.1, p)
    b2 = sj.Batch(b.inputs * 2.0, (b.targets + 1) % 3)
    products(p2, b2, p)  # would raise if traced again


class TestBadInput:
    prob = mlp_problem("tanh", "cross_entropy")

    def test_mismatched_leading_dimensions(self):
        o, p, b = self.prob.objective, self.prob.params, self.prob.batch
        with pytest.raises(ValueError, match="disagree on the number of examples"):
            sj.hessian(o, p, sj.Batch(b.inputs, b.targets[:-1]))

    def test_vector_structure_shape_dtype(self):
        o, p, b = self.prob.objective, self.prob.params, self.prob.batch
        mv = sj.ggn(o, p, b)
        with pytest.raises(ValueError, match="tree structure"):
            mv({"params": p["params"]["Dense_0"]})
        bad = jax.tree_util.tree_map(lambda a: a, p)
        bad["params"]["Dense_0"]["kernel"] = jnp.zeros((2, 2), jnp.float64)
        with pytest.raises(ValueError, match="shape"):
            mv(bad)
        with pytest.raises(TypeError, match="dtype"):
            mv(jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p))

    @pytest.mark.parametrize(
        "chunk_size,err", [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("4", TypeError)]
    )
    def test_chunk_size(self, chunk_size, err):
        o, p, b = self.prob.objective, self.prob.params, self.prob.batch
        with pytest.raises(err, match="chunk_size"):
            sj.hessian(o, p, b, chunk_size=chunk_size)

    def test_integer_params(self):
        o, b = self.prob.objective, self.prob.batch
        p = jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), self.prob.params)
        with pytest.raises(TypeError, match="floating-point"):
            sj.hessian(o, p, b)

    def test_k_larger_than_parameter_count(self):
        o, p, b = self.prob.objective, self.prob.params, self.prob.batch
        with pytest.raises(ValueError, match="exceeds the number of parameters"):
            sj.lanczos_top_k(sj.hessian(o, p, b), p, k=10_000)

    def test_unknown_method_and_batch_type(self):
        o, p, b = self.prob.objective, self.prob.params, self.prob.batch
        with pytest.raises(ValueError, match="method"):
            sj.hessian(o, p, b, method="finite_differences")
        with pytest.raises(TypeError, match="Batch"):
            sj.hessian(o, p, [b.inputs])

    def test_check_finite(self):
        p, b = self.prob.params, self.prob.batch
        sj.check_finite(p, b, names=("params", "batch"))
        bad = sj.Batch(b.inputs.at[0, 0].set(jnp.nan), b.targets)
        with pytest.raises(ValueError, match=r"batch.*1 non-finite"):
            sj.check_finite(p, bad, names=("params", "batch"))
        badp = jax.tree_util.tree_map(lambda a: a.at[..., 0].set(jnp.inf), p)
        with pytest.raises(ValueError, match="params"):
            sj.check_finite(badp, b, names=("params", "batch"))


def test_softmax_squared_error_operators_match_dense_references():
    """A loss whose GGN is not its Fisher: Λ from autodiff, F_out = (2/K) S² with S = ∂p/∂f."""
    prob = mlp_problem("tanh", "softmax_squared_error")
    ref = Dense(prob)
    o, p, b = prob.objective, prob.params, prob.batch
    outputs = [o.predict(p, x) for x in b.inputs]
    k = outputs[0].shape[0]
    s = [np.asarray(jax.jacfwd(jax.nn.softmax)(f)) for f in outputs]
    fisher_ref = np.mean(
        [jp.T @ (2.0 / k * sp.T @ sp) @ jp for jp, sp in zip(ref.J, s, strict=True)], axis=0
    )
    assert rel_err(fisher_ref, ref.G) > 1e-3  # the two genuinely differ
    expected = {
        "hessian": ref.H,
        "ggn": ref.G,
        "fisher": fisher_ref,
        "gradient_covariance": ref.C,
        "hessian_second_moment": ref.H2,
    }

    @jax.jit
    def all_dense(p, b):
        return {name: sj.dense(getattr(sj, name)(o, p, b, chunk_size=3), p) for name in expected}

    mats = all_dense(p, b)
    for name, want in expected.items():
        assert rel_err(mats[name], want) < 1e-8, name


def test_a_layer_operator_given_the_full_params_names_the_subset_template():
    prob = mlp_problem()
    selector = "params/Dense_1"
    h = sj.hessian(prob.objective, prob.params, prob.batch, subset=selector)
    fix = "sj.subsets.select(params, 'params/Dense_1')"
    with pytest.raises(ValueError, match=re.escape(fix)):
        sj.lanczos_top_k(h, prob.params, k=1)
    eigen = sj.lanczos_top_k(h, sj.subsets.select(prob.params, selector), k=1)
    assert set(eigen.vectors) == {"params/Dense_1/bias", "params/Dense_1/kernel"}
