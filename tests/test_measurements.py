"""The measurements: the one table of built-in measurements (nothing registered on import),
the registry, the option checks, the built-in measurements against dense references, and what
MeasureContext hands a measurement (the step's batch and update)."""

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from training_configs import CompileLog, config, train

from sharpness_jax import data, minibatch, models
from sharpness_jax.config import measurement_options, resolve_config
from sharpness_jax.measurements import (
    BUILTIN_MEASUREMENTS,
    MEASUREMENTS,
    RunInfo,
    register_measurement,
)
from sharpness_jax.problem import problem_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The studies' measurements, built in like the training loop's own.
STUDY_MEASUREMENTS = (
    "batch_sharpness",
    "batch_lambda_max",
    "gni",
    "gradient_rayleigh",
    "jacobian_norms",
    "riemannian_sharpness",
    "progressive_sharpening_curvature",
    "progressive_sharpening_unsmoothed_loss",
    "quotient_geometry",
    "preconditioned_sharpness",
    "worst_case_sharpness",
    "average_sharpness",
    "loss_slice",
    "takeuchi_information_criterion",
    "full_riemannian_sharpness",
    "natural_gradient",
    "m_sharpness",
    "relative_flatness",
    "lambda_max_gradient",
)


def test_the_table_holds_every_builtin_and_nothing_registers_on_import():
    names = [m.name for m in BUILTIN_MEASUREMENTS]
    assert len(set(names)) == len(names)
    assert {
        "loss",
        "accuracy",
        "lambda_max",
        "trace_hessian",
        "trace_gradient_covariance",
        "gradient_norm",
        *STUDY_MEASUREMENTS,
    } == set(names)
    for m in BUILTIN_MEASUREMENTS:
        assert MEASUREMENTS[m.name] is m
    # Importing the whole package, the experiments and every study leaves the table as it is.
    code = (
        "import importlib, sharpness_jax, experiments.measure, experiments.reproduce\n"
        "from experiments.studies import STUDIES\n"
        "for s in STUDIES: importlib.import_module(f'experiments.studies.{s}')\n"
        "from sharpness_jax.measurements import BUILTIN_MEASUREMENTS, MEASUREMENTS\n"
        "assert list(MEASUREMENTS) == [m.name for m in BUILTIN_MEASUREMENTS], list(MEASUREMENTS)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_exact_methods_on_large_models_name_the_cheaper_route():
    info = RunInfo(10**6, 4096, 1000, 4096, 10, 32, True, 10_000, None)
    options = measurement_options("trace_hessian", {"method": "exact"})
    with pytest.raises(ValueError, match=r"P=1,000,000 .*hutchinson"):
        MEASUREMENTS["trace_hessian"].check(options, info)
    # Exact tr(C): its memory depends on the route (gradient_gram.covariance_trace checks it);
    # the option check takes the method and top_k.
    options = measurement_options("trace_gradient_covariance", {})
    MEASUREMENTS["trace_gradient_covariance"].check(options, info)
    for bad in ({"top_k": -1}, {"top_k": 5000}, {"top_k": 2, "method": "hutchinson"}):
        options = measurement_options("trace_gradient_covariance", bad)
        with pytest.raises(ValueError, match="top_k"):
            MEASUREMENTS["trace_gradient_covariance"].check(options, info)


# ------------------------------------------------------------------------------ measurements


def _param_norm(ctx):
    flat = ravel_pytree(ctx.params)[0]
    calls = ctx.state.get("calls", jnp.zeros_like(flat[:1]))
    ctx.state["calls"] = calls + 1
    return {
        "param_norm": jnp.linalg.norm(flat),
        "param_norm_calls": calls[0],
        "param_abs": jnp.abs(flat),
    }


@contextlib.contextmanager
def registered(name, fn, **kwargs):
    """``fn`` registered under ``name`` while the block runs."""
    register_measurement(name, fn, **kwargs)
    try:
        yield
    finally:
        del MEASUREMENTS[name]


TINY = {
    "dataset": {"name": "gaussian_mixture", "num_train": 48, "num_test": 24, "input_dim": 3},
    "model": {"name": "mlp", "widths": (4,), "activation": "tanh"},
    "loss": {"name": "cross_entropy", "label_smoothing": 0.1},
    "optimizer": {"name": "gd", "learning_rate": 0.3},
    "max_steps": 6,
    "dtype": "float64",
    "log_every": 0,
}


def _dense_reference(params):
    """Loss, accuracy, H and per-example gradients of TINY at ``params``, the obvious way."""
    ds = data.load_dataset(
        "gaussian_mixture", num_train=48, num_test=24, input_dim=3, dtype="float64"
    )
    model = models.build_model(
        "mlp",
        input_shape=(3,),
        num_outputs=3,
        widths=(4,),
        activation="tanh",
        param_dtype="float64",
    )
    theta, unravel = ravel_pytree(params)
    x, y = jnp.asarray(ds.train.inputs), jnp.asarray(ds.train.targets)

    def example_loss(t, xi, yi):
        q = optax.smooth_labels(jax.nn.one_hot(yi, 3, dtype=jnp.float64), 0.1)
        return optax.softmax_cross_entropy(model.predict(unravel(t), xi), q)

    @jax.jit
    def reference(t):
        mean_loss = lambda t: jnp.mean(jax.vmap(example_loss, (None, 0, 0))(t, x, y))
        logits = jax.vmap(model.predict, (None, 0))(unravel(t), x)
        grads = jax.vmap(jax.grad(example_loss), (None, 0, 0))(t, x, y)
        return mean_loss(t), logits, jax.hessian(mean_loss)(t), grads

    loss, logits, hessian, grads = map(np.asarray, reference(theta))
    return {
        "loss": float(loss),
        "accuracy": float(np.mean(np.argmax(logits, 1) == ds.train.targets)),
        "hessian": hessian,
        "grads": grads,
        "theta": np.asarray(theta),
    }


MEASURED = (
    "loss",
    "accuracy",
    "lambda_max",
    "trace_hessian",
    "trace_gradient_covariance",
    "gradient_norm",
    "param_norm_for_tests",
)


def test_measurements_match_dense_references_and_compile_once():
    c = resolve_config(TINY)  # label smoothing: a setup no other test uses
    c.measure.every = 3
    c.measure.names = MEASURED
    c.measure.options = {
        "lambda_max": {"k": 3, "num_iters": 31, "tol": None},
        "trace_hessian": {"method": "exact"},
    }
    jitted = ("train_step", "evaluate", *MEASURED)
    with registered("param_norm_for_tests", _param_norm), CompileLog() as log:
        result = train(c)
    # Three measurement steps, six updates: each function compiled once (evaluate once per
    # split), the warm-started Lanczos included.
    assert log.ours(jitted) == sorted(
        [
            "jit(train_step)",
            "jit(evaluate)",
            "jit(evaluate)",
            "jit(lambda_max)",
            "jit(trace_hessian)",
            "jit(trace_gradient_covariance)",
            "jit(gradient_norm)",
        ]
    )
    assert result.traces == {
        "train_step": 1,
        "evaluate": 2,
        "lambda_max": 1,
        "trace_hessian": 1,
        "trace_gradient_covariance": 1,
        "gradient_norm": 1,
    }
    # Another seed, more steps: nothing is compiled again.
    with registered("param_norm_for_tests", _param_norm), CompileLog() as log:
        other = train({**c.to_dict(), "seed": 1, "max_steps": 9})
    assert log.ours(jitted) == [] and other.traces == {}

    assert [row["step"] for row in result.rows] == [0, 3, 6]
    row = result.rows[-1]  # measured at the final parameters
    ref = _dense_reference(result.params)
    assert ref["theta"].size == 31
    eig = np.linalg.eigvalsh(ref["hessian"])[::-1]
    g = ref["grads"]
    np.testing.assert_allclose(row["train_loss"], ref["loss"], rtol=1e-12)
    assert row["train_accuracy"] == ref["accuracy"]
    np.testing.assert_allclose(row["lambda_max"], eig[0], rtol=1e-9)
    np.testing.assert_allclose(result.arrays[6]["hessian_top_eigenvalues"], eig[:3], rtol=1e-8)
    np.testing.assert_allclose(row["trace_hessian"], np.trace(ref["hessian"]), rtol=1e-10)
    trace_c = np.mean(np.sum((g - g.mean(0)) ** 2, axis=1))
    np.testing.assert_allclose(row["trace_gradient_covariance"], trace_c, rtol=1e-10)
    np.testing.assert_allclose(row["gradient_norm"], np.linalg.norm(g.mean(0)), rtol=1e-10)
    # The registered measurement: scalars in the row, arrays beside it, state carried along.
    np.testing.assert_allclose(row["param_norm"], np.linalg.norm(ref["theta"]), rtol=1e-12)
    np.testing.assert_array_equal(result.arrays[6]["param_abs"], np.abs(ref["theta"]))
    assert [r["param_norm_calls"] for r in result.rows] == [0, 1, 2]

    # Chunked training and measurements, and the stochastic routes: the same training rows,
    # and trace estimates within 5 standard errors of the exact values.
    c.chunk_size = 10
    c.measure.names = ("loss", "trace_hessian", "trace_gradient_covariance")
    c.measure.options = {
        "trace_hessian": {"num_probes": 200},
        "trace_gradient_covariance": {"method": "hutchinson", "num_probes": 200},
    }
    chunked = train(c)
    for a, b in zip(chunked.rows, result.rows, strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-12)
        np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-12)
    row = chunked.rows[-1]
    for name, exact in (
        ("trace_hessian", np.trace(ref["hessian"])),
        ("trace_gradient_covariance", trace_c),
    ):
        assert 0 < row[f"{name}_stderr"] < 0.2 * abs(exact)
        assert abs(row[name] - exact) < 5 * row[f"{name}_stderr"], name


def test_covariance_top_eigenvalues_match_the_dense_covariance():
    """trace_gradient_covariance with top_k: λ_1..λ_k of C from the Gram route (float64)."""
    from sharpness_jax.training import measure

    c = resolve_config(TINY)
    c.measure.names = ("trace_gradient_covariance",)
    c.measure.options = {"trace_gradient_covariance": {"top_k": 3}}
    c.chunk_size = 20
    params = problem_from_config(c).model.init(jax.random.PRNGKey(4))
    row, arrays = measure(c, params)
    g = _dense_reference(params)["grads"]
    centred = g - g.mean(0)
    eig = np.linalg.eigvalsh(centred.T @ centred / len(g))[::-1]
    np.testing.assert_allclose(row["trace_gradient_covariance"], eig.sum(), rtol=1e-10)
    np.testing.assert_allclose(row["gradient_covariance_lambda_max"], eig[0], rtol=1e-10)
    np.testing.assert_allclose(arrays["gradient_covariance_top_eigenvalues"], eig[:3], rtol=1e-9)


def test_registry_rejects_duplicates_and_collisions():
    with pytest.raises(ValueError, match="already registered"):
        register_measurement("loss", lambda ctx: {})

    def collides(ctx):
        return {"train_loss": 0.0}

    c = config(max_steps=0)
    c.measure.names = ("loss", "collides_with_loss")
    with (
        registered("collides_with_loss", collides),
        pytest.raises(ValueError, match="'train_loss', which is taken"),
    ):
        train(c)


def _step_probe(ctx):
    """The update and batch the context hands over, and the parameters they start from."""
    step = ctx.update()
    n = ctx.info.num_train
    indices = np.arange(n) if ctx.batch_indices is None else ctx.batch_indices
    return {
        "probe_params": ravel_pytree(ctx.params)[0],
        "probe_update": ravel_pytree(step.update)[0],
        "probe_gradient": ravel_pytree(step.gradient)[0],
        "probe_loss": step.loss,
        "probe_indices": jnp.asarray(indices),
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": {"name": "sgd", "weight_decay": 0.1}, "batch_size": 16},
        {"optimizer": {"name": "sgd"}, "batch_size": 16, "replace": True},
        {"optimizer": {"name": "momentum", "learning_rate": 0.1}, "batch_size": 16},
        {"optimizer": {"name": "adam", "learning_rate": 0.05, "weight_decay": 0.01}},
    ],
    ids=["sgd-wd", "sgd-replace", "momentum", "adamw-full-batch"],
)
def test_the_context_hands_over_the_step_training_takes(overrides):
    c = config(max_steps=4, **overrides)
    c.measure.every = 1
    c.measure.names = ("step_probe_for_tests",)
    with registered("step_probe_for_tests", _step_probe):
        result = train(c)
    arrays = result.arrays
    n, b = 64, c.batch_size or 64
    sampler = None if b == n else minibatch.Sampler(n, b, replace=c.replace, seed=c.seed)
    for s in range(4):
        want = np.arange(n) if sampler is None else sampler.indices(s)
        np.testing.assert_array_equal(arrays[s]["probe_indices"], want)
        # θ_{s+1} = θ_s + u_s: the update is the one the loop applied (same batch, same state).
        step = arrays[s + 1]["probe_params"] - arrays[s]["probe_params"]
        np.testing.assert_allclose(arrays[s]["probe_update"], step, rtol=1e-10, atol=1e-14)
    # The gradient is that of the mini-batch mean loss at θ_s.
    ds, model, _ = problem_from_config(c)
    theta0, unravel = ravel_pytree(model.init(jax.random.fold_in(jax.random.PRNGKey(0), 1)))
    np.testing.assert_allclose(theta0, arrays[0]["probe_params"], rtol=1e-15)
    idx = arrays[0]["probe_indices"]
    x, y = jnp.asarray(ds.train.inputs)[idx], jnp.asarray(ds.train.targets)[idx]

    def batch_loss(t):
        logits = jax.vmap(model.predict, (None, 0))(unravel(t), x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    gradient = jax.grad(batch_loss)(theta0)
    np.testing.assert_allclose(arrays[0]["probe_gradient"], gradient, rtol=1e-10)
    np.testing.assert_allclose(result.rows[0]["probe_loss"], batch_loss(theta0), rtol=1e-12)
