"""The perturbation and preconditioned measurements in a training run equal the library's
functions called on the run's final parameters and optimizer state."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from training_configs import config, train

import sharpness_jax as sj
from sharpness_jax import preconditioned, worst_case
from sharpness_jax.problem import problem_from_config

NAMES = (
    "loss",
    "preconditioned_sharpness",
    "worst_case_sharpness",
    "average_sharpness",
    "loss_slice",
)


def test_measured_values_equal_the_library_calls():
    c = config(
        optimizer={"name": "adam", "learning_rate": 0.01},
        max_steps=6,
        measure={"every": 3, "names": NAMES, "options": {"loss_slice": {"num_points": 5}}},
    )
    result = train(c)
    row, arrays = result.rows[-1], result.arrays[6]
    problem = problem_from_config(c)
    batch = sj.Batch(
        jnp.asarray(problem.dataset.train.inputs), jnp.asarray(problem.dataset.train.targets)
    )
    diag = preconditioned.adam_preconditioner(
        result.opt_state, b2=c.optimizer.b2, eps=c.optimizer.eps
    )
    top = preconditioned.preconditioned_lambda_max(
        problem.objective, result.params, batch, diag, num_iters=50, tol=1e-6
    )
    np.testing.assert_allclose(row["preconditioned_sharpness"], top.values[0], rtol=1e-8)
    assert row["adaptive_stability_threshold"] == pytest.approx(38 / 0.01)
    wc = worst_case.worst_case_sharpness(problem.objective, result.params, batch, rho=0.05)
    np.testing.assert_allclose(row["worst_case_sharpness"], wc.sharpness, rtol=1e-8)
    assert row["average_sharpness_stderr"] > 0
    assert np.isfinite(row["average_sharpness"])
    np.testing.assert_allclose(arrays["loss_slice_alphas"], np.linspace(-1, 1, 5))
    middle = sj.loss_value(problem.objective, result.params, batch)
    np.testing.assert_allclose(arrays["loss_slice_values"][2], middle, rtol=1e-10)


def test_bad_options_and_optimizers_are_refused():
    with pytest.raises(ValueError, match="rho"):
        train(
            config(
                measure={
                    "names": ("worst_case_sharpness",),
                    "options": {"worst_case_sharpness": {"rho": -1.0}},
                }
            )
        )
    with pytest.raises(ValueError, match="adam"):
        train(config(max_steps=1, measure={"names": ("preconditioned_sharpness",)}))


def test_inverse_curvature_measurements_match_dense_references():
    """TIC tr((H + λI)⁻¹C) and tr, λ_max of (F + λI)⁻¹H in a run, against dense float64
    matrices at the run's final parameters: the traces within 5 standard errors (Hutchinson),
    λ_max exactly (the Lanczos basis spans all P = 67 directions)."""
    damping = 1e-2
    options = {"damping": damping, "num_probes": 40, "tol": 1e-10, "max_iters": 500}
    c = config(
        max_steps=4,
        measure={
            "every": 4,
            "names": ("takeuchi_information_criterion", "full_riemannian_sharpness"),
            "options": {
                # H + λI is indefinite and nearly singular here: GMRES without restarts
                "takeuchi_information_criterion": {**options, "restart": 100},
                "full_riemannian_sharpness": {**options, "num_iters": 100},
            },
        },
    )
    result = train(c)
    row = result.rows[-1]
    problem = problem_from_config(c)
    batch = sj.Batch(
        jnp.asarray(problem.dataset.train.inputs), jnp.asarray(problem.dataset.train.targets)
    )
    o, p = problem.objective, result.params
    h, cov, f = (
        np.asarray(sj.dense(op(o, p, batch), p))
        for op in (sj.hessian, sj.gradient_covariance, sj.fisher)
    )
    eye = damping * np.eye(h.shape[0])
    tic = np.trace(np.linalg.solve(h + eye, cov))
    assert (
        abs(row["takeuchi_information_criterion"] - tic)
        < 5 * row["takeuchi_information_criterion_stderr"]
    )
    m = np.linalg.solve(f + eye, h)
    assert abs(row["riemannian_trace_full"] - np.trace(m)) < 5 * row["riemannian_trace_full_stderr"]
    top = np.max(np.linalg.eigvals(m).real)
    np.testing.assert_allclose(row["riemannian_lambda_max_full"], top, rtol=1e-6)


def test_inverse_curvature_options_are_checked():
    for name, key in (
        ("takeuchi_information_criterion", "damping"),
        ("full_riemannian_sharpness", "num_iters"),
    ):
        bad = {key: 0}
        with pytest.raises(ValueError, match=key):
            train(config(measure={"names": (name,), "options": {name: bad}}))


def test_natural_gradient_measurement_matches_the_dense_solve():
    """x = (F + λI)⁻¹ḡ in a run (K-FAC-preconditioned CG), against the dense float64 solve at
    the run's final parameters."""
    damping = 1e-2
    options = {"damping": damping, "preconditioner": "kfac", "tol": 1e-12, "max_iters": 500}
    c = config(
        max_steps=4,
        measure={
            "every": 4,
            "names": ("natural_gradient",),
            "options": {"natural_gradient": options},
        },
    )
    result = train(c)
    row = result.rows[-1]
    problem = problem_from_config(c)
    batch = sj.Batch(
        jnp.asarray(problem.dataset.train.inputs), jnp.asarray(problem.dataset.train.targets)
    )
    o, p = problem.objective, result.params
    f = np.asarray(sj.dense(sj.fisher(o, p, batch), p))
    g = np.asarray(ravel_pytree(sj.gradient(o, p, batch))[0])
    x = np.linalg.solve(f + damping * np.eye(f.shape[0]), g)
    np.testing.assert_allclose(row["natural_gradient_norm"], np.linalg.norm(x), rtol=1e-8)
    np.testing.assert_allclose(row["natural_gradient_inner"], g @ x, rtol=1e-8)
    cosine = g @ x / (np.linalg.norm(g) * np.linalg.norm(x))
    np.testing.assert_allclose(row["natural_gradient_cosine"], cosine, rtol=1e-8)
    assert row["natural_gradient_converged"] is True
    assert 1 <= row["natural_gradient_num_iters"] <= 500
    assert row["natural_gradient_residual_norm"] < 1e-8 * np.linalg.norm(g)


def test_natural_gradient_options_are_checked():
    for key, bad in (("preconditioner", "kfca"), ("fisher", "monte_carlo"), ("damping", 0)):
        options = {"natural_gradient": {key: bad}}
        with pytest.raises(ValueError, match=key):
            train(config(measure={"names": ("natural_gradient",), "options": options}))


def test_m_sharpness_relative_flatness_and_lambda_max_gradient_measurements():
    names = ("loss", "m_sharpness", "relative_flatness", "lambda_max_gradient")
    c = config(max_steps=3, measure={"every": 3, "names": names})
    result = train(c)
    row = result.rows[-1]
    problem = problem_from_config(c)
    batch = sj.Batch(
        jnp.asarray(problem.dataset.train.inputs), jnp.asarray(problem.dataset.train.targets)
    )
    obj, params = problem.objective, result.params
    m = worst_case.m_sharpness(obj, params, batch, m=16, rho=0.05)
    np.testing.assert_allclose(row["m_sharpness"], m, rtol=1e-8)
    # The default layer is the output layer's kernel.
    kappa = worst_case.relative_flatness(obj, params, batch, kernel="params/Dense_1/kernel")
    np.testing.assert_allclose(row["relative_flatness"], kappa, rtol=1e-10)
    dense = np.asarray(sj.linalg.dense(sj.hessian(obj, params, batch), params))
    top = np.linalg.eigvalsh(dense)[-1]
    np.testing.assert_allclose(row["lambda_max_gradient_value"], top, rtol=1e-8)
    grad = preconditioned.lambda_max_gradient(obj, params, batch).gradient
    g = ravel_pytree(sj.gradient(obj, params, batch))[0]
    d = ravel_pytree(grad)[0]
    np.testing.assert_allclose(row["lambda_max_gradient_norm"], np.linalg.norm(d), rtol=1e-6)
    cosine = float(d @ g / (np.linalg.norm(d) * np.linalg.norm(g)))
    np.testing.assert_allclose(row["lambda_max_gradient_cosine"], cosine, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("m_sharpness", {"m": 5}, "must divide the measurement batch of 64"),
        ("m_sharpness", {"rho": 0.0}, "rho"),
        ("relative_flatness", {"kernel": 3}, "kernel must be a parameter path"),
        ("lambda_max_gradient", {"num_iters": 1}, "num_iters"),
    ],
)
def test_new_perturbation_options_are_checked(name, options, match):
    with pytest.raises(ValueError, match=match):
        train(config(max_steps=1, measure={"names": (name,), "options": {name: options}}))
