"""Measurements of a batch-norm run compile once: the running statistics of each measured step
are leaves of the measured objective (arguments of the compiled programs), not constants.

The run's model is a tiny batch-norm net (Dense → BatchNorm → tanh → Dense) standing in for
the zoo's ResNet-18, whose 20 convolutions take a minute to compile: both are a
``resnet18.stateful_model`` of a linen module with a ``batch_stats`` collection, so the
training loop treats them alike."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_measurements import registered
from training_configs import CompileLog

import sharpness_jax as sj
from sharpness_jax import models, training
from sharpness_jax.config import resolve_config
from sharpness_jax.problem import problem_from_config
from sharpness_jax.programs import CompileCache
from sharpness_jax.resnet18 import stateful_model, with_state


class _TinyBatchNormNet(nn.Module):
    num_outputs: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, train: bool):
        dense = lambda k: nn.Dense(k, param_dtype=self.dtype, dtype=self.dtype)
        h = dense(3)(x)
        h = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            force_float32_reductions=False,
            param_dtype=self.dtype,
            dtype=self.dtype,
        )(h)
        return dense(self.num_outputs)(jnp.tanh(h))


@pytest.fixture
def tiny_batch_norm_model(monkeypatch):
    """The config's ``resnet18`` is the tiny batch-norm net while the test runs."""
    build = models.build_model

    def build_model(name, *, input_shape, num_outputs, param_dtype="float32", **options):
        if name != "resnet18":
            return build(name, input_shape=input_shape, num_outputs=num_outputs, **options)
        dtype = jnp.dtype(param_dtype)
        module = _TinyBatchNormNet(num_outputs, dtype)
        return stateful_model("resnet18", module, tuple(input_shape), num_outputs, dtype)

    monkeypatch.setattr(models, "build_model", build_model)


CONFIG = {
    "dataset": {"name": "gaussian_mixture", "num_train": 32, "num_test": 16, "input_dim": 4},
    "model": {"name": "resnet18"},
    "optimizer": {"name": "sgd", "learning_rate": 0.2},
    "batch_size": 8,
    "max_steps": 2,
    "measure": {
        "every": 1,
        "names": (
            "loss",
            "lambda_max",
            "gradient_norm",
            "trace_gradient_covariance",
            "closed_over_objective",
        ),
        "options": {"lambda_max": {"num_iters": 24, "tol": None}},
    },
    "log_every": 0,
    "dtype": "float64",
}

MEASURED = ("lambda_max", "gradient_norm", "trace_gradient_covariance")


def _closed_over_objective(ctx):
    """A user's measurement that closes over ``ctx.objective`` (no objective argument)."""
    objective = ctx.objective

    def loss(params, batch):
        return sj.loss_value(objective, params, batch)

    return {"closed_loss": ctx.jit(loss)(ctx.params, ctx.batch)}


def test_measurements_compile_once_across_the_measured_steps(tiny_batch_norm_model):
    with registered("closed_over_objective", _closed_over_objective), CompileLog() as log:
        result = training.train(CONFIG, cache=CompileCache())
    assert [row["step"] for row in result.rows] == [0, 1, 2]
    # Three measured steps, three different states: one trace for each measurement that
    # takes the objective as an argument; one per state for the one that closes over it.
    assert result.traces == {
        "train_step": 1,
        "evaluate": 2,
        **dict.fromkeys(MEASURED, 1),
        "closed_over_objective": 3,
    }
    assert log.ours(MEASURED) == sorted(f"jit({m})" for m in MEASURED)

    # The values are those of the eval-mode model at the statistics of the measured step.
    problem = problem_from_config(resolve_config(CONFIG))
    initial = problem.model.init(jax.random.PRNGKey(0))[1]
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), result.model_state, initial)
    assert max(jax.tree.leaves(moved)) > 1e-2
    batch = sj.Batch(*problem.dataset.train)
    flat, unravel = ravel_pytree(result.params)

    @jax.jit
    def dense(state):
        obj = sj.Objective(with_state(problem.model, state).predict, problem.objective.loss)
        hessian = jax.hessian(lambda f: jnp.mean(obj.batch_losses(unravel(f), batch)))(flat)
        grads = jax.vmap(jax.grad(obj.example_loss), in_axes=(None, 0, 0))(result.params, *batch)
        g = jax.vmap(lambda p: ravel_pytree(p)[0])(grads)
        return hessian, g, jnp.mean(obj.batch_losses(result.params, batch))

    def reference(state):
        hessian, g, loss = dense(state)
        return np.linalg.eigvalsh(np.asarray(hessian))[-1], np.asarray(g), float(loss)

    top, g, loss = reference(result.model_state)
    row = result.rows[-1]
    np.testing.assert_allclose(row["lambda_max"], top, rtol=1e-8)
    np.testing.assert_allclose(row["gradient_norm"], np.linalg.norm(g.mean(0)), rtol=1e-10)
    trace_c = np.mean(np.sum((g - g.mean(0)) ** 2, axis=1))
    np.testing.assert_allclose(row["trace_gradient_covariance"], trace_c, rtol=1e-10)
    np.testing.assert_allclose(row["closed_loss"], loss, rtol=1e-12)
    np.testing.assert_allclose(row["train_loss"], loss, rtol=1e-12)
    assert abs(reference(initial)[0] - top) > 1e-3 * top  # the statistics matter
