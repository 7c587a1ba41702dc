"""Figures of the Fisher-sharpness study (:mod:`experiments.studies.fisher_sharpness`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.studies import common
from sharpness_jax import plots


def figures(
    workdir: Path,
    rows: Sequence[Mapping[str, Any]],
    corr: Mapping[str, Mapping[str, float]],
    changes: Sequence[Mapping[str, float]],
    *,
    labels: Mapping[str, str],
    tol: float,
    tag: str,
) -> list[str]:
    """The study's four figures of one dataset; ``changes[i][m]`` is the relative change of
    measure ``m`` of run ``i`` under rescaling and ``labels`` the measures' labels."""
    return [
        _gap_figure(workdir, rows, corr, labels, tag),
        _temperature_figure(workdir, rows, corr, labels, tag),
        _rescaling_figure(workdir, rows, changes, labels, tol, tag),
        _pac_bayes_figure(workdir, rows, tag),
    ]


def _short(row: Mapping[str, Any]) -> str:
    """A run's label: its optimiser, learning rate and batch size (e.g. "SGD η=0.1, B=16")."""
    opt = "Adam" if row["optimizer"] == "adam" else "SGD"
    return f"{opt} η={row['learning_rate']:g}, B={row['batch_size']}"


def _gap_figure(workdir: Path, rows, corr, labels, tag: str) -> str:
    import matplotlib.pyplot as plt

    measures = (
        "riemannian_sharpness",
        "riemannian_sharpness_damped",
        "lambda_max",
        "trace_hessian",
    )
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
    gaps = np.array([r["gap_loss"] for r in rows])
    run_labels = [_short(r) for r in rows]
    for ax, m in zip(axes, measures, strict=True):
        points = {
            "trained nets": (gaps, np.array([r[m] for r in rows])),
            "rescaled (same functions)": (gaps, np.array([r[f"{m}_rescaled"] for r in rows])),
        }
        plots.scatter(
            points,
            xlabel="generalisation gap (test − train loss)",
            ylabel=labels[m],
            title=f"{labels[m]}: ρ = {corr[m]['gap_loss']:.2f} → "
            f"{corr[m + '_rescaled']['gap_loss']:.2f} rescaled",
            logy=True,
            annotate={"trained nets": run_labels},
            ax=ax,
        )
    fig.suptitle("Riemannian vs Euclidean sharpness against the generalisation gap", fontsize=11)
    return common.figure(workdir, f"{tag}sharpness_vs_gap", fig)


def _temperature_figure(workdir: Path, rows, corr, labels, tag: str) -> str:
    import matplotlib.pyplot as plt

    sgd = [r for r in rows if r["optimizer"] == "sgd"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, m in zip(
        axes, ("riemannian_sharpness", "riemannian_sharpness_damped", "lambda_max"), strict=True
    ):
        points = {}
        for b in sorted({r["batch_size"] for r in sgd}):
            sel = [r for r in sgd if r["batch_size"] == b]
            points[f"SGD, B = {b}"] = (
                np.array([r["temperature"] for r in sel]),
                np.array([r[m] for r in sel]),
            )
        plots.scatter(
            points,
            xlabel="temperature η/B",
            ylabel=labels[m],
            title=f"{labels[m]}: Spearman ρ = {corr[m]['temperature']:.2f}",
            logx=True,
            logy=True,
            ax=ax,
        )
    fig.suptitle("sharpness against the SGD temperature η/B", fontsize=11)
    return common.figure(workdir, f"{tag}sharpness_vs_temperature", fig)


def _rescaling_figure(workdir: Path, rows, changes, labels, tol: float, tag: str) -> str:
    import matplotlib.pyplot as plt

    measures = list(labels)
    floor = 1e-17
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(measures) + 0.25 * len(rows) + 1), 4.0))
    width = 0.8 / len(rows)
    for i, (r, row_changes) in enumerate(zip(rows, changes, strict=True)):
        change = [max(row_changes[m], floor) for m in measures]
        ax.bar(
            np.arange(len(measures)) + (i - (len(rows) - 1) / 2) * width,
            change,
            width,
            label=_short(r),
            bottom=floor,
            color=plt.cm.tab20(i % 20),
        )
    ax.axhline(tol, color="k", ls="--", lw=1.0, label=f"invariance tolerance {tol:g}")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(measures)))
    ax.set_xticklabels([labels[m] for m in measures], fontsize=8, rotation=12)
    ax.set_ylabel("|after − before| / before")
    ax.set_title("relative change under a random function-preserving rescaling", fontsize=10)
    ax.legend(fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return common.figure(workdir, f"{tag}rescaling", fig)


def _pac_bayes_figure(workdir: Path, rows, tag: str) -> str:
    import matplotlib.pyplot as plt

    terms = {
        "empirical loss L̂": "pac_bayes_empirical_loss",
        "curvature (ρ/2)·Ŝ_R,ε": "pac_bayes_curvature_term",
        "complexity √((KL + ln(2√n/δ))/2n)": "pac_bayes_complexity_term",
    }
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(rows) + 3), 3.8), constrained_layout=True)
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for label, key in terms.items():
        values = np.array([r[key] for r in rows])
        ax.bar(x, values, 0.6, bottom=bottom, label=label)
        bottom = bottom + values
    ax.plot(x, [r["test_loss"] for r in rows], "k*", label="test loss")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(r) for r in rows], fontsize=7, rotation=30)
    ax.set_ylabel("loss")
    ax.set_title("PAC-Bayes bound (standard form) with a Fisher-shaped posterior", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return common.figure(workdir, f"{tag}pac_bayes", fig)
