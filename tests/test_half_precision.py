"""bfloat16 / float16 models: products in the model's dtype, sums and small eigenproblems in
float32, answers within a few units of half-precision roundoff of the float64 ones.

Tolerance: 8 u relative, u the unit roundoff of the dtype (2⁻⁸ for bfloat16, 2⁻¹¹ for
float16). The half-precision answer is that of a model whose parameters and inputs are rounded
to the dtype (relative perturbation u) and whose every product carries rounding errors of a
few u on this two-layer net; the float32 work of the algorithms adds nothing at that scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharpness_jax as sj
from sharpness_jax import gradient_gram, models
from sharpness_jax.per_example import sum_over_chunks

HALF = (jnp.bfloat16, jnp.float16)


def _tol(dtype):
    return 8 * float(jnp.finfo(dtype).eps) / 2


def _problem(dtype):
    model = models.build_model(
        "mlp", input_shape=(6,), num_outputs=3, widths=(8,), activation="tanh"
    )
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), model.init(jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (24, 6), jnp.float32).astype(dtype)
    y = jax.random.randint(jax.random.PRNGKey(2), (24,), 0, 3)
    return sj.Objective(model.predict, sj.softmax_cross_entropy()), params, sj.Batch(x, y)


@pytest.fixture(scope="module")
def reference():
    obj, params, batch = _problem(jnp.float64)
    H = sj.hessian(obj, params, batch)
    dense = np.asarray(sj.dense(H, params))
    density = sj.spectral_density(H, params, key=jax.random.PRNGKey(4), num_probes=4, num_iters=10)
    return {
        "eigs": np.sort(np.linalg.eigvalsh(dense))[::-1],
        "trH": np.trace(dense),
        "hutchinson": float(
            sj.hutchinson_trace(H, params, key=jax.random.PRNGKey(3), num_probes=8).value
        ),
        "slq_mean": float(np.trapezoid(density.grid * density.density, density.grid)),
        "trC": float(sj.trace_exact(sj.gradient_covariance(obj, params, batch), params)),
    }


def _close(value, expected, dtype):
    assert np.isfinite(value)
    np.testing.assert_allclose(float(value), expected, rtol=_tol(dtype))


@pytest.mark.parametrize(
    ("dtype", "reorthogonalisation"),
    [(jnp.bfloat16, "partial"), (jnp.float16, "partial"), (jnp.bfloat16, "full")],
)
def test_lanczos_top_two(reference, dtype, reorthogonalisation):
    obj, params, batch = _problem(dtype)
    H = sj.hessian(obj, params, batch)
    eig = sj.lanczos_top_k(H, params, k=2, num_iters=30, reorthogonalisation=reorthogonalisation)
    assert eig.values.dtype == jnp.float32
    assert jax.tree_util.tree_leaves(eig.vectors)[0].dtype == dtype
    # The second value is a distinct eigenvalue, not a ghost copy of the first.
    for got, expected in zip(eig.values, reference["eigs"][:2], strict=True):
        _close(got, expected, dtype)


def test_traces_and_density(reference):
    dtype = jnp.bfloat16
    obj, params, batch = _problem(dtype)
    H = sj.hessian(obj, params, batch)
    hutch = sj.hutchinson_trace(H, params, key=jax.random.PRNGKey(3), num_probes=8)
    assert hutch.value.dtype == jnp.float32
    _close(hutch.value, reference["hutchinson"], dtype)
    _close(sj.trace_exact(H, params), reference["trH"], dtype)
    C = sj.gradient_covariance(obj, params, batch)
    _close(sj.trace_exact(C, params), reference["trC"], dtype)
    gram = gradient_gram.exact_covariance_moments(obj, params, batch)
    assert gram.trace.dtype == jnp.float32
    _close(gram.trace, reference["trC"], dtype)
    density = sj.spectral_density(H, params, key=jax.random.PRNGKey(4), num_probes=4, num_iters=10)
    assert np.all(np.isfinite(np.asarray(density.density)))
    mean = float(np.trapezoid(density.grid * density.density, density.grid))
    _close(mean, reference["slq_mean"], dtype)


def _dot_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = set()

    def visit(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.update(str(v.aval.dtype) for v in eqn.invars)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    visit(getattr(inner, "jaxpr", inner))

    visit(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("name", ["hessian", "ggn", "fisher", "gradient_covariance"])
def test_products_stay_in_model_dtype(name):
    obj, params, batch = _problem(jnp.bfloat16)
    matvec = getattr(sj, name)(obj, params, batch, chunk_size=8)
    out = jax.eval_shape(matvec, params)
    assert {a.dtype for a in jax.tree_util.tree_leaves(out)} == {jnp.dtype(jnp.bfloat16)}
    assert _dot_dtypes(matvec, params) == {"bfloat16"}


def test_chunk_sums_accumulate_in_float32():
    # 1024 ones, one per chunk: a bfloat16 running sum would stop at 256 (= 2⁸).
    ones = jnp.ones((1024,), jnp.bfloat16)

    def chunk_fn(chunk, mask, index):
        del index
        return jnp.sum(jnp.where(mask, chunk, jnp.zeros_like(chunk)))

    total = sum_over_chunks(chunk_fn, ones, chunk_size=1)
    assert total.dtype == jnp.bfloat16
    assert float(total) == 1024.0
