"""The progressive-sharpening study: the smoke preset end to end (records, resume, summary) and
its helpers against known answers and dense references."""

import itertools
import json
import math

import numpy as np
import pytest
from study_runs import run_twice

from experiments.configs import progressive_sharpening as study_config
from experiments.studies import progressive_sharpening as study
from sharpness_jax import records
from sharpness_jax.config import validate_config

_CHECK_CLAIMS = (
    "progressive sharpening (baseline): λ_max rises during training",
    "baseline: the Jacobian norm (jacobian_spectral_max) rises during training",
    "baseline: λ_max and the Jacobian norm (jacobian_spectral_max) rise together during sharpening",
    "baseline: λ_max co-moves with the Λ-weighted Jacobian term max_p ‖Λ_p^½ J_p‖₂² over the "
    "whole run",
    "label_smoothing (a regulariser) lowers the final Jacobian norm",
    "sam (a regulariser) lowers the final Jacobian norm",
    "SAM lowers the final λ_max",
    "the final Jacobian norm tracks the error gap (train − test accuracy) across runs",
    "the Jacobian norm tracks the error gap (train − test accuracy) at least as well as λ_max",
    "the final Jacobian norm tracks the loss gap (test − train unsmoothed loss) across runs",
    "the Jacobian norm tracks the loss gap (test − train unsmoothed loss) at least as well as "
    "λ_max",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study run twice in the same workdir; the second run's train results."""
    workdir = tmp_path_factory.mktemp("progressive_sharpening")
    r = run_twice(study, study_config.get_config("smoke"), workdir)
    return r.workdir, r.config, r.first, r.second, r.metrics, r.calls


def test_smoke_summary(smoke):
    workdir, config, _, second, _, _ = smoke
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["study"] == study.NAME and summary["preset"] == "smoke"
    assert [c["claim"] for c in summary["checks"]] == list(_CHECK_CLAIMS)
    for c in summary["checks"]:
        assert isinstance(c["value"], float) and math.isfinite(c["value"]), c
        assert c["passed"] in (True, False), c
        assert "source: " in c["detail"], c
    assert set(summary["results"]["regularisers"]) == {"label_smoothing", "sam"}
    runs = summary["results"]["runs"]
    assert set(runs) == {f"{v}_seed{s}" for v in config.variants for s in config.seeds}
    for entry in runs.values():
        for key in ("lambda_max_final", "jacobian_final", "error_gap", "loss_gap"):
            assert math.isfinite(entry[key])
        assert entry["jacobian_final"] > 0 and entry["lambda_max_final"] > 0
    for fig in summary["figures"]:
        assert (workdir / fig).stat().st_size > 0
    assert len(summary["figures"]) == 4
    assert summary == json.loads(json.dumps(second))


def test_smoke_runs_record_every_measurement(smoke):
    workdir, config, _, _, _, _ = smoke
    n = 64
    for (variant, overrides), seed in itertools.product(config.variants.items(), config.seeds):
        rows = records.read_metrics(workdir / "runs" / f"{variant}_seed{seed}")
        cols = records.metric_columns(rows)
        max_steps = round(config.epochs * n / config.base.batch_size)
        every = max_steps // config.num_measurements
        log_steps = np.round(np.geomspace(1, every, config.num_log_measurements))
        want = np.union1d(np.union1d(np.arange(0, max_steps + 1, every), log_steps), [max_steps])
        np.testing.assert_array_equal(cols["step"], want)
        for key in (
            "lambda_max",
            "jacobian_spectral_max",
            "jacobian_frobenius_mean",
            "output_curvature_max",
            "input_gauss_newton_max",
            "unsmoothed_train_loss",
            "unsmoothed_test_loss",
            "train_accuracy",
        ):
            assert np.all(np.isfinite(cols[key])), (variant, key)
        # κ_p ≤ ‖Λ_p‖₂‖J_p‖₂², and for softmax cross-entropy ‖Λ_p‖₂ ≤ 1/2.
        assert np.all(cols["output_curvature_max"] <= 0.5 + 1e-6)
        assert np.all(
            cols["input_gauss_newton_max"]
            <= cols["output_curvature_max"] * cols["jacobian_spectral_max"] ** 2 * (1 + 1e-4)
        )
        smoothed = overrides.to_dict().get("loss", {}).get("label_smoothing", 0.0)
        same = np.allclose(cols["unsmoothed_train_loss"], cols["train_loss"])
        assert same == (smoothed == 0.0), variant


def test_smoke_rerun_retrains_nothing(smoke):
    workdir, _, first, second, metrics, calls = smoke
    assert calls, "the rerun did not read the runs back through training.train"
    for result in calls:
        assert result.resumed_from == result.step  # restored at the final checkpoint
        assert result.traces == {}  # nothing compiled, nothing trained or measured
    after = {
        p.parent.name: p.read_bytes() for p in sorted((workdir / "runs").glob("*/metrics.jsonl"))
    }
    assert after == metrics
    strip = lambda s: {k: v for k, v in s.items() if k != "elapsed_s"}
    assert json.dumps(strip(second), sort_keys=True) == json.dumps(strip(first), sort_keys=True)


def test_configs_build():
    for preset in ("smoke", "quick", "paper"):
        config = study_config.get_config(preset)
        assert "baseline" in config.variants
        for overrides in config.variants.values():
            cfg = study._run_config(config, overrides.to_dict(), 0, 1000)
            validate_config(cfg)  # needs no data (CIFAR-10 is not available here)
            assert cfg.max_steps >= config.num_measurements
    with pytest.raises(ValueError, match="unknown preset"):
        study_config.get_config("huge")
    bad = study_config.get_config("smoke")
    bad.jacobian_column = "jacobian_norm"
    with pytest.raises(ValueError, match="jacobian_column"):
        study.run(bad, None)
    bad = study_config.get_config("smoke")
    bad.regularisers = ("label_smoothing", "dropout")
    with pytest.raises(ValueError, match=r"regularisers \['dropout'\] are not variants"):
        study.run(bad, None)
    for preset in ("smoke", "quick", "paper"):
        config = study_config.get_config(preset)
        assert config.variants.sam.optimizer.sam_rho == 0.05
        assert "sam" in config.regularisers


# ---------------------------------------------------------------------------- helpers


def test_dotted_overrides():
    assert study._dotted({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


# ---------------------------------------------------------------------------- the checks


def _baseline(**overrides):
    base = {
        "lambda_max_growth": 3.0,
        "jacobian_growth": 2.0,
        "sharpening_correlation": 0.8,
        "sharpening_points": 6,
        "time_correlation": -0.9,  # whole run, unweighted: reported, never checked
        "time_correlation_gauss_newton": 0.7,
    }
    return {**base, **overrides}


def _passed(checks_):
    return [c.passed for c in checks_]


def test_baseline_checks_pass_and_fail():
    kw = {"col": "jacobian_spectral_max", "growth_factor": 1.5, "correlation_min": 0.5}
    good = study.baseline_checks(_baseline(), **kw)
    assert _passed(good) == [True] * 4
    assert [c.value for c in good] == [3.0, 2.0, 0.8, 0.7]
    assert all("source: " in c.detail for c in good)
    assert "Fig. 1" in good[2].detail and "ansatz" in good[3].detail
    bad = study.baseline_checks(
        _baseline(
            lambda_max_growth=1.2,
            jacobian_growth=1.4,
            sharpening_correlation=0.4,
            time_correlation_gauss_newton=-0.2,
        ),
        **kw,
    )
    assert _passed(bad) == [False] * 4


def test_regulariser_checks_pass_and_fail():
    ratios = {
        "label_smoothing": {"jacobian_final": 0.6, "lambda_max_final": 7.6},  # λ_max not checked
        "weight_decay": {"jacobian_final": 1.3, "lambda_max_final": 0.5},
        "sam": {"jacobian_final": 0.8, "lambda_max_final": 0.7},
    }
    checks_ = study.regulariser_checks(tuple(ratios), ratios)
    assert [c.claim for c in checks_] == [
        "label_smoothing (a regulariser) lowers the final Jacobian norm",
        "weight_decay (a regulariser) lowers the final Jacobian norm",
        "sam (a regulariser) lowers the final Jacobian norm",
        "SAM lowers the final λ_max",
    ]
    assert _passed(checks_) == [True, False, True, True]
    assert all("Fig. 5" in c.detail for c in checks_)
    ratios["sam"] = {"jacobian_final": math.nan, "lambda_max_final": 1.1}
    assert _passed(study.regulariser_checks(("sam",), ratios)) == [None, False]
    assert study.regulariser_checks(("label_smoothing",), ratios)[-1].claim.startswith("label")


def test_gap_checks_pass_and_fail():
    good = {g: {"jacobian_spectral_max": 0.8, "lambda_max": 0.3} for g in study.GAPS}
    assert _passed(study.gap_checks("jacobian_spectral_max", good, 6)) == [True] * 4
    bad = {
        "error_gap": {"jacobian_spectral_max": -0.2, "lambda_max": -0.5},
        "loss_gap": {"jacobian_spectral_max": 0.4, "lambda_max": 0.6},
    }
    checks_ = study.gap_checks("jacobian_spectral_max", bad, 6)
    assert _passed(checks_) == [False, True, True, False]
    np.testing.assert_allclose([c.value for c in checks_], [-0.2, 0.3, 0.4, -0.2])
