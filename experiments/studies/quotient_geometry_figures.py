"""Figures of the quotient-geometry study (:mod:`experiments.studies.quotient_geometry`).

``plot_data[model]`` holds, per model, the study's facts (sizes of the two setups, the GD
step size, the orbit analyses, the conservation curves) with the spectra at initialisation
and at the interpolating minimum, the training columns and the SGD split columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from experiments.studies import common


def figures(
    workdir: Path, plot_data: Mapping[str, Mapping[str, Any]], config: ml_collections.ConfigDict
) -> list[str]:
    """The study's five figures (spectra, training, orbit, split, conserved)."""
    return [
        _spectra_figure(workdir, plot_data),
        _training_figure(workdir, plot_data),
        _orbit_figure(workdir, plot_data, config),
        _split_figure(workdir, plot_data),
        _conservation_figure(workdir, plot_data),
    ]


_LOG_LOG = {"xscale": "log", "yscale": "log"}


def _finish(ax, *, legend_size: int = 7, **properties) -> None:
    """``ax.set(**properties)`` (scales, labels, title) and a frameless legend."""
    ax.set(**properties)
    ax.legend(fontsize=legend_size, frameon=False)


def _finish_log_log(ax, xlabel: str, ylabel: str, title: str, **properties) -> None:
    """:func:`_finish` on log–log axes."""
    _finish(ax, **_LOG_LOG, xlabel=xlabel, ylabel=ylabel, title=title, **properties)


def _grid(rows: int, cols: int, width: float = 4.6, height: float = 3.4):
    """A figure of rows × cols axes with fixed margins (a layout engine would cost several
    times the drawing)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    fig.subplots_adjust(
        left=0.9 / (width * cols),
        right=1 - 0.15 / (width * cols),
        bottom=0.55 / (height * rows),
        top=1 - 0.35 / (height * rows),
        wspace=0.3,
        hspace=0.5 if rows > 1 else 0.2,
    )
    return fig, axes


def _save(workdir, name: str, fig) -> str:
    for ax in fig.axes:
        ax.title.set_fontsize(9)
    return common.figure(workdir, name, fig)


def _abs_spectra(ax, spectra: Mapping[str, np.ndarray], title: str) -> None:
    """Sorted spectra (descending) as |λ| on a log axis; negative eigenvalues marked ×, so
    that the near-zero plateau and its gap stay readable."""
    floor = np.finfo(float).tiny
    for label, values in spectra.items():
        values = np.sort(np.asarray(values, float))[::-1]
        index = np.arange(1, values.size + 1)
        (line,) = ax.plot(index, np.maximum(np.abs(values), floor), lw=1.0, label=label)
        neg = values < 0
        ax.plot(index[neg], np.abs(values[neg]), "x", ms=3, color=line.get_color())
    ax.set(yscale="log", xlabel="index (eigenvalues sorted, descending)", ylabel="|λ| (× : λ < 0)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)


def _spectra_figure(workdir, plot_data) -> str:
    fig, axes = _grid(2, len(plot_data))
    for j, (model, p) in enumerate(plot_data.items()):
        s = p["sizes_u"]
        _abs_spectra(
            axes[0, j],
            {
                "ambient H, init": p["init_spectra"][0],
                "reduced BᵀHB, init": p["init_spectra"][1],
                "ambient H, interpolating min": p["min_spectra"][0],
                "reduced BᵀHB, interpolating min": p["min_spectra"][1],
            },
            f"{model}, underdetermined (P={s['P']}, m={s['m']}, n·K={s['n'] * s['K']})",
        )
        o, r = p["orbit_reg"], p["sizes_r"]
        spectra = {"ambient H": o["reference_ambient"], "reduced BᵀHB": o["reference_reduced"]}
        if "reference_generalised" in o:
            spectra["quotient: BᵀHB y = λ BᵀGB y"] = o["reference_generalised"]
        _abs_spectra(
            axes[1, j],
            spectra,
            f"{model}, regular (P={r['P']}, m={r['m']}, n·K={r['n'] * r['K']}), "
            f"step {p['orbit_step']}",
        )
    return _save(workdir, "spectra", fig)


def _training_figure(workdir, plot_data) -> str:
    fig, axes = _grid(2, len(plot_data))
    for j, (model, p) in enumerate(plot_data.items()):
        t, s = p["training"], p["sizes_u"]
        ax = axes[0, j]
        ax.plot(t["step"], t["train_loss"], label="train loss")
        ax.plot(t["step"], t["quotient_lambda_max"], label="λ_max(H) ambient")
        ax.plot(t["step"], t["quotient_reduced_lambda_max"], "--", label="λ_max(BᵀHB) reduced")
        _finish(
            ax, yscale="log", xlabel="step", title=f"{model}: GD η={p['lr0']:g} (underdetermined)"
        )
        ax = axes[1, j]
        ax.plot(t["step"], t["quotient_ambient_zeros"], label="H ambient")
        ax.plot(t["step"], t["quotient_reduced_zeros"], label="BᵀHB reduced")
        for value, label in (
            (s["P"] - s["n"] * s["K"], "P − n·K"),
            (s["P"] - s["m"] - s["n"] * s["K"], "P − m − n·K"),
        ):
            ax.axhline(value, ls=":", lw=1.0, color="gray")
            ax.annotate(label, (t["step"][-1], value), fontsize=7, ha="right", va="bottom")
        _finish(
            ax,
            xlabel="step",
            ylabel="near-zero eigenvalues",
            title=f"{model}: false-flat zero modes (m = {s['m']})",
        )
    return _save(workdir, "training", fig)


def _orbit_figure(workdir, plot_data, config) -> str:
    fig, axes = _grid(3, len(plot_data))
    styles = {
        "λ_max(H) ambient": dict(lw=2.5, alpha=0.6),
        "λ_max(BᵀHB) reduced": dict(ls="--"),
        "quotient λ_max, scale-invariant W": dict(),
        "quotient λ_max, Euclidean W": dict(ls=":"),
    }
    for j, (model, p) in enumerate(plot_data.items()):
        o = p["orbit_reg"]
        curves = {
            "λ_max(H) ambient": o["ambient_lambda_max"],
            "λ_max(BᵀHB) reduced": o["reduced_lambda_max"],
        }
        if "generalised_lambda_max" in o:
            curves["quotient λ_max, scale-invariant W"] = o["generalised_lambda_max"]
            curves["quotient λ_max, Euclidean W"] = o["generalised_euclidean_lambda_max"]
        ax = axes[0, j]
        for label, y in curves.items():
            ax.plot(o["c"], np.abs(y), marker="o", ms=3, label=label, **styles[label])
        _finish_log_log(
            ax,
            "rescaling c of every unit",
            "|λ_max|",
            f"{model}: orbit of the regular point (step {p['orbit_step']})",
        )
        om = p["orbit_min"]
        ax = axes[1, j]
        for label in ("λ_max(H) ambient", "λ_max(BᵀHB) reduced"):
            key = "ambient_lambda_max" if "ambient" in label else "reduced_lambda_max"
            ax.plot(om["c"], om[key], marker="o", ms=3, label=label, **styles[label])
        _finish_log_log(
            ax, "rescaling c of every unit", "λ_max", f"{model}: orbit of the interpolating minimum"
        )
        ax = axes[2, j]
        ax.plot(om["c"], om["ambient_zeros"], marker="o", ms=3, label="H ambient")
        ax.plot(om["c"], om["reduced_zeros"], marker="o", ms=3, label="BᵀHB reduced")
        _finish(
            ax,
            xscale="log",
            xlabel="rescaling c of every unit",
            ylabel=f"#|λ| ≤ {config.zero_rtol:g}·λ_max(H)",
            title=f"{model}: near-zero eigenvalues along that orbit",
        )
    return _save(workdir, "orbit", fig)


def _split_figure(workdir, plot_data) -> str:
    fig, axes = _grid(1, len(plot_data), width=5.2, height=3.8)
    for j, (model, p) in enumerate(plot_data.items()):
        s = p["split"]
        ax = axes[0, j]
        tiny = np.finfo(float).tiny
        for prefix, label, ls in (
            ("split", "Euclidean, SGD+wd", "-"),
            ("split_si", "scale-inv., SGD", "--"),
        ):
            for key, what in (
                ("jvp_horizontal", "‖J δ_h‖"),
                ("change_vertical", "‖f(θ+δ_v) − f(θ)‖"),
                ("jvp_vertical", "‖J δ_v‖"),
            ):
                y = np.maximum(s[f"{prefix}_{key}"], tiny)
                ax.plot(
                    s["step"][s["step"] > 0], y[s["step"] > 0], ls=ls, label=f"{what} ({label})"
                )
        _finish_log_log(
            ax,
            "step",
            "predictor change (RMS)",
            f"{model}: predictor change of the parts of SGD steps",
            legend_size=6,
        )
    return _save(workdir, "split", fig)


def _conservation_figure(workdir, plot_data) -> str:
    fig, axes = _grid(2, len(plot_data))
    for j, (model, p) in enumerate(plot_data.items()):
        c = p["conservation"]
        ax = axes[0, j]
        for lr, (t, drift) in sorted(c["curves"].items()):
            ok = t > 0
            ax.plot(t[ok], np.maximum(drift[ok], np.finfo(float).tiny), label=f"η={lr:g}")
        _finish_log_log(
            ax,
            "time η·step",
            "max_i |Q_i(t) − Q_i(0)| / scale",
            f"{model}: drift of k‖a_i‖² − ‖w_i‖² − b_i² along GD",
        )
        ax = axes[1, j]
        lrs, drift = np.array(c["learning_rates"]), np.array(c["drift_max"])
        ax.plot(lrs, drift, marker="o", label=f"measured (slope {c['slope']:.2f})")
        ax.plot(lrs, drift[-1] * lrs / lrs[-1], ls="--", color="gray", label="∝ η")
        _finish_log_log(ax, "η", "max drift over the run", f"{model}: drift against the step size")
    return _save(workdir, "conserved", fig)
