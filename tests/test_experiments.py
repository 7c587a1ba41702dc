"""The experiment layer end to end: a study binary, the main job, the measure binary and the
benchmark, on smoke-sized settings."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from experiments import benchmark, configs, launch, reproduce
from experiments import measure as measure_bin
from experiments.studies import STUDIES, common
from sharpness_jax import records
from sharpness_jax.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_study_binary_writes_its_workdir_and_resumes(tmp_path):
    workdir = tmp_path / "eos"
    args = [
        "-m",
        "experiments.edge_of_stability",
        f"--workdir={workdir}",
        "--config=experiments/configs/edge_of_stability.py:smoke",
        "--mesh=none",
    ]
    first = _run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["study"] == "edge_of_stability" and summary["preset"] == "smoke"
    assert summary["checks"] and all(
        {"claim", "value", "expected", "passed"} <= c.keys() for c in summary["checks"]
    )
    assert (workdir / "figures" / "lambda_max.png").stat().st_size > 10_000
    metrics = sorted(workdir.glob("runs/*/metrics.jsonl"))
    before = [m.read_text() for m in metrics]
    second = _run(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [m.read_text() for m in metrics] == before  # nothing retrained
    again = json.loads((workdir / "summary.json").read_text())
    assert again["checks"] == summary["checks"]

    # The measure binary on one of the study's runs.
    out = tmp_path / "row.json"
    run_dir = metrics[0].parent
    res = _run(
        "-m",
        "experiments.measure",
        f"--run={run_dir}",
        "--measures=loss,lambda_max,gradient_rayleigh",
        f"--output={out}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(out.read_text())
    assert {"step", "train_loss", "lambda_max", "gradient_rayleigh"} <= row.keys()
    assert row["step"] == json.loads((run_dir / "status.json").read_text())["step"]


def test_a_changed_config_is_refused(tmp_path):
    config = reproduce.study_config("edge_of_stability", "smoke")
    config.base.max_steps = 4
    config.learning_rates = (0.1,)
    study = reproduce.study_module("edge_of_stability")
    common.run_study("edge_of_stability", study.run, config, tmp_path)
    config.learning_rates = (0.2,)
    with pytest.raises(ValueError, match="learning_rates"):
        common.run_study("edge_of_stability", study.run, config, tmp_path)


def test_cached_analysis_and_summary_keep_non_finite_floats(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {
            "nan": math.nan,
            "inf": np.float64(np.inf),
            "values": [1.0, -math.inf, np.nan],
            "spectrum": np.concatenate([np.arange(64.0), [np.nan]]),  # > 64 numbers: npz
            "name": "x",
        }

    first = common.cached(tmp_path, "analysis", compute)
    text = (tmp_path / "analysis" / "analysis.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    # Resumed: read back from the cache, not recomputed; non-finite floats come back as floats.
    again = common.cached(tmp_path, "analysis", compute)
    assert len(calls) == 1
    assert isinstance(again["nan"], float) and math.isnan(again["nan"])
    assert again["inf"] == math.inf and again["name"] == "x"
    assert again["values"][:2] == [1.0, -math.inf] and math.isnan(again["values"][2])
    np.testing.assert_array_equal(again["spectrum"], first["spectrum"])

    # summary.json speaks the same dialect as every other JSON file of the workdir.
    def run(config, workdir, *, mesh, cache):
        del mesh, cache
        check = common.check_range("a claim", math.nan, low=0.0)
        return [check], {"ratio": math.nan, "peak": math.inf}, []

    config = ml_collections.ConfigDict({"preset": "smoke"})
    summary = common.run_study("fake", run, config, tmp_path / "study")
    stored = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert stored["checks"][0]["value"] == "NaN" and stored["checks"][0]["passed"] is None
    assert stored["results"] == {"ratio": "NaN", "peak": "Infinity"}
    assert {k: v for k, v in summary.items() if k != "elapsed_s"} == {
        k: v for k, v in stored.items() if k != "elapsed_s"
    }
    decoded = records.read_json(tmp_path / "study" / "summary.json")
    assert math.isnan(decoded["results"]["ratio"]) and decoded["results"]["peak"] == math.inf


def test_reproduce_validates_names_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown study"):
        reproduce.run_all(tmp_path, "smoke", ("edge_of_stability", "no_such_study"))
    with pytest.raises(ValueError, match="unknown preset"):
        reproduce.run_all(tmp_path, "huge", ("edge_of_stability",))
    assert not any(tmp_path.iterdir())
    for name in STUDIES:
        assert reproduce.study_config(name, "paper").preset == "paper"


def test_new_study_edits_the_default_training_config():
    c, base = configs.new_study(
        "smoke",
        model={"widths": (7,)},
        measure={"names": ("loss", "lambda_max"), "options": {"lambda_max": {"k": 3}}},
        log_every=5,
    )
    assert c.preset == "smoke" and c.base is base
    default = default_config()
    assert base.model.widths == (7,) and base.model.name == default.model.name
    assert base.measure.names == ("loss", "lambda_max")
    assert base.measure.options.lambda_max.k == 3 and base.measure.every == default.measure.every
    assert base.log_every == 5 and base.max_steps == default.max_steps
    with pytest.raises(KeyError, match="no field 'log_evry'"):
        configs.new_study("smoke", log_evry=5)
    with pytest.raises(ValueError, match="unknown preset"):
        configs.new_study("huge")


def test_report_lists_every_check(tmp_path):
    summaries = [
        {
            "study": "edge_of_stability",
            "preset": "smoke",
            "passed": False,
            "elapsed_s": 1.0,
            "figures": ["figures/lambda_max.png"],
            "checks": [
                {"claim": "a", "value": 1.0, "expected": "<= 2", "passed": True, "detail": ""},
                {"claim": "b", "value": None, "expected": ">= 1", "passed": None, "detail": "x"},
            ],
        }
    ]
    text = reproduce.write_report(tmp_path, summaries, "smoke", elapsed=1.0).read_text()
    assert "| a | 1 | <= 2 | pass |" in text and "| b (x) | — | >= 1 | n/a |" in text
    assert "1/1" in text and "edge_of_stability/figures/lambda_max.png" in text


def test_mesh_flag_and_measure_arguments():
    assert launch.mesh_from_flag("auto") == "auto"
    assert launch.mesh_from_flag("none") is None
    assert launch.mesh_from_flag("2") == 2
    with pytest.raises(ValueError, match="--mesh"):
        launch.mesh_from_flag("0")
    with pytest.raises(ValueError, match="exactly one"):
        measure_bin.run(
            run_dir=None,
            step=None,
            params_path=None,
            config_json=None,
            measures=["loss"],
            options={},
            dataset=None,
            measure_subset=None,
            chunk_size=None,
            mesh=None,
        )
    with pytest.raises(ValueError, match="unknown measurements"):
        measure_bin.run(
            run_dir="x",
            step=None,
            params_path=None,
            config_json=None,
            measures=["curvature"],
            options={},
            dataset=None,
            measure_subset=None,
            chunk_size=None,
            mesh=None,
        )


def test_benchmark_small_runs_every_measurement():
    result = benchmark.run(repeats=1, chunk=16, with_w2=False, with_w3=True, small=True)
    w1 = result["w1"]
    for key in (
        "gradient_s",
        "hessian_x_grad",
        "gradient_covariance_x_grad",
        "lambda_max_cold_matvecs",
        "lambda_max_warm_rel_error",
        "lambda_max_warm_default_tol_grad_equivalents",
        "lambda_max_rel_gap",
        "batch_sharpness_grad_equivalents",
        "exact_spectrum_c_gram_grad_equivalents",
        "c_matvec_temp_mib_4n",
        "measure_lambda_max_x_step",
    ):
        assert key in w1 and w1[key] == w1[key], key
    # Memory of a C matvec at fixed chunk size does not grow with n (4× more examples).
    assert w1["c_matvec_temp_mib_4n"] <= 1.05 * w1["c_matvec_temp_mib_n"]
    assert w1["lambda_max_cold_rel_error"] < 1e-3
    assert "w3_exact_h2_diagonal_s" in result["w3"]
    assert "| quantity |" in benchmark.markdown(result)
