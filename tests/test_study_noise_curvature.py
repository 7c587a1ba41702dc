"""The noise–curvature study: the smoke preset end to end (records, resume, summary) and its
checks (the per-layer analysis is tested in test_layer_noise.py)."""

import json
import math

import numpy as np
import pytest
from study_runs import run_twice

from experiments.configs import noise_curvature as study_config
from experiments.studies import common
from experiments.studies import noise_curvature as study
from sharpness_jax import layer_noise, records
from sharpness_jax.config import validate_config

_LAYERS = ("params/Dense_1/kernel", "params/Dense_2/kernel")


def _expected_claims():
    claims = []
    for label in ("CE", "MSE(softmax)"):
        for layer in _LAYERS:
            claims += [
                f"1 ≤ γ ≤ 2 in the Hessian eigenbasis ({label}, {layer}; paper's bound)"
                if label == "CE"
                else f"γ ≈ 1 in the Hessian eigenbasis ({label}, {layer}; paper reports γ ≈ 1)",
                f"C and H nearly commute ({label}, {layer}): commutator / random-rotation baseline "
                "(paper's commutator test)",
                f"C ∝ E_p[h_p²] ({label}, {layer}): γ predicted from E_p[h_p²] minus measured γ "
                "(paper's γ_AWD vs γ_emp)",
            ]
    claims += [
        f"γ(CE) > γ(MSE) in the Hessian eigenbasis ({layer}; paper: CE γ > 1, mse γ ≈ 1)"
        for layer in _LAYERS
    ]
    return claims


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study run twice in the same workdir, the second time with the training loop
    counted and the analyses forbidden."""
    workdir = tmp_path_factory.mktemp("noise_curvature")
    config = study_config.get_config("smoke")
    r = run_twice(study, config, workdir, forbid=[(study, "_analyse")])
    return r.workdir, r.config, r.first, r.second, r.metrics, r.calls


def test_smoke_summary(smoke):
    workdir, config, first, second, _, _ = smoke
    assert tuple(config.layers) == _LAYERS
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["study"] == study.NAME and summary["preset"] == "smoke"
    assert [c["claim"] for c in summary["checks"]] == _expected_claims()
    for c in summary["checks"]:
        assert isinstance(c["value"], float) and math.isfinite(c["value"]), c
        assert c["passed"] in (True, False), c
    for loss in config.losses:
        entry = summary["results"][loss]
        assert entry["status"] == "completed"
        assert set(entry["layers"]) == set(_LAYERS)
        for res in entry["layers"].values():
            assert res["num_examples"] == config.analysis_examples
            assert res["num_eigen"] == layer_noise.num_eigen(
                res["num_params"], config.eigen_fraction
            )
            for fit in res["fits"].values():
                assert math.isfinite(fit["gamma"]) and 0 <= fit["r2"] <= 1 + 1e-6
                assert fit["ci_low"] <= fit["gamma"] <= fit["ci_high"]
            assert 0 < res["relative_commutator"] and 0 < res["baseline_mean"]
    assert len(summary["figures"]) == 5
    for fig in summary["figures"]:
        assert (workdir / fig).stat().st_size > 0
    for name in ("checks", "results", "figures", "passed"):
        assert second[name] == first[name] == summary[name]


def test_smoke_runs_and_analyses_recorded(smoke):
    workdir, config, _, _, metrics, _ = smoke
    assert sorted(metrics) == sorted(config.losses)
    for loss in config.losses:
        rows = records.read_metrics(workdir / "runs" / loss)
        assert [r["step"] for r in rows] == [0, 20, 40]
        assert all(math.isfinite(r["train_loss"]) and "train_accuracy" in r for r in rows)
        for layer in config.layers:
            stored = json.loads(
                (workdir / "analysis" / f"{loss}__{layer.replace('/', '_')}.json").read_text()
            )
            assert stored["num_params"] in (8 * 8, 8 * 10)


def test_smoke_rerun_retrains_nothing(smoke):
    workdir, config, _, _, metrics, calls = smoke
    assert len(calls) == len(config.losses)
    for result in calls:
        assert result.status == "completed" and result.resumed_from == config.base.max_steps
        assert result.traces.get("train_step", 0) == 0
    after = {p.parent.name: p.read_bytes() for p in (workdir / "runs").glob("*/metrics.jsonl")}
    assert after == metrics


def test_loss_comparison_needs_disjoint_intervals():
    config = study_config.get_config("smoke")

    def results(ce, mse):
        def fit(g, lo, hi):
            return {
                "layers": {
                    _LAYERS[0]: {"fits": {"eigen": {"gamma": g, "ci_low": lo, "ci_high": hi}}}
                }
            }

        return {"cross_entropy": fit(*ce), "softmax_squared_error": fit(*mse)}

    config.layers = _LAYERS[:1]
    (above,) = study._loss_comparison_checks(config, results((1.4, 1.3, 1.5), (1.0, 0.9, 1.1)))
    (overlap,) = study._loss_comparison_checks(config, results((1.2, 1.05, 1.3), (1.0, 0.9, 1.1)))
    (below,) = study._loss_comparison_checks(config, results((1.0, 0.9, 1.1), (1.4, 1.3, 1.5)))
    assert above.passed is True and abs(above.value - 0.4) < 1e-12
    assert overlap.passed is False and below.passed is False


def test_configs_build():
    for preset in ("smoke", "quick", "paper"):
        config = study_config.get_config(preset)
        assert config.preset == preset and tuple(config.layers) == _LAYERS
        for loss in config.losses:
            run_cfg = common.run_config(config.base, **{"loss.name": loss})
            assert validate_config(run_cfg).loss.name == loss  # needs no data
    with pytest.raises(ValueError, match="preset"):
        study_config.get_config("huge")


def test_mse_band_is_the_papers_gamma_one():
    config = study_config.get_config("quick")
    assert tuple(config.losses) == ("cross_entropy", "softmax_squared_error")
    fit = {"gamma": 1.2, "ci_low": 1.1, "ci_high": 1.3, "r2": 0.9, "intercept": 0.0}
    res = {
        "fits": {k: fit for k in ("eigen", "coordinate", "eigen_second_moment")}
        | {"eigen_c_vs_second_moment": fit},
        "num_eigen": 4,
        "num_params": 10,
        "commutator_ratio": 0.1,
        "relative_commutator": 0.1,
        "baseline_mean": 1.0,
        "baseline_std": 0.1,
    }
    mse = study._layer_checks(config, "softmax_squared_error", _LAYERS[0], res)[0]
    ce = study._layer_checks(config, "cross_entropy", _LAYERS[0], res)[0]
    assert mse.claim.startswith("γ ≈ 1") and mse.passed is False  # 1.2 is outside [0.9, 1.15]
    assert ce.claim.startswith("1 ≤ γ ≤ 2") and ce.passed is True


def test_eigenbasis_figure_limits_axes_to_the_fit(monkeypatch, tmp_path):
    config = study_config.get_config("smoke")
    config.losses, config.layers = ("cross_entropy",), _LAYERS[:1]
    lam = np.concatenate([np.geomspace(1.0, 1e-3, 4), [1e-20, 1e-25]])
    an = {"eigenvalues": lam, "c_eigen": lam**1.5, "num_eigen": 4}
    an |= {
        f"eigen/{f}": v
        for f, v in zip(layer_noise.FIT_FIELDS, (1.5, 0.0, 1.0, 1.4, 1.6, 4), strict=True)
    }
    figs = []
    monkeypatch.setattr(common, "figure", lambda workdir, name, fig: figs.append(fig) or name)
    study._power_law_figure(tmp_path, config, {("cross_entropy", _LAYERS[0]): an}, "eigen")
    (ax,) = [a for a in figs[0].axes if a.get_visible()]
    assert ax.get_xlim()[0] >= 1e-3 / 3 and ax.get_ylim()[0] >= 10**-4.5 / 3
    assert "top N = 4" in ax.get_title()
    assert any("top N = 4 of 6" in t.get_text() for t in ax.get_legend().get_texts())
    assert "η = 0.1" in figs[0]._suptitle.get_text()
