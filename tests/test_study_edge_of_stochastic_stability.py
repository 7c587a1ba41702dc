"""The edge-of-stochastic-stability study: smoke preset end to end, resume, helpers, configs."""

import json
import math
import time

import numpy as np
import pytest

from experiments.configs import edge_of_stochastic_stability as study_config
from experiments.studies import common
from experiments.studies import edge_of_stochastic_stability as study
from sharpness_jax import training
from sharpness_jax.config import validate_config

SMOKE = study_config.get_config("smoke")
RUNS = [f"sgd_b{b}" for b in SMOKE.batch_sizes] + ["gd"]
FIGURES = ("sharpness_by_batch_size", "plateau_vs_batch_size", "loss")


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eoss")
    start = time.time()
    summary = common.run_study(study.NAME, study.run, study_config.get_config("smoke"), workdir)
    return workdir, summary, time.time() - start


def _expected_claims(config):
    claims = [
        f"batch sharpness settles at 2/η (b={b}): late batch sharpness/(2/η)"
        for b in config.batch_sizes
    ]
    claims += [
        f"λ_max stays below 2/η for a small batch (b={b}): late λ_max/(2/η)"
        for b in config.batch_sizes
        if b in config.small_batch_sizes
    ]
    claims.append("the λ_max plateau grows with the batch size: Spearman ρ(b, late λ_max)")
    claims.append("full-batch GD reaches the edge of stability: late λ_max/(2/η)")
    return claims


def test_smoke_writes_summary_figures_and_runs(smoke_study):
    workdir, _, _ = smoke_study
    stored = json.loads((workdir / "summary.json").read_text())
    assert stored["study"] == study.NAME and stored["preset"] == "smoke"
    assert [c["claim"] for c in stored["checks"]] == _expected_claims(SMOKE)
    for c in stored["checks"]:
        if c["claim"].startswith("the λ_max plateau"):
            # Spearman's ρ needs three batch sizes; the smoke preset has one.
            assert c["value"] == "NaN" and c["passed"] is None
        else:
            assert isinstance(c["value"], float) and math.isfinite(c["value"])
            assert isinstance(c["passed"], bool)
    results = stored["results"]
    assert results["threshold"] == pytest.approx(2 / SMOKE.learning_rate)
    for name in RUNS:
        assert (workdir / "runs" / name / "metrics.jsonl").exists()
        entry = results[name]
        assert entry["status"] == "completed"
        assert entry["late_lambda_max_ratio"] == pytest.approx(
            entry["late_lambda_max"] / results["threshold"]
        )
    for b in SMOKE.batch_sizes:
        entry = results[f"sgd_b{b}"]
        for q in ("batch_sharpness", "gni"):
            assert math.isfinite(entry[f"late_{q}"])
        assert ("late_batch_lambda_max" in entry) == (b in SMOKE.batch_lambda_max_sizes)
    assert "late_gradient_rayleigh" in results["gd"] and "late_batch_sharpness" not in results["gd"]
    assert stored["figures"] == [f"figures/{f}.png" for f in FIGURES]
    for fig in stored["figures"]:
        assert (workdir / fig).stat().st_size > 0

    # The rows hold what the study asked for: batch sharpness with its standard error, and
    # E_B[λ_max(H_B)] only where configured.
    cols = common.columns(workdir, f"sgd_b{SMOKE.batch_sizes[0]}")
    assert np.all(cols["batch_sharpness_stderr"] >= 0)
    assert np.all(
        cols["batch_sharpness_draws"] >= SMOKE.base.measure.options.batch_sharpness.min_draws
    )
    assert np.all(np.isfinite(cols["batch_lambda_max"]))
    assert "batch_lambda_max" not in common.columns(workdir, "gd")


def test_rerun_resumes_without_training(smoke_study, monkeypatch):
    workdir, summary, first_time = smoke_study
    metrics = {n: (workdir / "runs" / n / "metrics.jsonl").read_bytes() for n in RUNS}
    calls = []
    train = training.train

    def counting_train(*args, **kwargs):
        result = train(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(training, "train", counting_train)
    start = time.time()
    again = common.run_study(study.NAME, study.run, study_config.get_config("smoke"), workdir)
    elapsed = time.time() - start
    assert len(calls) == len(RUNS)
    # Every run was read back from its final checkpoint: no step was taken again.
    assert all(r.resumed_from == r.step and r.status == "completed" for r in calls)
    assert {n: (workdir / "runs" / n / "metrics.jsonl").read_bytes() for n in RUNS} == metrics
    assert {k: v for k, v in again.items() if k != "elapsed_s"} == {
        k: v for k, v in summary.items() if k != "elapsed_s"
    }
    assert elapsed < 0.5 * first_time


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_run_configs_validate(preset):
    config = study_config.get_config(preset)
    runs = study._run_configs(config)
    assert list(runs) == [f"sgd_b{b}" for b in config.batch_sizes] + ["gd"]
    for name, run_cfg in runs.items():
        c = validate_config(run_cfg)  # no data needed
        assert c.loss.name == "squared_error_sum"
        assert c.optimizer.learning_rate == config.learning_rate
        if name == "gd":
            assert c.optimizer.name == "gd" and c.batch_size is None
            assert c.max_steps == config.gd_max_steps
            assert "batch_sharpness" not in c.measure.names
        else:
            assert c.optimizer.name == "sgd" and f"sgd_b{c.batch_size}" == name
            assert {"lambda_max", "batch_sharpness", "gni"} <= set(c.measure.names)
            has_blm = "batch_lambda_max" in c.measure.names
            assert has_blm == (c.batch_size in config.batch_lambda_max_sizes)
    assert set(config.small_batch_sizes) <= set(config.batch_sizes)
    assert set(config.batch_lambda_max_sizes) <= set(config.batch_sizes)


def test_paper_preset_is_the_published_setup():
    c = study_config.get_config("paper")
    assert c.learning_rate == 0.01
    assert c.base.model.widths == (512, 512) and c.base.model.activation == "relu"
    assert c.base.model.init == "he" and c.base.model.init_scale == 0.2
    assert c.base.dataset.name == "cifar10" and c.base.dataset.num_train == 8192
    bs = c.base.measure.options.batch_sharpness
    assert (bs.rel_stderr, bs.min_draws, bs.max_draws) == (0.005, 20, 1000)
    assert min(c.batch_sizes) == 4 and max(c.batch_sizes) == 256
    with pytest.raises(ValueError, match="unknown preset"):
        study_config.get_config("huge")


def test_sharpness_figure_holds_its_curves_names_its_bands_and_states_eta(smoke_study, monkeypatch):
    workdir, _, _ = smoke_study
    figures, save = {}, common.figure

    def kept(workdir, name, fig):
        figures[name] = fig
        return save(workdir, name, fig)

    monkeypatch.setattr(common, "figure", kept)
    study.run(SMOKE, workdir)  # every run is read back: no training
    fig = figures["sharpness_by_batch_size"]
    assert f"η = {SMOKE.learning_rate:g}" in fig._suptitle.get_text()
    visible = [ax for ax in fig.axes if ax.get_visible()]
    low, high = visible[0].get_ylim()
    for ax in visible:
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), float)
            y = y[np.isfinite(y)]
            assert y.size == 0 or (y.min() >= low and y.max() <= high), line.get_label()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "2/η" in labels
        assert len(labels) == len(ax.get_lines()) + len(ax.collections)
    first = [t.get_text() for t in visible[0].get_legend().get_texts()]
    assert "batch sharpness ± 1 SE (batches)" in first
    for name in ("plateau_vs_batch_size", "loss"):
        assert f"η = {SMOKE.learning_rate:g}" in figures[name].axes[0].get_title()
