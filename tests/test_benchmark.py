"""The benchmark's model rows and GPU suite (experiments.benchmark_models) on tiny sizes."""

import math

import jax
import pytest

from experiments import benchmark, benchmark_models

_MODEL_ROWS = (
    "gradient_s",
    "hessian_x_grad",
    "ggn_x_grad",
    "gradient_covariance_x_grad",
    "per_example_grads_x_grad",
    "lambda_max_cold_grad_equivalents",
    "lambda_max",
)


def _check_model_rows(rows, keys=_MODEL_ROWS):
    for key in keys:
        assert math.isfinite(rows[key]) and rows[key] > 0, key
    assert rows["chunk_size"] == 4 < rows["n"]  # two chunks: the chunked route is timed


# Two parts, which pytest-xdist runs side by side: the small GPU suite on the GPT LM and W1,
# and the benchmark's ResNet-18 rows (the suite's ResNet-18 workload adds the per-example
# gradients and λ_max, run here on the GPT LM).


def test_gpu_suite_small_gpt_and_w1():
    result = benchmark_models.gpu_suite(
        repeats=1, chunk=4, small=True, workloads=("gpt", "w1"), w1_eigen=False
    )
    assert result["devices"] == [str(d) for d in jax.devices()]
    _check_model_rows(result["gpt"])
    assert math.isfinite(result["w1_n64"]["gradient_covariance_x_grad"])
    assert result["gpu_suite_wall_s"] > 0 and result["targets"] == {}  # small: no targets
    table = benchmark_models.markdown(result)
    assert "| quantity | gpt | w1_n64 |" in table and "| hessian_x_grad |" in table
    with pytest.raises(ValueError, match="unknown workload"):
        benchmark_models.gpu_suite(repeats=1, chunk=4, small=True, workloads=("w2",))


def test_resnet18_rows_small():
    result = benchmark_models.model_rows(repeats=1, chunk=4, small=True, workloads=("resnet18",))
    _check_model_rows(result["resnet18"], _MODEL_ROWS[:4])
    assert result["resnet18"]["num_params"] > 10_000  # all 17 convolutions, at width 1/32


def test_targets_of_the_model_rows_and_the_suite():
    checks = benchmark_models.target_checks(
        {
            "resnet18": {"hessian_x_grad": 2.0, "ggn_x_grad": 3.5, "n": 16},
            "gpt": {"gradient_covariance_x_grad": 3.0},
            "w1_n8192": {"hessian_x_grad": 2.6},
            "gpu_suite": {"wall_s": 481.0},
        }
    )
    assert {k: v["met"] for k, v in checks.items()} == {
        "resnet18_hessian_x_grad": True,
        "resnet18_ggn_x_grad": False,
        "gpt_gradient_covariance_x_grad": True,
        "w1_n8192_hessian_x_grad": False,  # W1's own target, 2.5×
        "gpu_suite_wall_s": False,
    }
    assert checks["gpu_suite_wall_s"]["target"] == benchmark.TARGETS["gpu_suite_wall_s"][0]
    # The benchmark's own table lists the model rows with their targets.
    table = benchmark.markdown({"w1": {"gradient_s": 1.0}, "gpt": {"hessian_x_grad": 2.0}})
    assert "| hessian_x_grad (gpt) | 2 | | ≤ 3 × gradient |" in table
