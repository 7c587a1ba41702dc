"""The perturbation and preconditioned measurements in a training run equal the library's
functions called on the run's final parameters and optimizer state."""

import jax.numpy as jnp
import numpy as np
import pytest
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
