"""The Fisher-sharpness study: the smoke preset end to end (records, resume, summary) and the
pure helpers on known answers (its per-net measurements are tested in test_riemannian.py and
test_pac_bayes.py)."""

import json
import math

import numpy as np
import pytest
from study_runs import run_twice

from experiments.configs import fisher_sharpness as study_config
from experiments.studies import fisher_sharpness as study
from sharpness_jax import records
from sharpness_jax.config import validate_config


def _expected_claims():
    m = study.MEASURES
    claims = [
        f"{m[k]} is invariant under function-preserving rescaling"
        + (" (Kwon et al. 2021)" if k == "adaptive_sharpness" else " (PAPERS.md §1)")
        for k in study.INVARIANT
    ]
    claims.append("the rescaled nets compute the same function")
    claims += [
        f"{m[k]} changes under rescaling by a large factor (Dinh et al. 2017)"
        for k in study.EUCLIDEAN
    ]
    for k in ("riemannian_sharpness", "riemannian_sharpness_damped"):
        claims += [
            f"{m[k]} falls as the temperature η/B rises",
            f"{m[k]} tracks the loss gap better than λ_max(H) and tr(H) (abstract, PAPERS.md §1)",
        ]
    return claims


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study run twice in the same workdir, the second time with analyses forbidden."""
    workdir = tmp_path_factory.mktemp("fisher_sharpness")
    config = study_config.get_config("smoke")
    r = run_twice(study, config, workdir, forbid=[(study._Setup, "analyse")])
    return r.workdir, r.config, r.first, r.second, r.metrics, r.analyses, r.calls


def test_smoke_summary(smoke):
    workdir, config, first, second, _, _, _ = smoke
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["study"] == study.NAME and summary["preset"] == "smoke"
    assert [c["claim"] for c in summary["checks"]] == _expected_claims()
    for c in summary["checks"]:
        assert isinstance(c["value"], float) and math.isfinite(c["value"]), c
        assert c["passed"] in (True, False), c
    result = summary["results"]["mnist5k"]
    runs = result["runs"]
    assert len(runs) == len(study.grid(config)) == 4
    for name, row in runs.items():
        for key in (*study.MEASURES, "gap_loss", "gap_error", "pac_bayes_bound"):
            assert math.isfinite(row[key]), (name, key)
            assert math.isfinite(row.get(f"{key}_rescaled", 0.0)), (name, key)
        assert row["damping"] == config.damping
        assert row["riemannian_sharpness_stderr"] >= 0
    assert set(result["rank_correlations"]) >= set(study.MEASURES)
    assert len(summary["figures"]) == 4
    for fig in summary["figures"]:
        assert (workdir / fig).stat().st_size > 10_000
    assert (second["checks"], second["results"]) == (first["checks"], first["results"])
    assert (summary["checks"], summary["results"]) == (first["checks"], first["results"])


def test_smoke_exact_claims_hold(smoke):
    """Invariance and function preservation are identities: they hold at smoke scale."""
    checks = {c["claim"]: c for c in smoke[2]["checks"]}
    claims = _expected_claims()
    for claim in claims[:3]:
        assert checks[claim]["value"] < 1e-8, claims
    assert checks[claims[3]]["value"] < 1e-12


def test_smoke_rerun_trains_and_analyses_nothing(smoke):
    workdir, config, _, _, metrics, analyses, calls = smoke
    assert len(calls) == len(study.grid(config))
    assert all(result.resumed_from == result.step for result in calls)
    assert {
        p.parent.name: p.read_bytes() for p in sorted((workdir / "runs").glob("*/metrics.jsonl"))
    } == metrics
    assert {p.name: p.read_bytes() for p in sorted((workdir / "analysis").glob("*"))} == analyses


def test_smoke_runs_record_the_final_evaluation(smoke):
    workdir, config, _, _, _, _, _ = smoke
    names = [study.run_name("mnist5k", run) for run in study.grid(config)]
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == sorted(names)
    for name in names:
        cols = records.metric_columns(records.read_metrics(workdir / "runs" / name))
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            assert np.all(np.isfinite(cols[key])), (name, key)


def test_paper_config_builds():
    config = study_config.get_config("paper")
    assert set(config.setups) == {"mnist", "cifar10"}
    assert len(study.grid(config)) == 4 * 3 + 2 * 3
    for name in config.setups:
        setup = study._Setup(config, name)
        assert setup.run_base.model.activation == "relu"
        for run in study.grid(config):  # validates without the data
            validate_config(setup.run_config(run))
    with pytest.raises(ValueError, match="unknown preset"):
        study_config.get_config("huge")


# ------------------------------------------------------------------ pure helpers


def test_helpers_on_known_answers():
    assert study.temperature(0.1, 32) == pytest.approx(0.1 / 32)
    with pytest.raises(ValueError):
        study.temperature(0.1, 0)
    assert study.relative_change(2.0, 3.0) == 0.5
    assert study.relative_change(0.0, 0.0) == 0.0
    assert study.relative_change(0.0, 1.0) == math.inf
    assert study.change_factor(2.0, 0.5) == 4.0 == study.change_factor(0.5, 2.0)
    assert math.isnan(study.change_factor(-1.0, 2.0))
    np.testing.assert_array_equal(
        study.significant([297.00000012, 296.99999991, 0.0, math.inf, 1234567.8], digits=6),
        [297.0, 297.0, 0.0, math.inf, 1234570.0],
    )
    row = {"train_loss": 0.01, "test_loss": 0.5, "train_accuracy": 1.0, "test_accuracy": 0.9}
    assert study.gap(row) == pytest.approx({"gap_loss": 0.49, "gap_error": 0.1})


def test_grid_and_correlations():
    config = study_config.get_config("smoke")
    runs = study.grid(config)
    assert [r["optimizer"] for r in runs] == ["sgd"] * 3 + ["adam"]
    assert study.run_name("mnist5k", runs[0]) == "mnist5k_sgd_lr0.1_b16"
    rows = []
    for i, r in enumerate(runs):
        row = {**r, "temperature": r["learning_rate"] / r["batch_size"], "gap_loss": float(i)}
        row["gap_error"] = -float(i)
        for m in study.MEASURES:
            row[m] = row[f"{m}_rescaled"] = float(i) if m != "lambda_max" else -float(i)
        row["pac_bayes_bound"] = 1.0
        rows.append(row)
    corr = study.correlations(rows)
    assert corr["riemannian_sharpness"]["gap_loss"] == pytest.approx(1.0)
    assert corr["riemannian_sharpness"]["gap_error"] == pytest.approx(-1.0)
    assert corr["lambda_max"]["gap_loss"] == pytest.approx(-1.0)
    assert corr["riemannian_sharpness"]["temperature"] == pytest.approx(1.0)  # SGD rows only
    assert math.isnan(corr["pac_bayes_bound"]["gap_loss"])  # constant


def test_temperature_check_wants_a_negative_rank_correlation():
    config = study_config.get_config("smoke")
    rows = [
        {"optimizer": "sgd", "temperature": t, "riemannian_sharpness": s, "status": "goal_reached"}
        for t, s in ((0.1, 1.0), (0.2, 3.0), (0.3, 2.0), (0.4, 4.0))
    ]
    rising = study._temperature_check(config, rows, "riemannian_sharpness", "")
    for r in rows:
        r["riemannian_sharpness"] = -r["riemannian_sharpness"]
    falling = study._temperature_check(config, rows, "riemannian_sharpness", "")
    assert rising.passed is False and falling.passed is True
    assert falling.value == pytest.approx(-0.8)
    assert "bootstrap CI" in falling.detail and "4 of 4 reached" in falling.detail
    low, high = study.bootstrap_rank_correlation(
        [1, 2, 3, 4, 5], [5, 4, 3, 2, 1], num_resamples=20, seed=0
    )
    assert low == pytest.approx(-1.0) and high == pytest.approx(-1.0)


def test_rescaling_figure_labels_runs_with_eta_and_b(monkeypatch, tmp_path):
    rows = [
        {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 16},
        {"optimizer": "adam", "learning_rate": 0.001, "batch_size": 16},
    ]
    changes = [{m: 1e-9 for m in study.MEASURES} for _ in rows]
    figs = []
    monkeypatch.setattr(
        study.fisher_sharpness_figures.common,
        "figure",
        lambda workdir, name, fig: figs.append(fig) or name,
    )
    study.fisher_sharpness_figures._rescaling_figure(
        tmp_path, rows, changes, study.MEASURES, 1e-6, ""
    )
    texts = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert "SGD η=0.1, B=16" in texts and "Adam η=0.001, B=16" in texts
