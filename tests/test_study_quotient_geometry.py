"""The quotient-geometry study: the smoke preset end to end (records, resume, summary), the
measurement against the steps training takes, and the pure helpers on known answers."""

import json
import math

import jax
import numpy as np
import pytest
from study_runs import run_twice

from experiments.configs import quotient_geometry as study_config
from experiments.studies import common
from experiments.studies import quotient_geometry as study
from sharpness_jax import quotient_summary, records, training
from sharpness_jax.config import validate_config

_CLAIMS = (
    "{m}: ambient flatness moves along the orbit (max/min λ_max(H), c ∈ [0.1, 10])",
    "{m}: the quotient curvature does not move along the orbit (max relative change of the "
    "generalised spectrum of (BᵀHB, BᵀGB), scale-invariant W)",
    "{m}: at the interpolating minimum the ambient Hessian has m = {w} more near-zero "
    "eigenvalues than the reduced Hessian",
    "{m}: vertical motion does not change the predictor to first order "
    "(max (‖Jδ_v‖/‖δ_v‖)/(‖Jδ_h‖/‖δ_h‖) over SGD steps)",
    "{m}: the split steps have a vertical part (median ‖δ_v‖/‖δ‖, the smaller of the two splits)",
    "{m}: k‖a_i‖² − ‖w_i‖² − b_i² is conserved along GD (max relative drift at η={eta:g})",
    "{m}: the drift shrinks with η (log-log slope of the drift against η)",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study run twice in the same workdir; the second run's train results."""
    workdir = tmp_path_factory.mktemp("quotient_geometry")
    r = run_twice(study, study_config.get_config("smoke"), workdir)
    return r.workdir, r.config, r.first, r.second, r.metrics, r.calls


def _expected_claims(config):
    claims = []
    for model in config.model_names:
        setup = config.models[model].underdetermined
        eta = setup.optimizer.learning_rate * min(config.lr_factors)
        claims += [c.format(m=model, w=setup.model.width, eta=eta) for c in _CLAIMS]
    return claims


def test_smoke_summary(smoke):
    workdir, config, first, _, _, _ = smoke
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["study"] == study.NAME and summary["preset"] == "smoke"
    assert [c["claim"] for c in summary["checks"]] == _expected_claims(config)
    for c in summary["checks"]:
        assert isinstance(c["value"], float) and math.isfinite(c["value"]), c
        assert c["passed"] in (True, False), c
    for model in config.model_names:
        r = summary["results"][model]
        assert r["underdetermined"]["n"] * r["underdetermined"]["K"] < r["underdetermined"]["P"]
        reg = r["regular"]
        assert reg["P"] - reg["m"] <= reg["n"] * reg["K"] < reg["P"]
        for key in ("ambient_ratio", "generalised_change", "jacobian_condition"):
            assert math.isfinite(reg[key]), (model, key)
    assert len(summary["figures"]) == 5
    for fig in summary["figures"]:
        assert (workdir / fig).stat().st_size > 0
    strip = lambda s: {k: v for k, v in s.items() if k != "elapsed_s"}
    assert strip(summary) == strip(json.loads(json.dumps(first)))


def test_smoke_exact_claims_hold(smoke):
    """The claims that are identities hold even at smoke scale (float64)."""
    _, config, first, _, _, _ = smoke
    checks = {c["claim"]: c for c in first["checks"]}
    for model in config.model_names:
        claims = _expected_claims(config)
        mine = [c for c in claims if c.startswith(f"{model}:")]
        assert checks[mine[1]]["value"] < 1e-6  # invariance of the quotient curvature
        assert checks[mine[3]]["value"] < 1e-10  # J δ_v = 0
        assert checks[mine[0]]["value"] > 10  # λ_max(H) ∝ c^{±2k} along the orbit


def test_smoke_runs_record_every_measurement(smoke):
    workdir, config, _, _, _, _ = smoke
    runs = sorted(p.name for p in (workdir / "runs").iterdir())
    assert len(runs) == len(config.model_names) * (len(config.lr_factors) + 2)
    for name in runs:
        rows = records.read_metrics(workdir / "runs" / name)
        cols = records.metric_columns(rows)
        assert cols["step"][0] == 0
        for key in ("train_loss", "quotient_lambda_max", "quotient_gradient_norm"):
            assert np.all(np.isfinite(cols[key])), (name, key)
        arrays = records.load_arrays(workdir / "runs" / name, rows[-1])
        p = arrays["quotient_params"].size
        assert arrays["quotient_ambient"].shape == (p,)
        m = arrays["quotient_conserved"].size
        assert arrays["quotient_reduced"].shape == (p - m,)
        if "regular" in name:
            assert arrays["quotient_generalised"].shape == (p - m,)
        else:
            assert np.all(np.isfinite(cols["split_jvp_horizontal"])), name


def test_split_is_the_step_training_takes(smoke):
    """δ of the measurement at step 0 is θ₁ − θ₀ of the SGD run (same batch, same rule)."""
    workdir, config, _, _, _, _ = smoke
    for model in config.model_names:
        name = f"{model}_sgd_wd{config.sgd.weight_decay:g}"
        rows = {r["step"]: r for r in records.read_metrics(workdir / "runs" / name)}
        assert 0 in rows and 1 in rows
        theta = [
            records.load_arrays(workdir / "runs" / name, rows[s])["quotient_params"] for s in (0, 1)
        ]
        step = np.linalg.norm(theta[1] - theta[0])
        assert rows[0]["split_step_norm"] == pytest.approx(step, rel=1e-10)
        h, v = rows[0]["split_horizontal_norm"], rows[0]["split_vertical_norm"]
        assert h**2 + v**2 == pytest.approx(step**2, rel=1e-10)  # Euclidean: orthogonal


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
    assert strip(second) == strip(first)


def test_paper_and_quick_presets_build():
    for preset in ("quick", "paper"):
        config = study_config.get_config(preset)
        for model in config.model_names:
            for regime in ("underdetermined", "regular"):
                setup = config.models[model][regime]
                run = common.run_config(config.base, **study.flatten_overrides(setup.to_dict()))
                validate_config(run)
    with pytest.raises(ValueError, match="unknown preset"):
        study_config.get_config("huge")


# ------------------------------------------------------------------------- pure helpers


def test_flatten_overrides():
    nested = {
        "model": {"name": "shallow", "width": 4},
        "max_steps": 3,
        "measure": {"options": {"x": {"y": 1}}},
    }
    assert study.flatten_overrides(nested) == {
        "model.name": "shallow",
        "model.width": 4,
        "max_steps": 3,
        "measure.options": {"x": {"y": 1}},
    }


def test_study_helpers_are_the_library_ones():
    for name in ("relative_change", "relative_drift", "log_slope", "orbit_scales"):
        assert getattr(study, name) is getattr(quotient_summary, name), name


def test_measurement_refuses_unsupported_runs():
    config = study_config.get_config("smoke")
    overrides = study.flatten_overrides(config.models.relu.underdetermined.to_dict())
    run = common.run_config(config.base, **{**overrides, "optimizer.name": "momentum"})
    with jax.enable_x64(True), pytest.raises(ValueError, match="plain GD/SGD"):
        training.train(run)
    run = common.run_config(config.base, **{**overrides, "measure_subset": 2})
    with jax.enable_x64(True), pytest.raises(ValueError, match="measure_subset=None"):
        training.train(run)
