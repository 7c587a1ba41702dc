"""Tests of the workdir record: config, metrics, arrays, status and checkpoints."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sharpness_jax import records


def _config():
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.max_steps = 100
    c.optimizer = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.1})
    c.measure = ml_collections.ConfigDict({"names": ("loss", "lambda_max"), "every": 10})
    c.loss_limit = math.inf
    return c


# ------------------------------------------------------------------------------ config


def test_config_round_trip(tmp_path):
    c = _config()
    stored = records.write_config(tmp_path, c)
    assert (tmp_path / records.CONFIG_FILE).exists()
    assert (tmp_path / records.FIGURES_DIR).is_dir()
    back = records.read_config(tmp_path)
    assert back["optimizer"] == {"name": "sgd", "learning_rate": 0.1}
    assert back["measure"]["names"] == ["loss", "lambda_max"]  # tuples come back as lists
    assert back["loss_limit"] == math.inf
    assert records.config_differences(back, c) == []
    assert records.config_to_dict(ml_collections.ConfigDict(back)) == stored
    # Rewriting the same config (tuples vs lists, ConfigDict vs dict) is accepted.
    records.write_config(tmp_path, c.to_dict())


def test_config_mismatch_is_refused(tmp_path):
    records.write_config(tmp_path, _config())
    changed = _config()
    changed.optimizer.learning_rate = 0.2
    # A workdir without results (a run that failed before its first step) takes a new config.
    records.write_status(tmp_path, "failed", step=0)
    assert not records.holds_results(tmp_path)
    records.write_config(tmp_path, changed)
    assert records.read_config(tmp_path)["optimizer"]["learning_rate"] == 0.2
    records.write_config(tmp_path, _config())
    records.append_metrics(tmp_path, {"step": 0, "loss": 1.0})
    assert records.holds_results(tmp_path)
    with pytest.raises(records.ConfigMismatchError, match=r"optimizer.learning_rate: 0.1 -> 0.2"):
        records.write_config(tmp_path, changed)
    added = _config()
    added.optimizer.momentum = 0.9
    with pytest.raises(records.ConfigMismatchError, match=r"optimizer.momentum: <absent> -> 0.9"):
        records.write_config(tmp_path, added)
    assert records.read_config(tmp_path)["optimizer"]["learning_rate"] == 0.1  # untouched
    # Ignored fields may change, and the stored file follows them.
    longer = _config()
    longer.max_steps = 500
    records.write_config(tmp_path, longer, ignore=("max_steps",))
    assert records.read_config(tmp_path)["max_steps"] == 500
    # force overrides.
    records.write_config(tmp_path, changed, force=True)
    assert records.read_config(tmp_path)["optimizer"]["learning_rate"] == 0.2


def test_config_differences_ignores_subtrees():
    a = {"x": 1, "sub": {"y": 2, "z": 3}}
    b = {"x": 1, "sub": {"y": 5, "z": 4}}
    assert records.config_differences(a, b) == ["sub.y: 2 -> 5", "sub.z: 3 -> 4"]
    assert records.config_differences(a, b, ignore=("sub",)) == []
    assert records.config_differences(a, b, ignore=("sub.y",)) == ["sub.z: 3 -> 4"]


# ------------------------------------------------------------------------------ metrics


def test_fields_added_at_their_default_are_not_differences():
    from sharpness_jax import config, run_records

    new = {"base": records.config_to_dict(config.default_config()), "lrs": [0.1]}
    stored = json.loads(json.dumps(new))
    del stored["base"]["optimizer"]["sam_rho"], stored["base"]["dataset"]["data_dir"]
    del stored["lrs"]
    new["base"]["dataset"]["data_dir"] = "/elsewhere"
    # Only a field at its default is forgiven; a study field has no training default.
    added = run_records.added_at_default(stored, new, prefix="base.")
    assert added == ["base.optimizer.sam_rho"]
    assert records.config_differences(stored, new, ignore=added) == [
        'base.dataset.data_dir: <absent> -> "/elsewhere"',
        "lrs: <absent> -> [0.1]",
    ]


def test_metrics_append_read_and_columns(tmp_path):
    records.append_metrics(tmp_path, {"step": 0, "loss": np.float32(2.5), "acc": 0.1})
    records.append_metrics(tmp_path, {"step": 10, "loss": jnp.asarray(1.25), "note": "x"})
    records.append_metrics(tmp_path, {"step": np.int64(20), "loss": 0.5, "acc": 0.9, "ok": True})
    rows = records.read_metrics(tmp_path)
    assert rows == [
        {"step": 0, "loss": 2.5, "acc": 0.1},
        {"step": 10, "loss": 1.25, "note": "x"},
        {"step": 20, "loss": 0.5, "acc": 0.9, "ok": True},
    ]
    cols = records.metric_columns(rows)
    assert cols["step"].dtype == np.int64
    np.testing.assert_array_equal(cols["step"], [0, 10, 20])
    np.testing.assert_array_equal(cols["loss"], [2.5, 1.25, 0.5])
    np.testing.assert_array_equal(cols["acc"], [0.1, np.nan, 0.9])  # NaN where missing
    assert list(cols["note"]) == [None, "x", None]
    assert list(cols["ok"]) == [None, None, True]
    assert records.metric_columns([]) == {}
    with pytest.raises(ValueError, match="integer 'step'"):
        records.append_metrics(tmp_path, {"loss": 1.0})


def test_non_finite_values_round_trip(tmp_path):
    row = {
        "step": 1,
        "a": math.nan,
        "b": math.inf,
        "c": -np.inf,
        "d": np.float32("nan"),
        "v": [1.0, math.nan, -math.inf],
    }
    records.append_metrics(tmp_path, row)
    text = (tmp_path / records.METRICS_FILE).read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    (back,) = records.read_metrics(tmp_path)
    assert math.isnan(back["a"]) and math.isnan(back["d"])
    assert back["b"] == math.inf and back["c"] == -math.inf
    assert math.isnan(back["v"][1]) and back["v"][2] == -math.inf and back["v"][0] == 1.0
    assert records.decode_value(records.encode_value(row))["b"] == math.inf


def test_truncated_last_line_is_dropped_and_repaired(tmp_path):
    for step in range(3):
        records.append_metrics(tmp_path, {"step": step, "loss": 1.0 / (step + 1)})
    path = tmp_path / records.METRICS_FILE
    complete = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "loss": 0.2')  # killed mid-write
    assert [r["step"] for r in records.read_metrics(tmp_path)] == [0, 1, 2]
    # A complete JSON object without its newline is an interrupted write too.
    path.write_bytes(complete + b'{"step": 3}')
    assert [r["step"] for r in records.read_metrics(tmp_path)] == [0, 1, 2]
    # The next append starts a fresh line: the fragment is gone, nothing is glued to it.
    records.append_metrics(tmp_path, {"step": 3, "loss": 0.25})
    assert path.read_bytes() == complete + b'{"step":3,"loss":0.25}\n'
    assert [r["step"] for r in records.read_metrics(tmp_path)] == [0, 1, 2, 3]
    # Corruption inside the file is an error, not silently skipped.
    path.write_bytes(b'{"step": 0}\n{"step": \n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        records.read_metrics(tmp_path)


def test_truncate_metrics_drops_rows_after_checkpoint(tmp_path):
    for step in (0, 5, 10, 15, 20):
        row = {"step": step, "x": float(step)}
        if step % 10 == 0:
            row["arrays"] = records.save_arrays(tmp_path, step, {"spectrum": np.arange(3.0) + step})
        records.append_metrics(tmp_path, row)
    with open(tmp_path / records.METRICS_FILE, "ab") as f:
        f.write(b'{"step": 25')
    assert records.truncate_metrics(tmp_path, max_step=10) == 2
    rows = records.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert (tmp_path / records.METRICS_FILE).read_bytes().endswith(b"\n")
    # The arrays of kept rows remain, those of dropped rows are removed.
    np.testing.assert_array_equal(records.load_arrays(tmp_path, rows[2])["spectrum"], [10, 11, 12])
    assert not (tmp_path / "arrays" / "step_000000020.npz").exists()
    assert records.load_arrays(tmp_path, rows[1]) == {}
    assert records.truncate_metrics(tmp_path, max_step=10) == 0
    assert records.truncate_metrics(tmp_path, max_step=None) == 3
    assert records.read_metrics(tmp_path) == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_status_round_trip(tmp_path):
    assert records.read_status(tmp_path) is None
    records.write_status(tmp_path, "diverged", 17, batch_loss=math.inf)
    assert records.read_status(tmp_path) == {
        "status": "diverged",
        "step": 17,
        "batch_loss": math.inf,
    }


def test_json_and_npz_files_round_trip_atomically(tmp_path):
    value = {"b": [1.0, math.nan], "a": {"x": -math.inf, "y": np.float32(0.5)}, "s": "nan"}
    path = tmp_path / "sub" / "value.json"
    records.write_json(path, value)
    text = path.read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert text.index('"a"') < text.index('"b"')  # sorted keys by default
    back = records.read_json(path)
    assert math.isnan(back["b"][1]) and back["a"] == {"x": -math.inf, "y": 0.5}
    assert back["s"] == "nan"  # only "NaN", "Infinity" and "-Infinity" are reserved
    records.write_json(path, {"z": 1, "a": 2}, sort_keys=False)
    assert list(records.read_json(path)) == ["z", "a"]
    records.write_npz(tmp_path / "sub" / "arrays.npz", {"v": np.arange(3.0)})
    with np.load(tmp_path / "sub" / "arrays.npz") as data:
        np.testing.assert_array_equal(data["v"], [0.0, 1.0, 2.0])

    # A write that fails half-way leaves the old file and no temporary file behind.
    class Broken:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        records.write_npz(tmp_path / "sub" / "arrays.npz", {"v": Broken()})
    with np.load(tmp_path / "sub" / "arrays.npz") as data:
        np.testing.assert_array_equal(data["v"], [0.0, 1.0, 2.0])
    assert sorted(os.listdir(tmp_path / "sub")) == ["arrays.npz", "value.json"]


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_and_retention(tmp_path):
    params = {"dense": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.float32)}}
    tx = optax.adam(0.1)
    opt_state = tx.init(params)
    manager = records.checkpoint_manager(tmp_path, max_to_keep=2)
    assert records.restore_checkpoint(manager, {"p": params, "o": opt_state}) is None
    for step in (0, 10, 20):
        state = {"p": jax.tree.map(lambda a: a + step, params), "o": opt_state}
        extra = {
            "lambda_max": {
                "vectors": jax.tree.map(lambda a: a[None] * step, params),
                "count": jnp.int32(step),
            },
            "empty": {},
        }
        records.save_checkpoint(
            manager, step, state, extra=extra, meta={"seed": 1, "loss": math.nan}
        )
    assert records.latest_checkpoint_step(manager) == 20
    assert sorted(manager.all_steps()) == [10, 20]
    ckpt = records.restore_checkpoint(
        records.checkpoint_manager(tmp_path), {"p": params, "o": opt_state}
    )
    assert ckpt.step == 20
    assert ckpt.meta["seed"] == 1 and ckpt.meta["step"] == 20 and math.isnan(ckpt.meta["loss"])
    np.testing.assert_array_equal(ckpt.state["p"]["dense"]["w"], params["dense"]["w"] + 20)
    assert ckpt.state["p"]["dense"]["b"].dtype == jnp.float32
    assert type(ckpt.state["o"]) is type(opt_state)  # optax NamedTuples restored as such
    vec = ckpt.extra["lambda_max"]["vectors"]["dense"]["w"]
    np.testing.assert_array_equal(vec, params["dense"]["w"][None] * 20)
    assert ckpt.extra["lambda_max"]["count"].dtype == jnp.int32
    assert "empty" not in ckpt.extra
    older = records.restore_checkpoint(manager, {"p": params, "o": opt_state}, step=10)
    np.testing.assert_array_equal(older.state["p"]["dense"]["w"], params["dense"]["w"] + 10)


def test_interrupted_checkpoint_is_never_restored(tmp_path):
    """A checkpoint directory that was not finalised (a crash mid-write) is ignored."""
    params = {"w": jnp.ones(4)}
    manager = records.checkpoint_manager(tmp_path)
    records.save_checkpoint(manager, 5, params)
    records.save_checkpoint(manager, 10, params)
    ckpt_dir = tmp_path / records.CHECKPOINT_DIR
    # What a kill before the final rename leaves behind: a temporary copy of step 15.
    os.rename(ckpt_dir / "10", ckpt_dir / "15.orbax-checkpoint-tmp-123")
    resumed = records.checkpoint_manager(tmp_path)
    ckpt = records.restore_checkpoint(resumed, params)
    assert ckpt.step == 5
    # The leftover is removed (in the background, at the latest before the next save).
    records.save_checkpoint(resumed, 15, params)
    assert sorted(os.listdir(ckpt_dir)) == ["15", "5"]


def test_checkpoint_manager_rejects_bad_retention(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        records.checkpoint_manager(tmp_path, max_to_keep=0)
