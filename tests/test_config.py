"""The run config: validation before anything compiles (every section), the checks against
the data, the measurement schedule."""

import math

import pytest
from training_configs import CompileLog, config, train

from sharpness_jax.config import measurement_steps
from sharpness_jax.measurements import MEASUREMENTS

# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset": {"name": "imagenet"}}, "unknown dataset"),
        ({"model": {"name": "transformer"}}, "unknown model"),
        ({"optimizer": {"name": "lbfgs"}}, "unknown optimizer"),
        ({"loss": {"name": "hinge"}}, "unknown loss"),
        ({"measure": {"names": ("loss", "sharpness_of_the_moon")}}, "unknown measurement"),
        ({"optimizer": {"learning_rate": 0.0}}, "learning_rate must be a positive"),
        ({"optimizer": {"learning_rate": -0.1}}, "learning_rate must be a positive"),
        ({"batch_size": 65, "optimizer": {"name": "sgd"}}, "exceeds the 64 training"),
        ({"batch_size": 0}, "batch_size must be None"),
        ({"batch_size": 16}, "optimizer 'gd' is full-batch"),
        ({"max_steps": -1}, "max_steps must be a non-negative"),
        ({"measure": {"options": {"lambda_max": {"k": 2}}}}, "not in measure.names"),
        (
            {"measure": {"names": ("lambda_max",), "options": {"lambda_max": {"kk": 2}}}},
            "takes no option",
        ),
        (
            {
                "measure": {
                    "names": ("trace_hessian",),
                    "exact_param_limit": 50,
                    "options": {"trace_hessian": {"method": "exact"}},
                }
            },
            r"P=67 .*use method='hutchinson'",
        ),
        (
            {"measure": {"names": ("lambda_max",), "options": {"lambda_max": {"k": 100}}}},
            r"k must be an int in \[1, P=67\]",
        ),
        ({"loss": {"name": "squared_error_half", "label_smoothing": 0.1}}, "cross_entropy only"),
        ({"optimizer": {"schedule": "exponential"}}, "unknown optimizer.schedule"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"model": {"name": "mlp", "init_scale": math.inf}}, "non-finite"),
    ],
)
def test_invalid_configs_raise_before_training(overrides, message):
    with CompileLog() as log, pytest.raises(ValueError, match=message):
        train(config(**overrides))
    assert log.ours(("train_step", "evaluate", *MEASUREMENTS)) == []


def test_measurement_schedule():
    c = config(max_steps=100)
    c.measure.every = 0
    c.measure.steps = (7, 3)
    c.measure.num_log_steps = 5
    assert measurement_steps(c) == [0, 1, 3, 7, 10, 32, 100]
    c.measure.every = 40
    assert measurement_steps(c, up_to=50) == [0, 1, 3, 7, 10, 32, 40]
