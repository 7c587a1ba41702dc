"""The Gram matrix of per-example gradients and the exact spectrum of C built from it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import Problem, cnn_problem, mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import dense_factors, gradient_gram, noise


class _Tokens(nn.Module):
    """Dense layers over T = 2 positions (one via Hadamard Grams, one via layer gradients)."""

    @nn.compact
    def __call__(self, x):  # one example (T, 8)
        h = jnp.tanh(nn.Dense(8)(x))  # T²(d + m) = 64 ≤ d·m = 64: Hadamard
        h = jax.nn.gelu(nn.Dense(3)(h))  # 4·11 > 24: the layer's gradient per example
        return nn.Dense(2)(jnp.mean(h, axis=0))


def tokens_problem(n=6):
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(kx, (n, 2, 8), jnp.float64)
    y = jax.random.randint(ky, (n,), 0, 2)
    module = _Tokens()
    params = module.init(kp, x[0].astype(jnp.float32))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    obj = sj.Objective(module.apply, sj.get_loss("cross_entropy"))
    return Problem("tokens", obj, params, sj.Batch(x, y))


PROBLEMS = {"mlp": lambda: mlp_problem("tanh", "cross_entropy"), "tokens": tokens_problem}


def stacked_gradients(prob):
    """G (n × P) by jax.vmap(jax.grad), sharing no code with the library's routes."""
    grad = jax.grad(prob.objective.example_loss)
    per = jax.vmap(lambda x, y: ravel_pytree(grad(prob.params, x, y))[0])
    return np.asarray(per(*prob.batch))


def dense_covariance(prob, subset=None):
    o, p, b = prob.objective, prob.params, prob.batch
    template = p if subset is None else sj.select(p, subset)
    return np.asarray(sj.dense(sj.gradient_covariance(o, p, b, subset=subset), template))


def test_the_tokens_model_uses_both_layer_forms():
    prob = tokens_problem()
    layout = dense_factors.dense_layout(prob.objective, prob.params, prob.batch.inputs[0])
    assert layout.applicable
    assert [c.positions for c in layout.calls] == [2, 2, 1]
    assert [gradient_gram._hadamard(c) for c in layout.calls] == [True, False, True]


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_factored_and_per_example_grams_equal_stacked_gradients(name, chunk_size):
    prob = PROBLEMS[name]()
    o, b = prob.objective, prob.batch
    g = stacked_gradients(prob)
    want = g @ g.T
    for method in ("factored", "per_example"):
        fn = jax.jit(
            lambda p, b, m=method: sj.gradient_gram.gradient_gram(
                o, p, b, method=m, chunk_size=chunk_size
            )
        )
        got = np.asarray(fn(prob.params, b))
        assert rel_err(got, want) < 1e-10, method
    assert gradient_gram.gram_method(o, prob.params, b) == "factored"


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("method", ["factored", "per_example"])
def test_moments_spectrum_and_vectors_match_the_dense_covariance(name, method):
    prob = PROBLEMS[name]()
    o, b, n = prob.objective, prob.batch, prob.n
    c = dense_covariance(prob)
    k = 3
    fn = jax.jit(
        lambda p, b: gradient_gram.covariance_spectrum(o, p, b, k=k, chunk_size=4, method=method)
    )
    res = fn(prob.params, b)
    assert res.method == method
    assert abs(float(res.trace) - np.trace(c)) < 1e-10 * np.trace(c)
    frob = np.sum(c * c)
    assert abs(float(res.frobenius_squared) - frob) < 1e-10 * frob
    dense_vals = np.linalg.eigvalsh(c)[::-1]
    vals = np.asarray(res.eigenvalues)
    assert vals.shape == (n,) and np.all(np.diff(vals) <= 1e-14 * vals[0])
    np.testing.assert_allclose(vals[: n - 1], dense_vals[: n - 1], rtol=1e-9, atol=1e-12 * vals[0])
    assert abs(vals[n - 1]) < 1e-12 * vals[0]  # rank C ≤ n − 1
    flat_vectors = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(res.vectors))
    for lam, v in zip(vals[:k], flat_vectors, strict=True):
        assert abs(np.linalg.norm(v) - 1) < 1e-10
        assert np.linalg.norm(c @ v - lam * v) < 1e-10 * vals[0]
    moments = gradient_gram.exact_covariance_moments(o, prob.params, b, method=method)
    assert moments.vectors is None
    np.testing.assert_allclose(moments.eigenvalues, vals, rtol=1e-9, atol=1e-12 * vals[0])


def test_subset_restriction_takes_the_factored_route_on_the_dense_head():
    prob = cnn_problem()
    o, p, b = prob.objective, prob.params, prob.batch
    layer = "params/Dense_0"
    assert gradient_gram.gram_method(o, p, b) == "per_example"
    with pytest.raises(ValueError, match="does not apply"):
        gradient_gram.gradient_gram(o, p, b, method="factored")
    assert gradient_gram.gram_method(o, p, b, subset=layer) == "factored"
    c = dense_covariance(prob, subset=layer)
    res = gradient_gram.covariance_spectrum(o, p, b, k=1, subset=layer, chunk_size=2)
    assert res.method == "factored"
    assert abs(float(res.trace) - np.trace(c)) < 1e-10 * np.trace(c)
    assert abs(float(res.eigenvalues[0]) - np.linalg.eigvalsh(c)[-1]) < 1e-10 * np.trace(c)
    full = gradient_gram.covariance_spectrum(o, p, b, chunk_size=2)
    assert full.method == "per_example"
    assert abs(float(full.trace) - np.trace(dense_covariance(prob))) < 1e-10 * float(full.trace)
    restricted = gradient_gram.gradient_gram(o, p, b, subset=layer, method="per_example")
    factored = gradient_gram.gradient_gram(o, p, b, subset=layer)
    assert rel_err(factored, restricted) < 1e-10


def test_bad_arguments_are_refused():
    prob = mlp_problem()
    o, p, b = prob.objective, prob.params, prob.batch
    with pytest.raises(ValueError, match="method must be"):
        gradient_gram.gradient_gram(o, p, b, method="fast")
    with pytest.raises(ValueError, match="k must be"):
        gradient_gram.covariance_spectrum(o, p, b, k=prob.n + 1)


def mean_dominated():
    """Inputs shifted by 10 and all labels equal: (the float64 problem, float32 params and
    batch, the float64 tr(C), ρ = ‖ḡ‖² / tr(C))."""
    prob = mlp_problem("tanh", "cross_entropy", n=16, d=4, widths=(6, 3))
    o = prob.objective
    x = 0.01 * prob.batch.inputs + 10.0
    y = jnp.zeros((16,), jnp.int32)
    b64, b32 = sj.Batch(x, y), sj.Batch(x.astype(jnp.float32), y)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), prob.params)
    ref = float(noise.gradient_covariance_trace(o, prob.params, b64))
    g_bar = sj.gradient(o, prob.params, b64)
    rho = float(sum(jnp.sum(a * a) for a in jax.tree_util.tree_leaves(g_bar))) / ref
    return Problem("shifted", o, prob.params, b64), p32, b32, ref, rho


@pytest.mark.parametrize("method", ["factored", "per_example"])
def test_mean_dominated_float32_matches_the_float64_per_example_route(method):
    """Inputs shifted by 10 and all labels equal: ‖ḡ‖² / tr(C) = ρ ≈ 3·10⁸.

    Any float32 route starts from per-example gradients with rounding eps·‖g_p‖ ≈ eps·‖ḡ‖, so
    tr(C) = (1/n)Σ‖ĝ_p‖² carries a first-order error of about 2 eps·‖ḡ‖·‖ĝ‖, a relative
    eps·√ρ (≈ 1e-3 here; 4× that as the bound, for the sums over layers and examples). Centring
    the float32 Gram of the raw gradients instead cancels ‖ḡ‖²-sized entries: relative error
    eps·ρ ≫ 1, which the last assertion checks so that the bound is known to discriminate.
    """
    prob, p32, b32, ref, rho = mean_dominated()
    o, b64 = prob.objective, prob.batch
    assert rho > 1e8
    bound = 4 * float(jnp.finfo(jnp.float32).eps) * np.sqrt(rho)
    res = gradient_gram.exact_covariance_moments(o, p32, b32, method=method)
    assert res.trace.dtype == jnp.float32
    assert abs(float(res.trace) - ref) < bound * ref
    c_ref = gradient_gram.exact_covariance_moments(o, prob.params, b64, method="per_example")
    assert abs(float(res.eigenvalues[0]) - float(c_ref.eigenvalues[0])) < bound * ref
    naive = jnp.trace(gradient_gram._centre(gradient_gram.gradient_gram(o, p32, b32)))
    assert abs(float(naive) - ref) > 100 * bound * ref


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_covariance_trace_equals_the_stacked_gradients(name, chunk_size):
    prob = PROBLEMS[name]()
    g = stacked_gradients(prob)
    ref = np.sum(np.square(g - g.mean(0))) / g.shape[0]
    for method in ("factored", "per_example"):
        value, route = gradient_gram.covariance_trace(
            prob.objective, prob.params, prob.batch, chunk_size=chunk_size, method=method
        )
        assert route == method
        assert rel_err(value, ref) < 1e-12, method
    assert gradient_gram.covariance_trace(prob.objective, prob.params, prob.batch)[1] == "factored"


def test_covariance_trace_of_a_cnn_and_a_subset():
    prob = cnn_problem()
    value, route = gradient_gram.covariance_trace(prob.objective, prob.params, prob.batch)
    assert route == "per_example"  # convolutions have no dense factors
    assert (
        rel_err(value, noise.gradient_covariance_trace(prob.objective, prob.params, prob.batch))
        < 1e-12
    )
    mlp = mlp_problem("tanh", "cross_entropy")
    head = "params/Dense_1"
    value, route = gradient_gram.covariance_trace(
        mlp.objective, mlp.params, mlp.batch, subset=head, chunk_size=3
    )
    assert route == "factored"
    assert rel_err(value, np.trace(dense_covariance(mlp, head))) < 1e-12


@pytest.mark.parametrize("method", ["factored", "per_example"])
def test_covariance_trace_is_stable_when_the_mean_gradient_dominates(method):
    """As test_mean_dominated_float32_matches_the_float64_per_example_route, for tr(C) alone:
    the error bound eps·√ρ (relative), where the uncentred squared norms would give eps·ρ."""
    prob, p32, b32, ref, rho = mean_dominated()
    o = prob.objective
    bound = 4 * float(jnp.finfo(jnp.float32).eps) * np.sqrt(rho)
    value, _ = gradient_gram.covariance_trace(o, p32, b32, method=method, chunk_size=5)
    assert value.dtype == jnp.float32
    assert abs(float(value) - ref) < bound * ref


def test_exact_trace_memory_check_follows_the_route(monkeypatch):
    """The factored route holds layer factors, the per-example route chunk × P gradients: at a
    limit between the two, only the per-example route is refused."""
    from sharpness_jax import checks

    prob = mlp_problem("tanh", "cross_entropy", widths=(32, 32))
    obj, params, batch = prob.objective, prob.params, prob.batch
    size = ravel_pytree(params)[0].shape[0]  # P = 1,316; factors 3·(36 + 64 + 64) per example
    monkeypatch.setattr(checks, "MEMORY_LIMIT_BYTES", 2.0 * prob.n * 8 * size / 2)
    trace, route = gradient_gram.covariance_trace(obj, params, batch)
    assert route == "factored"
    with pytest.raises(MemoryError, match="per-example gradients"):
        gradient_gram.covariance_trace(obj, params, batch, method="per_example")
    want = gradient_gram.covariance_trace(obj, params, batch, method="per_example", chunk_size=2)
    np.testing.assert_allclose(trace, want[0], rtol=1e-10)
