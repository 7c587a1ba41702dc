"""Training and measurements on a 4-device mesh equal the one-device run; one-off measures."""

import jax
import numpy as np
import pytest

import sharpness_jax as sj
from sharpness_jax import training
from sharpness_jax.config import default_config, validate_config


def _config(mesh):
    c = default_config()
    c.dataset.update(name="gaussian_mixture", num_train=64, num_test=32, input_dim=6)
    c.model.update(name="mlp", widths=(8,), activation="tanh")
    c.optimizer.update(name="sgd", learning_rate=0.1)
    c.batch_size = 16
    c.max_steps = 12
    c.dtype = "float64"
    c.chunk_size = 8
    c.measure.names = (
        "loss",
        "accuracy",
        "lambda_max",
        "trace_hessian",
        "batch_sharpness",
        "gni",
        "jacobian_norms",
        "trace_gradient_covariance",
    )
    c.measure.every = 6
    c.measure.options = {
        "trace_hessian": {"num_probes": 8},
        "batch_sharpness": {"max_draws": 40},
        "gni": {"num_probes": 4},
    }
    c.log_every = 0
    c.mesh = mesh
    return c


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_training_on_a_mesh_equals_one_device():
    single = training.train(_config(None))
    multi = training.train(_config(4))
    assert len(single.rows) == len(multi.rows) == 3
    for a, b in zip(single.rows, multi.rows, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-12, err_msg=k)
    sharding = jax.tree.leaves(multi.params)[0].sharding
    assert len(sharding.device_set) == 4 and sharding.is_fully_replicated


def test_mesh_validation():
    with pytest.raises(ValueError, match="mesh"):
        validate_config(_config(10_000))
    with pytest.raises(ValueError, match="mesh"):
        validate_config(_config("tpu"))


def test_measure_once_equals_the_training_row():
    c = _config(None)
    c.max_steps = 0
    run = training.train(c)
    row, arrays = training.measure(c)  # the initial params, step 0
    assert arrays == {}
    for k, v in run.rows[0].items():
        np.testing.assert_allclose(row[k], v, rtol=1e-12, err_msg=k)
    bad = jax.tree.map(lambda a: a[..., :1], run.params)
    with pytest.raises(ValueError, match="params"):
        training.measure(c, bad)
    assert sj.training.measure is training.measure
