"""The edge-of-stability study: the smoke preset's GD and Adam arms, its log lines and its
figure (inspected as matplotlib objects)."""

import logging

import numpy as np
import pytest

from experiments.configs import edge_of_stability as study_config
from experiments.studies import common
from experiments.studies import edge_of_stability as study
from sharpness_jax import sharpness

SMOKE = study_config.get_config("smoke")


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eos")
    mp = pytest.MonkeyPatch()
    figures, save = {}, common.figure

    def kept(workdir, name, fig):
        figures[name] = fig
        return save(workdir, name, fig)

    mp.setattr(common, "figure", kept)
    try:
        summary = common.run_study(study.NAME, study.run, SMOKE, workdir)
    finally:
        mp.undo()
    return workdir, summary, figures


def test_smoke_has_the_adam_arm_with_its_threshold(smoke_study):
    _, summary, _ = smoke_study
    claims = [c["claim"] for c in summary["checks"]]
    (lr,) = SMOKE.adam_learning_rates
    adam = [c for c in claims if c.startswith("adaptive edge of stability") or "Adam" in c]
    assert adam and all(f"η={lr:g}" in c for c in adam)
    entry = summary["results"][f"adam_lr{lr:g}"]
    assert entry["optimizer"] == "adam" and entry["status"] == "completed"
    b1 = SMOKE.adam_b1
    assert entry["threshold"] == pytest.approx((2 + 2 * b1) / ((1 - b1) * lr))
    assert entry["threshold"] == pytest.approx(38 / lr)
    assert np.isfinite(entry["preconditioned_sharpness_peak"])


def test_a_diverged_run_is_reported_with_its_step(smoke_study):
    _, summary, _ = smoke_study
    diverged = [c for c in summary["checks"] if c["claim"] == "GD at η=1 trains"]
    assert len(diverged) == 1 and diverged[0]["passed"] is None
    assert diverged[0]["detail"].startswith("diverged at step ")


def test_logs_name_the_smoke_caveat_and_what_happened(tmp_path, caplog, smoke_study):
    workdir, _, _ = smoke_study
    with caplog.at_level(logging.INFO):
        common.run_study(study.NAME, study.run, SMOKE, workdir)  # read back, no training
    text = caplog.text
    assert common.SMOKE_NOTE in text
    line = next(r for r in text.splitlines() if "GD at η=1 trains" in r)
    assert "[n/a]" in line and "diverged at step " in line and "None" not in line


def test_figure_marks_diverged_runs_and_clips_the_loss_axis(smoke_study):
    _, summary, figures = smoke_study
    fig = figures["lambda_max"]
    assert "smoke" in fig._suptitle.get_text()
    gd_loss, gd_lam, adam_loss, adam_pre = fig.axes
    labels = [t.get_text() for t in gd_loss.get_legend().get_texts()]
    assert labels == ["η=0.1", "η=1 (diverged)"]
    finite = summary["results"]["gd_lr0.1"]
    low, high = gd_loss.get_ylim()
    assert high < 1e3 and low > 0 and high > finite["final_loss"]
    lam_labels = [t.get_text() for t in gd_lam.get_legend().get_texts()]
    assert "2/η (η=0.1)" in lam_labels
    threshold_line = next(ln for ln in gd_lam.get_lines() if ln.get_label() == "2/η (η=0.1)")
    assert threshold_line.get_ydata()[0] == pytest.approx(sharpness.stability_threshold(0.1))
    adam_labels = [t.get_text() for t in adam_pre.get_legend().get_texts()]
    assert adam_labels == ["Adam η=0.01", "(2+2β₁)/((1−β₁)η) (Adam η=0.01)"]
    assert "λ_max(P⁻¹H)" in adam_pre.get_ylabel() and "Adam" in adam_loss.get_title()
