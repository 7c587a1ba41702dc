"""Tests of the training loop: optimizers, stop rules, divergence, resumption, regression
targets, non-finite data, and exact resumption after SIGKILL."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_configs import BASE, config, losses, train

from sharpness_jax import data, records, run_records, training
from sharpness_jax.config import resolve_config

CHILD = pathlib.Path(__file__).with_name("training_child.py")


# ------------------------------------------------------------------------------ optimizers


def test_gd_decreases_the_loss():
    result = train(config())
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
    result = train(config(**sgd, replace=replace))
    assert result.status == "completed"
    loss = losses(result)
    assert loss[-1] < 0.5 * loss[0]
    other = train(config(**sgd, replace=not replace))
    assert losses(other)[-1] != loss[-1]  # different batches, different trajectory


def test_every_classification_loss_trains_with_label_targets():
    # The softmax squared error (a mean over classes of squared probabilities) is much flatter.
    rates = {"squared_error_half": 0.1, "squared_error_sum": 0.05, "softmax_squared_error": 5.0}
    for name, rate in rates.items():
        result = train(config(loss={"name": name}, optimizer={"learning_rate": rate}))
        loss = losses(result)
        assert result.status == "completed" and loss[-1] < 0.9 * loss[0], name
        assert result.rows[-1]["train_accuracy"] > 0.5, name


def test_adam_and_momentum_decrease_the_loss():
    for name, lr in (("adam", 0.05), ("momentum", 0.1)):
        result = train(config(optimizer={"name": name, "learning_rate": lr}))
        loss = losses(result)
        assert loss[-1] < 0.5 * loss[0], name


def test_same_seed_same_metrics_in_memory_and_in_a_workdir(tmp_path):
    c = config(seed=4)
    in_memory = train(c)
    on_disk = train(c, tmp_path / "run")
    assert on_disk.rows == in_memory.rows
    assert records.read_metrics(tmp_path / "run") == in_memory.rows
    assert records.read_status(tmp_path / "run") == {"status": "completed", "step": 20}
    for a, b in zip(
        jax.tree.leaves(on_disk.params), jax.tree.leaves(in_memory.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # A model without state: the checkpoint loads as (config, params, step).
    _, params, step = training.load_checkpoint(str(tmp_path / "run"))
    assert step == 20
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(on_disk.params), strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = train(config(seed=5))
    assert other_seed.rows[0]["train_loss"] != in_memory.rows[0]["train_loss"]


# ------------------------------------------------------------------------------ stop rules


def test_goals_stop_at_the_first_step_that_reaches_them():
    every_step = config(max_steps=40)
    every_step.measure.every = 1
    reference = train(every_step)
    loss = losses(reference)
    goal = float(np.quantile(loss, 0.5))
    first = int(np.argmax(loss <= goal))
    result = train(config(max_steps=40, train_loss_goal=goal, goal_every=1))
    assert result.status == "goal_reached" and result.step == first
    assert result.rows[-1]["step"] == first  # the final step is measured
    assert result.rows[-1]["train_loss"] == loss[first]

    accuracy = np.array([row["train_accuracy"] for row in reference.rows])
    target = float(accuracy[first])
    result = train(config(max_steps=40, train_accuracy_goal=target))  # at measurements
    stop = next(s for s in range(0, 41, 5) if accuracy[s] >= target)
    assert result.status == "goal_reached" and result.step == stop


def test_divergence_is_recorded_not_raised(tmp_path):
    c = config(optimizer={"learning_rate": 1e8}, max_steps=200)
    result = train(c, tmp_path)
    assert result.status == "diverged" and 0 < result.step < 200
    status = records.read_status(tmp_path)
    assert status["status"] == "diverged" and status["step"] == result.step
    assert "batch_loss" in status
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(result.params))
    # A rerun resumes from the last checkpoint and diverges at the same step.
    again = train(c, tmp_path)
    assert (again.status, again.step) == ("diverged", result.step)
    assert again.rows == result.rows

    limited = train(config(loss_limit=0.9 * result.rows[0]["train_loss"]))
    assert limited.status == "diverged" and limited.step == 0


# ------------------------------------------------------------------------------ workdir


def test_status_follows_checkpoints_and_records_a_failure(tmp_path, monkeypatch):
    from sharpness_jax import training

    seen = []
    batch_indices = training._batch_indices

    def indices(sampler, step):
        seen.append(records.read_status(tmp_path))
        if step == 7:
            raise RuntimeError("disk on fire")
        return batch_indices(sampler, step)

    monkeypatch.setattr(training, "_batch_indices", indices)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(config(max_steps=10), tmp_path)
    assert seen[0] == {"status": "running", "step": 0, "checkpoint_step": 0}
    assert seen[6] == {"status": "running", "step": 5, "checkpoint_step": 5}
    assert records.read_status(tmp_path) == {
        "status": "failed",
        "step": 7,
        "checkpoint_step": 5,
        "error": "RuntimeError: disk on fire",
    }
    monkeypatch.undo()
    result = train(config(max_steps=10), tmp_path)
    assert (result.resumed_from, result.status) == (5, "completed")
    assert records.read_status(tmp_path) == {"status": "completed", "step": 10}


def test_rerun_resumes_refuses_conflicts_and_extends(tmp_path):
    c = config(max_steps=10)
    first = train(c, tmp_path)
    assert first.status == "completed" and first.resumed_from is None
    # Nothing left to do: the rerun restores the final checkpoint and stops.
    again = train(c, tmp_path)
    assert again.resumed_from == 10 and again.rows == first.rows and again.traces == {}
    # A change that alters results is refused, before anything runs.
    with pytest.raises(records.ConfigMismatchError, match=r"optimizer\.learning_rate"):
        train(config(max_steps=10, optimizer={"learning_rate": 0.4}), tmp_path)
    # A longer budget continues the run: the rows equal those of one long run.
    longer = train(config(max_steps=20), tmp_path)
    assert longer.resumed_from == 10 and longer.step == 20
    assert longer.rows == train(config(max_steps=20)).rows
    assert records.read_config(tmp_path)["max_steps"] == 20


def test_a_run_written_before_a_config_field_existed_resumes(tmp_path):
    """A field added to the schema later (here optimizer.sam_rho) defaults to the behaviour
    the old run had: resuming at its default is not a mismatch; another value is."""
    train(config(max_steps=10), tmp_path)
    stored = records.read_config(tmp_path)
    del stored["optimizer"]["sam_rho"]
    records.write_json(tmp_path / records.CONFIG_FILE, stored)
    with pytest.raises(records.ConfigMismatchError, match=r"optimizer\.sam_rho: <absent> -> 0.1"):
        train(config(max_steps=10, optimizer={"sam_rho": 0.1}), tmp_path)
    longer = train(config(max_steps=20), tmp_path)
    assert longer.resumed_from == 10 and longer.step == 20
    assert records.read_config(tmp_path)["optimizer"]["sam_rho"] == 0.0


def test_a_run_that_failed_before_its_first_checkpoint_locks_no_config(tmp_path, monkeypatch):
    from sharpness_jax import training

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training, "_measure_row", broken)  # fails at step 0, before checkpoint 0
    with pytest.raises(RuntimeError, match="out of memory"):
        train(config(max_steps=10, optimizer={"learning_rate": 0.4}), tmp_path)
    assert records.read_status(tmp_path)["status"] == "failed"
    monkeypatch.undo()
    # Nothing to protect: a corrected config starts afresh without force ...
    result = train(config(max_steps=10), tmp_path)
    assert result.resumed_from is None and result.status == "completed"
    assert records.read_config(tmp_path)["optimizer"]["learning_rate"] == 0.5
    # ... and once a checkpoint exists, a change is refused again.
    with pytest.raises(records.ConfigMismatchError, match=r"optimizer\.learning_rate"):
        train(config(max_steps=10, optimizer={"learning_rate": 0.4}), tmp_path)


def test_a_finished_run_is_extended_with_a_new_measurement_window(tmp_path):
    train(config(max_steps=10), tmp_path)
    # Lowering max_steps below the checkpoint, or changing the schedule before it: refused.
    with pytest.raises(records.ConfigMismatchError, match="max_steps: 10 -> 5"):
        train(config(max_steps=5), tmp_path)
    with pytest.raises(records.ConfigMismatchError, match=r"measure\.every: 5 -> 2"):
        train(config(max_steps=20, measure={"every": 2}), tmp_path)
    assert records.read_config(tmp_path)["max_steps"] == 10
    # A longer budget with a dense window after the old end is an extension.
    extended = config(max_steps=20, measure={"steps": (12, 13, 14)})
    result = train(extended, tmp_path)
    steps = [r["step"] for r in result.rows]
    assert steps == [0, 5, 10, 12, 13, 14, 15, 20] and result.resumed_from == 10
    assert result.rows == train(extended).rows  # as one uninterrupted run
    assert records.read_config(tmp_path)["measure"]["steps"] == [12, 13, 14]


def test_every_steps_batch_loss_is_recorded_once_across_a_failure(tmp_path, monkeypatch):
    from sharpness_jax import run_records, training

    c = config(max_steps=12, batch_size=16, optimizer={"name": "sgd", "learning_rate": 0.1})
    batch_indices = training._batch_indices

    def indices(sampler, step):
        if step == 8:
            raise RuntimeError("disk on fire")
        return batch_indices(sampler, step)

    monkeypatch.setattr(training, "_batch_indices", indices)
    with pytest.raises(RuntimeError):
        train(c, tmp_path / "resumed")
    steps, _ = run_records.read_train_losses(tmp_path / "resumed")
    np.testing.assert_array_equal(steps, np.arange(5))  # written with checkpoint 5
    monkeypatch.undo()
    train(c, tmp_path / "resumed")
    train(c, tmp_path / "whole")
    steps, resumed = run_records.read_train_losses(tmp_path / "resumed")
    np.testing.assert_array_equal(steps, np.arange(12))
    np.testing.assert_array_equal(resumed, run_records.read_train_losses(tmp_path / "whole")[1])
    # Full-batch GD: the batch loss at step t is the measured training loss L(θ_t).
    gd = train(config(max_steps=10), tmp_path / "gd")
    _, gd_losses = run_records.read_train_losses(tmp_path / "gd")
    measured = {r["step"]: r["train_loss"] for r in gd.rows if r["step"] < 10}
    np.testing.assert_allclose([gd_losses[t] for t in measured], list(measured.values()), 1e-12)


def test_regression_targets():
    c = {
        **BASE,
        "dataset": {"name": "teacher_student", "num_train": 32, "input_dim": 4},
        "loss": {"name": "squared_error_sum"},
        "optimizer": {"name": "gd", "learning_rate": 0.1},
    }
    result = train({**c, "measure": {"names": ("loss",), "every": 5}})
    loss = losses(result)
    assert np.all(np.diff(loss) < 0)
    with pytest.raises(ValueError, match="needs integer class labels"):
        train({**c, "measure": {"names": ("loss", "accuracy")}})
    with pytest.raises(ValueError, match="needs integer class labels"):
        train({**c, "train_accuracy_goal": 0.9})


def test_non_finite_data_is_refused(monkeypatch):
    real = data.load_dataset

    def with_nan(*args, **kwargs):
        ds = real(*args, **kwargs)
        x = ds.train.inputs.copy()
        x[3, 1] = np.nan
        return ds._replace(train=ds.train._replace(inputs=x))

    monkeypatch.setattr(data, "load_dataset", with_nan)
    with pytest.raises(ValueError, match=r"train data.* non-finite"):
        train(config())


def test_mnist5k_smoke_in_float32(tmp_path):
    c = resolve_config(
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
    result = train(c, tmp_path)
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
    # The child imports the code under test (this checkout), not an installed copy.
    path = os.pathsep.join([str(CHILD.parent.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "PYTHONPATH": path}
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
    steps, losses = run_records.read_train_losses(workdir)  # every step's loss, once
    np.testing.assert_array_equal(steps, np.arange(30))
    np.testing.assert_array_equal(losses, run_records.read_train_losses(root / "reference")[1])
    assert records.read_status(workdir) == {"status": "completed", "step": 30}
