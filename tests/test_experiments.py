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

from experiments import benchmark, cli, configs, launch, reproduce
from experiments import measure as measure_bin
from experiments.studies import STUDIES, common
from experiments.studies.sources import SOURCES
from sharpness_jax import data, records
from sharpness_jax.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
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
                {
                    "claim": "a",
                    "value": 1.0,
                    "expected": "<= 2",
                    "passed": True,
                    "detail": "",
                    "source": "Fig. 1",
                },
                {"claim": "b", "value": None, "expected": ">= 1", "passed": None, "detail": "x"},
            ],
        }
    ]
    text = reproduce.write_report(tmp_path, summaries, "smoke", elapsed=1.0).read_text()
    assert "| a | 1 | <= 2 | pass | Fig. 1 |" in text and "| b (x) | — | >= 1 | n/a |  |" in text
    assert common.source_of(SOURCES["edge_of_stability"], "edge of stability at η=0.1: x")
    assert common.source_of((("p", "s"),), "q") == ""
    assert "1/1" in text and "edge_of_stability/figures/lambda_max.png" in text
    assert common.SMOKE_NOTE in text
    summaries[0]["preset"] = "quick"
    text = reproduce.write_report(tmp_path, summaries, "quick", elapsed=1.0).read_text()
    assert common.SMOKE_NOTE not in text


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
    with pytest.raises(ValueError, match="unknown measurement 'curvature'"):
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
        "exact_trace_c_factored_grad_equivalents",
        "c_matvec_temp_mib_4n",
        "measure_lambda_max_x_step",
        "measure_gradient_covariance_lambda_max_x_step",
        "measure_riemannian_sharpness_x_step",
        "hutchinson_trace_h_100_probes_grad_equivalents",
        "hutchinson_trace_h_s_at_xtrace_stderr",
        "eager_lanczos_x_matvecs",
        "eager_lanczos_compile_s",
    ):
        assert key in w1 and w1[key] == w1[key], key
    # Memory of a C matvec at fixed chunk size does not grow with n (4× more examples).
    assert w1["c_matvec_temp_mib_4n"] <= 1.05 * w1["c_matvec_temp_mib_n"]
    assert w1["lambda_max_cold_rel_error"] < 1e-3
    assert "w3_exact_h2_diagonal_s" in result["w3"]
    assert "| quantity |" in benchmark.markdown(result)


def test_benchmark_w2_chunking_rows():
    n, channels = benchmark.SMALL["w2"]
    obj, params, batch = benchmark._problem(
        "cnn", n, channels=channels, activation="relu", pooling="avg"
    )
    w2 = benchmark.chunking_times(obj, params, batch, chunk=n // 2, repeats=1)
    table = benchmark.markdown({"w1": {}, "w2": w2})
    for key in (
        "chunked_gradient_x_unchunked",
        "chunked_hvp_x_unchunked",
        "per_example_grads_x_unchunked_grad",
    ):
        assert w2[key] > 0 and f"w2_{key}" in benchmark.TARGETS, key
        assert f"| {key} (W2) |" in table and "≤ " in table.split(key)[1].splitlines()[0]


# ------------------------------------------------------------------------------ the CLI


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_study_help_lists_its_own_flags():
    proc = _run("-m", "experiments.edge_of_stability", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in ("--config", "--workdir", "--[no]force", "--mesh"):
        assert flag in proc.stdout, flag
    assert "--jax_" not in proc.stdout  # only --helpfull lists every module's flags


def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
    smoke = "--config=experiments/configs/edge_of_stability.py:smoke"
    study = ["-m", "experiments.edge_of_stability", f"--workdir={tmp_path / 'eos'}", smoke]
    typo = _run(*study, "--config.base.max_stpes=3")
    assert typo.returncode == cli.EXIT_ERROR == 2 and "Traceback" not in typo.stderr, typo.stderr[
        -3000:
    ]
    assert "--config.base.max_stpes" in _last_line(typo) and "max_steps" in _last_line(typo)

    changed = reproduce.study_config("edge_of_stability", "smoke")
    changed.learning_rates = (0.3,)
    records.write_config(tmp_path / "eos", changed)
    (tmp_path / "eos" / "runs" / "gd_lr0.1").mkdir(parents=True)  # a result of that config
    records.write_json(tmp_path / "eos" / "runs" / "gd_lr0.1" / "analysis.json", {"x": 1})
    mismatch = _run(*study)
    assert mismatch.returncode == cli.EXIT_ERROR and "Traceback" not in mismatch.stderr
    line = _last_line(mismatch)
    assert line.startswith("error: ") and "learning_rates" in line
    assert "--force" in line and "force=True" not in line

    # A study's workdir is not a run: the message names the runs inside that hold checkpoints.
    (tmp_path / "eos" / "runs" / "gd_lr0.1" / records.CHECKPOINT_DIR / "3").mkdir(parents=True)
    measure = ["-m", "experiments.measure", f"--run={tmp_path / 'eos'}", "--mesh=none"]
    proc = _run(*measure)
    assert proc.returncode == cli.EXIT_ERROR and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "holds no complete checkpoint" in _last_line(proc)
    assert "runs/gd_lr0.1" in _last_line(proc)


def test_run_reports_expected_errors_and_keeps_tracebacks_of_bugs(capsys, monkeypatch):
    def fails(error):
        def main(argv):
            raise error

        return main

    for error in (ValueError("bad value"), FileNotFoundError("no file"), KeyError("no key")):
        with pytest.raises(SystemExit) as exit_:
            cli.run(fails(error), argv=["prog"])
        assert exit_.value.code == cli.EXIT_ERROR == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {cli.error_line(error)} (")
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(SystemExit):
        cli.run(fails(ValueError("bad value")), argv=["prog"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad value\n")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run(fails(ZeroDivisionError("bug")), argv=["prog"])


def test_error_lines_name_the_problem_and_the_fix():
    mismatch = records.ConfigMismatchError("w/config.json", ["seed: 0 -> 1", "lr: 1 -> 2"])
    assert "force=True" in str(mismatch) and "seed: 0 -> 1" in str(mismatch)
    line = cli.error_line(mismatch)
    assert "\n" not in line and "(seed: 0 -> 1, lr: 1 -> 2)" in line and "--force" in line
    missing = data.DatasetNotFoundError("dataset 'cifar10' is not prepared.\n    tfds build x")
    assert cli.error_line(missing) == (
        "dataset 'cifar10' is not prepared. tfds build x Or point the run at the directory that "
        "holds it: --config.base.dataset.data_dir=DIR (--config.dataset.data_dir=DIR for a "
        "single run) or the environment variable TFDS_DATA_DIR."
    )
    assert cli.error_line(KeyError("no field 'x'")) == "no field 'x'"


INTERRUPT_CONFIG = {
    "dataset": {"name": "gaussian_mixture", "num_train": 64, "num_test": 16, "input_dim": 4},
    "model": {"name": "mlp", "widths": [4]},
    "batch_size": 16,
    "max_steps": 10,
    "measure": {"every": 5, "names": ["loss"]},
    "checkpoint_every": 5,
    "log_every": 0,
}


def test_ctrl_c_is_one_line_records_the_status_and_resumes(tmp_path):
    child = [os.path.join(ROOT, "tests", "training_child.py"), str(tmp_path / "run")]
    child.append(json.dumps(INTERRUPT_CONFIG))
    proc = _run(*child, "interrupt:7")
    assert proc.returncode == cli.EXIT_INTERRUPTED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _last_line(proc).startswith(
        "interrupted at step 7; last checkpoint at step 5; rerun the same command to resume"
    )
    status = records.read_status(tmp_path / "run")
    assert status == {"status": "interrupted", "step": 7, "checkpoint_step": 5}
    again = _run(*child)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary == {"status": "completed", "step": 10, "resumed_from": 5}


def test_data_dir_is_a_config_field_reaching_tfds(tmp_path):
    from ml_collections.config_flags import config_path

    from sharpness_jax.config import RESUMABLE_FIELDS, resolve_config
    from sharpness_jax.problem import problem_from_config

    assert default_config().dataset.data_dir is None  # $TFDS_DATA_DIR, else TFDS's default
    for name in STUDIES:  # what --config.base.dataset.data_dir=DIR sets
        study = reproduce.study_config(name, "smoke")
        config_path.set_value("base.dataset.data_dir", study, str(tmp_path))
        assert study.base.dataset.data_dir == str(tmp_path), name
    config = resolve_config({"dataset": {"name": "cifar10", "data_dir": str(tmp_path)}})
    with pytest.raises(data.DatasetNotFoundError, match=f"data_dir='{tmp_path}'"):
        problem_from_config(config)
    moved = resolve_config({"dataset": {"name": "cifar10", "data_dir": "/elsewhere"}})
    assert records.config_differences(config, moved, ignore=RESUMABLE_FIELDS) == []


def test_a_finished_study_may_run_longer_but_not_otherwise_change(tmp_path):
    def run(config, workdir, *, mesh, cache):
        steps = int(config.base.max_steps)
        return [], common.cached(workdir, "analysis", lambda: {"max_steps": steps}), []

    study = reproduce.study_config("edge_of_stability", "smoke")
    common.run_study("edge_of_stability", run, study, tmp_path)
    (tmp_path / "runs").mkdir()
    records.write_json(tmp_path / "runs" / "result.json", {"x": 1})  # a result of the study
    study.base.max_steps = int(study.base.max_steps) + 10
    summary = common.run_study("edge_of_stability", run, study, tmp_path)
    assert records.read_config(tmp_path)["base"]["max_steps"] == study.base.max_steps
    assert summary["results"] == {"max_steps": study.base.max_steps}  # not the cached analysis
    study.learning_rates = (0.3,)
    with pytest.raises(records.ConfigMismatchError, match="learning_rates"):
        common.run_study("edge_of_stability", run, study, tmp_path)
