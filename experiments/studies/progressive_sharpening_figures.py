"""Figures of the progressive-sharpening study (:mod:`experiments.studies.progressive_sharpening`):
the curves of λ_max and of the Jacobian norm over training, λ_max against the Jacobian norm,
the final values against the generalisation gaps, and the ratios of the theory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from experiments.studies import common

GAPS = ("error_gap", "loss_gap")


def styles(variant_of: Mapping[str, str], seeds) -> dict[str, dict[str, Any]]:
    """Matplotlib styles per run: one colour per variant, line style and marker per seed (the
    k-th run of a variant is that of ``seeds[k]``)."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = list(dict.fromkeys(variant_of.values()))
    out, seen = {}, {}
    for name, variant in variant_of.items():
        k = seen[variant] = seen.get(variant, -1) + 1
        out[name] = {
            "color": colors[variants.index(variant) % len(colors)],
            "ls": _LINE_STYLES[k % 4],
            "marker": ("o", "s", "^", "D")[k % 4],
            "label": variant if k == 0 else None,  # one legend entry per variant
            "seed": seeds[k],
        }
    return out


_LINE_STYLES = ("-", "--", ":", "-.")


def _legends(ax, run_styles) -> None:
    """Two legends on ``ax``: the variants (colours) and the seeds (line styles)."""
    from matplotlib.lines import Line2D

    first = ax.legend(fontsize=7, frameon=False, loc="upper left", title="variant")
    first.get_title().set_fontsize(7)
    ax.add_artist(first)
    seeds = {st["seed"]: st["ls"] for st in run_styles.values()}
    handles = [Line2D([], [], color="0.3", ls=ls, lw=1.3) for ls in seeds.values()]
    labels = [f"seed {seed}" for seed in seeds]
    second = ax.legend(
        handles, labels, fontsize=7, frameon=False, loc="lower right", title="line style"
    )
    second.get_title().set_fontsize(7)


def _epoch_figure(workdir, name: str, runs, styles, panels, setting: str = "", **axis) -> str:
    """Two panels of curves against the epoch, one curve per run, each with the legends of
    the colours (variants) and line styles (seeds); ``panels`` holds ``(curve key, ylabel,
    title)`` of each, ``setting`` the figure's title, ``axis`` further axis properties."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
        for run_name, r in runs.items():
            st = styles[run_name]
            ax.plot(
                r["curves"]["epoch"],
                r["curves"][key],
                color=st["color"],
                ls=st["ls"],
                lw=1.3,
                label=st["label"],
            )
        ax.set(xlabel="epoch", ylabel=ylabel, **axis)
        ax.set_title(title, fontsize=10)
        _legends(ax, styles)
    if setting:
        fig.suptitle(setting, fontsize=10)
    return common.figure(workdir, name, fig)


def figure_curves(workdir, runs, styles, col, setting: str) -> str:
    """λ_max and the Jacobian norm against the epoch (the paper's Fig. 1 kind), titled with
    the training setting."""
    panels = (
        ("lambda_max", "λ_max(H)", "sharpness over training"),
        ("jacobian", _jacobian_label(col), "input–output Jacobian norm over training"),
    )
    title = f"progressive sharpening and the Jacobian: {setting}"
    return _epoch_figure(workdir, "lambda_max_and_jacobian", runs, styles, panels, title)


def figure_scatter(workdir, runs, styles, col) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(5.5, 4.2), constrained_layout=True)
    for name, r in runs.items():
        st = styles[name]
        x, y = r["curves"]["jacobian"], r["curves"]["lambda_max"]
        ax.plot(x, y, color=st["color"], ls=st["ls"], lw=0.7, alpha=0.6)
        ax.scatter(x, y, color=st["color"], marker=st["marker"], s=12, label=st["label"])
    ax.set(xscale="log", yscale="log", xlabel=_jacobian_label(col), ylabel="λ_max(H)")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title("λ_max against the Jacobian norm along training", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return common.figure(workdir, "jacobian_vs_lambda_max", fig)


def figure_gaps(workdir, entries, styles, gap_corr, col) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 7), constrained_layout=True)
    labels = {"error_gap": "train − test accuracy", "loss_gap": "test − train loss (no smoothing)"}
    columns = (
        ("lambda_max_final", "final λ_max", "lambda_max"),
        (f"{col}_final", f"final {_jacobian_label(col)}", col),
    )
    for row, gap in enumerate(GAPS):
        for ax, (key, xlabel, q) in zip(axes[row], columns, strict=True):
            for name, e in entries.items():
                st = styles[name]
                ax.scatter(
                    e[key], e[gap], color=st["color"], marker=st["marker"], s=28, label=st["label"]
                )
            ax.set(xlabel=xlabel, ylabel=labels[gap])
            ax.set_title(f"Spearman ρ over runs = {gap_corr[gap][q]:.2f}", fontsize=10)
    axes[0, 0].legend(fontsize=7, frameon=False)
    return common.figure(workdir, "generalisation_gap", fig)


def figure_ratios(workdir, runs, styles) -> str:
    panels = (
        ("ratio_jacobian", "λ_max / max_p ‖J_p‖₂²", "sharpness over the squared Jacobian norm"),
        (
            "ratio_gauss_newton",
            "λ_max / max_p ‖J_pᵀ Λ_p J_p‖₂",
            "sharpness over the input-space Gauss–Newton curvature",
        ),
    )
    return _epoch_figure(workdir, "theory_ratios", runs, styles, panels, yscale="log")


def _jacobian_label(col: str) -> str:
    norm = "‖J_p‖₂" if "spectral" in col else "‖J_p‖_F"
    return f"{'max' if col.endswith('max') else 'mean'}_p {norm}"
