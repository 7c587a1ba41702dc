"""Config → problem: the dataset, model and objective of a run config are the ones training
trains and measures (dtype, model options, label smoothing)."""

import jax
import numpy as np
from training_configs import train

from sharpness_jax import operators
from sharpness_jax.config import resolve_config
from sharpness_jax.objective import Batch, Objective, get_loss
from sharpness_jax.problem import problem_from_config

SMOOTHED = {
    "dataset": {"name": "gaussian_mixture", "num_train": 40, "num_test": 20, "input_dim": 3},
    "model": {"name": "mlp", "widths": (5,), "activation": "tanh", "param_dtype": "float64"},
    "loss": {"name": "cross_entropy", "label_smoothing": 0.2},
    "optimizer": {"name": "gd", "learning_rate": 0.1},
    "max_steps": 0,
    "dtype": "float64",
    "measure": {"names": ("loss",)},
    "log_every": 0,
}


def test_the_problem_is_what_training_trains_and_measures():
    c = resolve_config(SMOOTHED)
    problem = problem_from_config(c)
    assert problem.dataset.train.inputs.dtype == np.float64
    params = problem.model.init(jax.random.fold_in(jax.random.PRNGKey(c.seed), 1))
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(params))
    assert shapes == [(3,), (3, 5), (5,), (5, 3)]  # the config's widths and the data's sizes
    assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(params))
    train_batch = Batch(*problem.dataset.train)
    loss = float(operators.loss_value(problem.objective, params, train_batch))
    run = train(c)  # step 0 measures the initial parameters
    np.testing.assert_allclose(run.rows[0]["train_loss"], loss, rtol=1e-12)
    # Label smoothing is part of the objective.
    plain = Objective(problem.objective.predict, get_loss("cross_entropy"))
    assert abs(float(operators.loss_value(plain, params, train_batch)) - loss) > 1e-3


def test_dataset_options_and_dtype_come_from_the_config():
    c = {
        "dataset": {"name": "gaussian_mixture", "num_train": 12, "num_test": 6, "input_dim": 2},
        "model": {"name": "mlp", "widths": (7, 4)},
        "dtype": "float32",
    }
    problem = problem_from_config(c)
    assert problem.dataset.train.inputs.shape == (12, 2)
    assert problem.dataset.test.inputs.shape == (6, 2)
    assert problem.dataset.train.inputs.dtype == np.float32
    params = problem.model.init(jax.random.PRNGKey(0))
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(params) if leaf.ndim == 2)
    assert shapes == [(2, 7), (4, problem.dataset.num_classes), (7, 4)]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
