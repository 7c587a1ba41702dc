"""Input–output Jacobian norms against dense jax.jacfwd references; the curvature terms
of the progressive-sharpening argument against dense loops; the Jacobian bound term."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import cnn_problem, mlp_problem, rel_err

from sharpness_jax import jacobian as jn

PROBLEMS = {
    "mlp": lambda: mlp_problem("tanh", n=7, d=4, widths=(5, 3)),  # D = 4 > K = 3: jacrev
    "mlp_narrow": lambda: mlp_problem("tanh", n=6, d=2, widths=(5, 3)),  # D = 2 < K: jacfwd
    "cnn": lambda: cnn_problem(n=5),  # images (4, 4, 1), D = 16
}


def reference_jacobians(prob, output):
    """(n, K, D) by jax.jacfwd of g(flat x) one example at a time."""
    xs = prob.batch.inputs
    jacs = []
    for p in range(prob.n):
        flat_x, unravel = ravel_pytree(xs[p])

        def g(z, unravel=unravel):
            out = prob.objective.predict(prob.params, unravel(z))
            return jax.nn.softmax(out) if output == "softmax" else out

        jacs.append(np.asarray(jax.jacfwd(g)(flat_x)))
    return np.stack(jacs)


@functools.partial(jax.jit, static_argnames=("predict", "outputs", "power"))
def all_exact(predict, params, inputs, outputs, power):
    out = {}
    for output in outputs:
        kw = {"output": output}
        out[output] = {
            "jac": jn.input_jacobians(predict, params, inputs, **kw),
            "fro": jn.jacobian_frobenius_norm(predict, params, inputs, per_example=True, **kw),
            "svd": jn.jacobian_spectral_norm(predict, params, inputs, per_example=True, **kw),
        }
        if power:
            out[output]["power"] = jn.jacobian_spectral_norm(
                predict,
                params,
                inputs,
                method="power",
                num_iters=3000,
                tol=1e-15,
                per_example=True,
                **kw,
            )
    return out


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_exact_norms_match_dense_jacobians(name):
    prob = PROBLEMS[name]()
    # Softmax outputs on one MLP; the CNN (image inputs, flattened) on logits only. Power
    # iteration on the MLPs: J Jᵀ on the outputs (K < D) and Jᵀ J on the inputs (K > D).
    outputs = jn.OUTPUTS if name == "mlp" else ("logits",)
    power = name != "cnn"
    results = all_exact(prob.objective.predict, prob.params, prob.batch.inputs, outputs, power)
    for output in outputs:
        ref = reference_jacobians(prob, output)
        res = results[output]
        np.testing.assert_allclose(res["jac"], ref, rtol=1e-10, atol=1e-14)
        fro = np.linalg.norm(ref, axis=(1, 2))
        spec = np.linalg.norm(ref, ord=2, axis=(1, 2))
        assert np.all(spec < fro * (1 - 1e-6))  # rank > 1: the two norms differ
        np.testing.assert_allclose(res["fro"].values, fro, rtol=1e-10)
        np.testing.assert_allclose(res["fro"].mean, fro.mean(), rtol=1e-10)
        np.testing.assert_allclose(res["fro"].max, fro.max(), rtol=1e-10)
        np.testing.assert_allclose(res["svd"].values, spec, rtol=1e-10)
        np.testing.assert_allclose(res["svd"].max, spec.max(), rtol=1e-10)
        assert res["fro"].stderr is None and res["svd"].num_probes is None
        if power:
            np.testing.assert_allclose(res["power"].values, spec, rtol=1e-7)
            assert np.all(res["power"].values <= spec * (1 + 1e-12))  # a lower bound


def test_chunked_equals_unchunked_and_per_example_is_optional():
    prob = PROBLEMS["mlp"]()
    predict, params, x = prob.objective.predict, prob.params, prob.batch.inputs
    key = jax.random.PRNGKey(3)

    @functools.partial(jax.jit, static_argnames="chunk_size")
    def run(params, x, chunk_size):
        kw = {"output": "softmax", "chunk_size": chunk_size, "per_example": True}
        return (
            jn.jacobian_frobenius_norm(predict, params, x, **kw),
            jn.jacobian_spectral_norm(predict, params, x, method="power", key=key, **kw),
            jn.jacobian_frobenius_squared_hutchinson(
                predict, params, x, key=key, num_probes=4, side="input", **kw
            ),
            jn.jacobian_frobenius_norm(predict, params, x, output="softmax"),
        )

    whole, chunked = run(params, x, None), run(params, x, 3)  # n = 7: a ragged chunk
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
        np.testing.assert_allclose(a.max, b.max, rtol=1e-12)
    for a, b in zip(whole[:3], chunked[:3], strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=1e-12)
    np.testing.assert_allclose(whole[2].values_stderr, chunked[2].values_stderr, rtol=1e-12)
    np.testing.assert_allclose(whole[2].stderr, chunked[2].stderr, rtol=1e-12)
    plain = whole[3]  # per_example=False keeps only the reductions
    assert plain.values is None and plain.stderr is None
    np.testing.assert_allclose(plain.mean, whole[0].mean, rtol=1e-12)


@pytest.mark.parametrize("side", ["input", "output"])
def test_hutchinson_within_five_standard_errors(side):
    prob = PROBLEMS["mlp"]()
    predict, params, x = prob.objective.predict, prob.params, prob.batch.inputs
    num_probes = 64

    @jax.jit
    def run(params, x, key):
        return [
            jn.jacobian_frobenius_squared_hutchinson(
                predict,
                params,
                x,
                key=key,
                num_probes=num_probes,
                side=side,
                output=o,
                per_example=True,
            )
            for o in jn.OUTPUTS
        ]

    for output, est in zip(jn.OUTPUTS, run(params, x, jax.random.PRNGKey(0)), strict=True):
        exact = np.sum(reference_jacobians(prob, output) ** 2, axis=(1, 2))
        assert est.num_probes == num_probes and float(est.stderr) > 0
        assert abs(float(est.mean) - exact.mean()) < 5 * float(est.stderr)
        assert np.all(np.abs(np.asarray(est.values) - exact) < 5 * np.asarray(est.values_stderr))
        np.testing.assert_allclose(
            est.stderr, np.sqrt(np.sum(np.asarray(est.values_stderr) ** 2)) / prob.n
        )
        # Informative: with 64 probes the standard error is well below the value.
        assert float(est.stderr) < 0.2 * exact.mean()


def test_float32_inputs_and_params():
    prob = PROBLEMS["mlp"]()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), prob.params)
    x = prob.batch.inputs.astype(jnp.float32)
    res = jax.jit(
        lambda p, x: jn.jacobian_frobenius_norm(prob.objective.predict, p, x, output="softmax")
    )(params, x)
    assert res.mean.dtype == jnp.float32
    ref = np.linalg.norm(reference_jacobians(prob, "softmax"), axis=(1, 2)).mean()
    np.testing.assert_allclose(res.mean, ref, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    prob = PROBLEMS["mlp"]()
    predict, params, x = prob.objective.predict, prob.params, prob.batch.inputs
    with pytest.raises(ValueError, match="output must be one of"):
        jn.jacobian_frobenius_norm(predict, params, x, output="probs")
    with pytest.raises(ValueError, match="method must be"):
        jn.jacobian_spectral_norm(predict, params, x, method="lanczos")
    with pytest.raises(ValueError, match="num_iters"):
        jn.jacobian_spectral_norm(predict, params, x, method="power", num_iters=0)
    with pytest.raises(ValueError, match="tol"):
        jn.jacobian_spectral_norm(predict, params, x, method="power", tol=-1.0)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_probes"):
        jn.jacobian_frobenius_squared_hutchinson(predict, params, x, key=key, num_probes=1)
    with pytest.raises(ValueError, match="side must be"):
        jn.jacobian_frobenius_squared_hutchinson(
            predict, params, x, key=key, num_probes=4, side="middle"
        )
    with pytest.raises(TypeError, match="floating-point inputs"):
        jn.jacobian_frobenius_norm(predict, params, jnp.ones((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="vector of shape"):
        jn.jacobian_frobenius_norm(lambda p, xi: predict(p, xi)[:, None], params, x)
    with pytest.raises(ValueError, match="scalar"):
        jn.input_jacobians(predict, params, jnp.ones((), jnp.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        jn.jacobian_frobenius_norm(predict, params, x, chunk_size=0)


# ---------------------------------------------------------------------------- curvature terms


def _dense_terms(problem):
    """‖Λ_p‖₂, λ_max(J_pᵀΛ_pJ_p) (D × D) and σ_max(J_p)² by a loop over examples."""
    predict, loss = problem.objective.predict, problem.objective.loss
    shape = problem.batch.inputs.shape[1:]
    jac_fn = jax.jit(jax.jacrev(lambda z: predict(problem.params, z.reshape(shape))))
    lam_fn = jax.jit(jax.hessian(lambda f, y: loss(f, y)))
    out_fn = jax.jit(lambda x: predict(problem.params, x))
    out = []
    for x, y in zip(problem.batch.inputs, problem.batch.targets, strict=True):
        jac = np.asarray(jac_fn(x.reshape(-1)))
        lam = np.asarray(lam_fn(out_fn(x), y))
        out.append(
            (
                np.linalg.eigvalsh(lam)[-1],
                np.linalg.eigvalsh(jac.T @ lam @ jac)[-1],
                np.linalg.svd(jac, compute_uv=False)[0] ** 2,
            )
        )
    return [np.array(v) for v in zip(*out, strict=True)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: mlp_problem("tanh", "cross_entropy"),  # D = 4 > K = 3: reverse mode
        lambda: mlp_problem("gelu", "cross_entropy", d=2),  # D = 2 ≤ K: forward mode
        lambda: mlp_problem("tanh", "squared_error_half"),  # Λ = I: κ_p = ‖J_p‖₂²
        lambda: cnn_problem(),  # image inputs (4, 4, 1), flattened
    ],
    ids=["mlp-ce-rev", "mlp-ce-fwd", "mlp-mse", "cnn-ce"],
)
def test_curvature_terms_match_dense(make):
    problem = make()
    terms = jax.jit(lambda p, b: jn.curvature_terms(problem.objective, p, b, chunk_size=3))
    got = terms(problem.params, problem.batch)
    want = _dense_terms(problem)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float64
        assert rel_err(np.asarray(g), w) < 1e-10
    if problem.objective.loss.name == "squared_error_half":
        assert rel_err(np.asarray(got.input_gauss_newton), want[2]) < 1e-10


def test_jacobian_bound_term():
    # C · M · (log n / n)^{1/d}
    assert jn.jacobian_bound_term(2.0, 100, 2) == pytest.approx(
        2.0 * math.sqrt(math.log(100) / 100), rel=1e-14
    )
    assert jn.jacobian_bound_term(1.5, 50, 1, constant=3.0) == pytest.approx(
        4.5 * math.log(50) / 50, rel=1e-14
    )
    values = [jn.jacobian_bound_term(1.0, n, 3) for n in (10, 100, 1000, 10_000)]
    assert all(a > b for a, b in itertools.pairwise(values))  # decays in n
    for bad in (
        dict(jacobian_norm=-1.0, num_examples=10, dimension=2),
        dict(jacobian_norm=1.0, num_examples=1, dimension=2),
        dict(jacobian_norm=1.0, num_examples=10, dimension=0),
        dict(jacobian_norm=math.nan, num_examples=10, dimension=2),
    ):
        with pytest.raises(ValueError):
            jn.jacobian_bound_term(**bad)
