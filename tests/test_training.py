"""Tests of the training loop: optimizers, stop rules, divergence, validation, measurements
against dense references, no recompilation, and exact resumption after SIGKILL."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from sharpness_jax import data, models, records, training

CHILD = pathlib.Path(__file__).with_name("training_child.py")

# A tiny 3-class problem shared by most tests (they then share compiled programs).
BASE = {
    "dataset": {
        "name": "gaussian_mixture",
        "num_train": 64,
        "num_test": 32,
        "input_dim": 4,
        "separation": 6.0,
    },
    "model": {"name": "mlp", "widths": (8,), "activation": "relu"},
    "optimizer": {"name": "gd", "learning_rate": 0.5},
    "max_steps": 20,
    "dtype": "float64",
    "measure": {"every": 5, "names": ("loss", "accuracy")},
    "checkpoint_every": 5,
    "log_every": 0,
}


def _merge(base, overrides):
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def config(**overrides):
    """BASE with nested overrides, e.g. config(optimizer={"name": "adam"}, max_steps=3)."""
    return training.resolve_config(_merge(BASE, overrides))


def losses(result):
    return np.array([row["train_loss"] for row in result.rows])


class _CompileLog:
    """Collects the names of the functions XLA compiles while active."""

    def __init__(self):
        self.names = []

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(kwargs.get("fun_name"))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def ours(self, names):
        return sorted(n for n in self.names if n in {f"jit({m})" for m in names})


# ------------------------------------------------------------------------------ optimizers


def test_gd_decreases_the_loss():
    result = training.train(config())
    assert result.status == "completed" and result.step == 20
    assert [row["step"] for row in result.rows] == [0, 5, 10, 15, 20]
    loss = losses(result)
    assert np.all(np.diff(loss) < 0) and loss[-1] < 0.5 * loss[0]
    assert result.rows[-1]["train_accuracy"] > result.rows[0]["train_accuracy"]
    assert result.metrics == result.rows[-1]
    assert result.workdir is None and result.resumed_from is None


@pytest.mark.parametrize("replace", [False, True])
def test_sgd_decreases_the_loss(replace):
    sgd = {
        "optimizer": {"name": "sgd"},
        "batch_size": 16,
        "max_steps": 40,
        "measure": {"every": 10},
    }
    result = training.train(config(**sgd, replace=replace))
    assert result.status == "completed"
    loss = losses(result)
    assert loss[-1] < 0.5 * loss[0]
    other = training.train(config(**sgd, replace=not replace))
    assert losses(other)[-1] != loss[-1]  # different batches, different trajectory


def test_every_classification_loss_trains_with_label_targets():
    # The softmax squared error (a mean over classes of squared probabilities) is much flatter.
    rates = {"squared_error_half": 0.1, "squared_error_sum": 0.05, "softmax_squared_error": 5.0}
    for name, rate in rates.items():
        result = training.train(config(loss={"name": name}, optimizer={"learning_rate": rate}))
        loss = losses(result)
        assert result.status == "completed" and loss[-1] < 0.9 * loss[0], name
        assert result.rows[-1]["train_accuracy"] > 0.5, name


def test_adam_and_momentum_decrease_the_loss():
    for name, lr in (("adam", 0.05), ("momentum", 0.1)):
        result = training.train(config(optimizer={"name": name, "learning_rate": lr}))
        loss = losses(result)
        assert loss[-1] < 0.5 * loss[0], name


def test_same_seed_same_metrics_in_memory_and_in_a_workdir(tmp_path):
    c = config(seed=4)
    in_memory = training.train(c)
    on_disk = training.train(c, tmp_path / "run")
    assert on_disk.rows == in_memory.rows
    assert records.read_metrics(tmp_path / "run") == in_memory.rows
    assert records.read_status(tmp_path / "run") == {"status": "completed", "step": 20}
    for a, b in zip(
        jax.tree.leaves(on_disk.params), jax.tree.leaves(in_memory.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    other_seed = training.train(config(seed=5))
    assert other_seed.rows[0]["train_loss"] != in_memory.rows[0]["train_loss"]


# ------------------------------------------------------------------------------ stop rules


def test_goals_stop_at_the_first_step_that_reaches_them():
    every_step = config(max_steps=40)
    every_step.measure.every = 1
    reference = training.train(every_step)
    loss = losses(reference)
    goal = float(np.quantile(loss, 0.5))
    first = int(np.argmax(loss <= goal))
    result = training.train(config(max_steps=40, train_loss_goal=goal, goal_every=1))
    assert result.status == "goal_reached" and result.step == first
    assert result.rows[-1]["step"] == first  # the final step is measured
    assert result.rows[-1]["train_loss"] == loss[first]

    accuracy = np.array([row["train_accuracy"] for row in reference.rows])
    target = float(accuracy[first])
    result = training.train(config(max_steps=40, train_accuracy_goal=target))  # at measurements
    stop = next(s for s in range(0, 41, 5) if accuracy[s] >= target)
    assert result.status == "goal_reached" and result.step == stop


def test_divergence_is_recorded_not_raised(tmp_path):
    c = config(optimizer={"learning_rate": 1e8}, max_steps=200)
    result = training.train(c, tmp_path)
    assert result.status == "diverged" and 0 < result.step < 200
    status = records.read_status(tmp_path)
    assert status["status"] == "diverged" and status["step"] == result.step
    assert "batch_loss" in status
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(result.params))
    # A rerun resumes from the last checkpoint and diverges at the same step.
    again = training.train(c, tmp_path)
    assert (again.status, again.step) == ("diverged", result.step)
    assert again.rows == result.rows

    limited = training.train(config(loss_limit=0.9 * result.rows[0]["train_loss"]))
    assert limited.status == "diverged" and limited.step == 0


# ------------------------------------------------------------------------------ workdir


def test_rerun_resumes_refuses_conflicts_and_extends(tmp_path):
    c = config(max_steps=10)
    first = training.train(c, tmp_path)
    assert first.status == "completed" and first.resumed_from is None
    # Nothing left to do: the rerun restores the final checkpoint and stops.
    again = training.train(c, tmp_path)
    assert again.resumed_from == 10 and again.rows == first.rows and again.traces == {}
    # A change that alters results is refused, before anything runs.
    with pytest.raises(records.ConfigMismatchError, match=r"optimizer\.learning_rate"):
        training.train(config(max_steps=10, optimizer={"learning_rate": 0.4}), tmp_path)
    # A longer budget continues the run: the rows equal those of one long run.
    longer = training.train(config(max_steps=20), tmp_path)
    assert longer.resumed_from == 10 and longer.step == 20
    assert longer.rows == training.train(config(max_steps=20)).rows
    assert records.read_config(tmp_path)["max_steps"] == 20


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
    with _CompileLog() as log, pytest.raises(ValueError, match=message):
        training.train(config(**overrides))
    assert log.ours(("train_step", "evaluate", *training.MEASUREMENTS)) == []


def test_regression_targets():
    c = {
        **BASE,
        "dataset": {"name": "teacher_student", "num_train": 32, "input_dim": 4},
        "loss": {"name": "squared_error_sum"},
        "optimizer": {"name": "gd", "learning_rate": 0.1},
    }
    result = training.train({**c, "measure": {"names": ("loss",), "every": 5}})
    loss = losses(result)
    assert np.all(np.diff(loss) < 0)
    with pytest.raises(ValueError, match="needs integer class labels"):
        training.train({**c, "measure": {"names": ("loss", "accuracy")}})
    with pytest.raises(ValueError, match="needs integer class labels"):
        training.train({**c, "train_accuracy_goal": 0.9})


def test_non_finite_data_is_refused(monkeypatch):
    real = data.load_dataset

    def with_nan(*args, **kwargs):
        ds = real(*args, **kwargs)
        x = ds.train.inputs.copy()
        x[3, 1] = np.nan
        return ds._replace(train=ds.train._replace(inputs=x))

    monkeypatch.setattr(training.data, "load_dataset", with_nan)
    with pytest.raises(ValueError, match=r"train data.* non-finite"):
        training.train(config())


def test_exact_methods_on_large_models_name_the_cheaper_route():
    info = training.RunInfo(10**6, 4096, 1000, 4096, 10, 32, True, 10_000, None)
    options = training._measurement_options("trace_hessian", {"method": "exact"})
    with pytest.raises(ValueError, match=r"P=1,000,000 .*hutchinson"):
        training.MEASUREMENTS["trace_hessian"].check(options, info)
    options = training._measurement_options("trace_gradient_covariance", {})
    with pytest.raises(ValueError, match="chunk_size"):
        training.MEASUREMENTS["trace_gradient_covariance"].check(options, info)
    training.MEASUREMENTS["trace_gradient_covariance"].check(options, info._replace(chunk_size=64))


# ------------------------------------------------------------------------------ optimizer


def test_learning_rate_schedules():
    c = config(
        max_steps=100,
        optimizer={
            "schedule": "cosine",
            "warmup_steps": 10,
            "end_factor": 0.1,
            "learning_rate": 2.0,
        },
    )
    assert training.resolve_config(c).optimizer.decay_steps == 100
    lr = training.learning_rate_schedule(c)
    np.testing.assert_allclose(float(lr(5)), 1.0)
    np.testing.assert_allclose(float(lr(10)), 2.0)
    np.testing.assert_allclose(float(lr(55)), 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi / 2)))
    np.testing.assert_allclose(float(lr(100)), 0.2)
    linear = training.learning_rate_schedule(config(optimizer={"schedule": "linear"}, max_steps=10))
    np.testing.assert_allclose(float(linear(5)), 0.25)
    assert training.learning_rate_schedule(config()) == 0.5


def test_weight_decay_decoupled_and_l2():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    wd = 0.1

    def updates(name, kind, steps=2):
        c = config(
            optimizer={
                "name": name,
                "learning_rate": 0.1,
                "weight_decay": wd,
                "weight_decay_type": kind,
            }
        )
        tx = training.make_optimizer(c)
        state = tx.init(params)
        for _ in range(steps):
            u, state = tx.update(grads, state, params)
        return u["w"]

    # SGD: both are θ ← θ − η(g + λθ).
    expected = -0.1 * (grads["w"] + wd * params["w"])
    np.testing.assert_allclose(updates("sgd", "l2"), expected)
    np.testing.assert_allclose(updates("sgd", "decoupled"), expected)
    # Adam: decoupled is AdamW; L2 passes λθ through the moments.
    adamw = training._standard_promotion(optax.adamw(0.1, weight_decay=wd))  # optax: not strict
    state = adamw.init(params)
    for _ in range(2):
        u, state = adamw.update(grads, state, params)
    np.testing.assert_allclose(updates("adam", "decoupled"), u["w"], rtol=1e-12)
    assert not np.allclose(updates("adam", "l2"), u["w"])
    # Momentum: the L2 term accumulates in the velocity, the decoupled one does not.
    np.testing.assert_allclose(
        updates("momentum", "decoupled"), -0.1 * (1.9 * grads["w"] + wd * params["w"])
    )
    np.testing.assert_allclose(
        updates("momentum", "l2"), -0.1 * 1.9 * (grads["w"] + wd * params["w"])
    )


def test_measurement_schedule():
    c = config(max_steps=100)
    c.measure.every = 0
    c.measure.steps = (7, 3)
    c.measure.num_log_steps = 5
    assert training.measurement_steps(c) == [0, 1, 3, 7, 10, 32, 100]
    c.measure.every = 40
    assert training.measurement_steps(c, up_to=50) == [0, 1, 3, 7, 10, 32, 40]


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


training.register_measurement("param_norm_for_tests", _param_norm, overwrite=True)

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
    c = training.resolve_config(TINY)  # label smoothing: a setup no other test uses
    c.measure.every = 3
    c.measure.names = MEASURED
    c.measure.options = {
        "lambda_max": {"k": 3, "num_iters": 31, "tol": None},
        "trace_hessian": {"method": "exact"},
    }
    jitted = ("train_step", "evaluate", *MEASURED)
    with _CompileLog() as log:
        result = training.train(c)
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
    with _CompileLog() as log:
        other = training.train({**c.to_dict(), "seed": 1, "max_steps": 9})
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
    chunked = training.train(c)
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


def test_registry_rejects_duplicates_and_collisions():
    with pytest.raises(ValueError, match="already registered"):
        training.register_measurement("loss", lambda ctx: {})

    @training.register_measurement("collides_with_loss", overwrite=True)
    def collides(ctx):
        return {"train_loss": 0.0}

    c = config(max_steps=0)
    c.measure.names = ("loss", "collides_with_loss")
    with pytest.raises(ValueError, match="'train_loss', which is taken"):
        training.train(c)


def test_mnist5k_smoke_in_float32(tmp_path):
    c = training.resolve_config(
        {
            "dataset": {"name": "mnist5k", "num_train": 256, "num_test": 100},
            "model": {"name": "mlp", "widths": (16,)},
            "optimizer": {"name": "sgd", "learning_rate": 0.1},
            "batch_size": 32,
            "max_steps": 20,
            "measure": {
                "every": 10,
                "names": ("loss", "accuracy", "lambda_max", "gradient_norm"),
                "options": {"lambda_max": {"k": 2, "num_iters": 10}},
            },
            "measure_subset": 128,
            "log_every": 10,
        }
    )
    result = training.train(c, tmp_path)
    assert result.status == "completed"
    assert [row["step"] for row in result.rows] == [0, 10, 20]
    for row in result.rows:
        assert all(np.isfinite(v) for k, v in row.items() if k not in ("step", "arrays"))
        assert row["lambda_max"] > 0
        top = records.load_arrays(tmp_path, row)["hessian_top_eigenvalues"]
        assert top.dtype == np.float32 and top[0] == np.float32(row["lambda_max"]) >= top[1]
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    assert jax.tree.leaves(result.params)[0].dtype == jnp.float32
    assert (tmp_path / "figures").is_dir() and (tmp_path / "checkpoints" / "20").is_dir()


# ------------------------------------------------------------------------------ SIGKILL

KILL_CONFIG = {
    "dataset": {"name": "gaussian_mixture", "num_train": 256, "num_test": 64, "input_dim": 8},
    "model": {"name": "mlp", "widths": [8]},
    "optimizer": {"name": "momentum", "learning_rate": 0.05},
    "batch_size": 32,
    "max_steps": 30,
    "measure": {
        "every": 5,
        "names": ["loss", "accuracy", "lambda_max", "kill_switch"],
        "options": {"lambda_max": {"num_iters": 10, "tol": None}},
    },
    "checkpoint_every": 10,
    "keep_checkpoints": 2,
    "measure_subset": 128,
    "log_every": 0,
    "dtype": "float64",
}


def _run_child(workdir, cache, kill=None):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    args = [sys.executable, str(CHILD), str(workdir), json.dumps(KILL_CONFIG)]
    return subprocess.run(
        args + ([kill] if kill else []), env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    cache = root / "compilation_cache"
    proc = _run_child(root / "reference", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, cache, (root / "reference" / records.METRICS_FILE).read_bytes()


@pytest.mark.parametrize("kill", ["step:13", "measure:15", "checkpoint:20"])
def test_sigkill_then_resume_reproduces_the_metrics_exactly(kill, reference_run):
    root, cache, expected = reference_run
    workdir = root / kill.replace(":", "_")
    proc = _run_child(workdir, cache, kill)
    assert proc.returncode == -9, proc.stderr[-3000:]
    rows = records.read_metrics(workdir)
    checkpoints = sorted(os.listdir(workdir / records.CHECKPOINT_DIR))
    if kill == "step:13":
        assert [r["step"] for r in rows] == [0, 5, 10] and checkpoints == ["0", "10"]
    elif kill == "measure:15":
        assert [r["step"] for r in rows] == [0, 5, 10]
    else:  # killed before the rename: step 20 exists only as a temporary directory
        assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
        assert "20" not in checkpoints
        assert any(name.startswith("20.") and "tmp" in name for name in checkpoints)
    assert records.read_status(workdir)["status"] == "running"

    proc = _run_child(workdir, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"status": "completed", "step": 30, "resumed_from": 10}
    assert (workdir / records.METRICS_FILE).read_bytes() == expected  # row for row, bit for bit
    assert records.read_status(workdir) == {"status": "completed", "step": 30}
