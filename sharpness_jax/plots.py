"""Matplotlib figures in the style of the studies' papers, from metric columns.

Every function takes plain arrays (e.g. from ``records.metric_columns(records.read_metrics(
workdir))``), draws on a new figure (or the ``ax`` given) and returns the figure; save it with
:func:`save`. Nothing here computes a curvature quantity.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "curves",
    "power_law",
    "save",
    "scatter",
    "spectra",
]


def _axes(ax=None, figsize=(5.0, 3.6)):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return fig, ax


def _finish(ax, *, xlabel: str, ylabel: str, title: str, logx=False, logy=False) -> None:
    """Axis scales, labels, title and legend, the same on every figure."""
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)


def curves(
    x: Mapping[str, np.ndarray] | np.ndarray,
    ys: Mapping[str, np.ndarray],
    *,
    stderr: Mapping[str, np.ndarray] | None = None,
    hlines: Mapping[str, float] | None = None,
    xlabel: str = "step",
    ylabel: str = "",
    title: str = "",
    logy: bool = False,
    ax=None,
):
    """Curves y(x), one per label, with optional ±SE bands and labelled horizontal lines
    (e.g. the stability threshold 2/η, drawn dashed in the colour of the matching curve when
    the labels agree).

    Args:
      x: one x array for all curves, or one per label.
      ys: label → y values (NaNs are skipped).
      stderr: label → standard errors, drawn as a band.
      hlines: label → y value of a dashed horizontal line.
    """
    fig, ax = _axes(ax)
    colors = {}
    for label, y in ys.items():
        xs = np.asarray(x[label] if isinstance(x, Mapping) else x, float)
        y = np.asarray(y, float)
        ok = np.isfinite(y) & np.isfinite(xs)
        (line,) = ax.plot(xs[ok], y[ok], label=label, lw=1.4)
        colors[label] = line.get_color()
        if stderr is not None and label in stderr:
            se = np.asarray(stderr[label], float)[ok]
            ax.fill_between(xs[ok], y[ok] - se, y[ok] + se, color=line.get_color(), alpha=0.2)
    for label, value in (hlines or {}).items():
        color = next((c for name, c in colors.items() if name in label or label in name), "k")
        ax.axhline(value, ls="--", lw=1.0, color=color, label=label)
    _finish(ax, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy)
    return fig


def power_law(
    x: np.ndarray,
    y: np.ndarray,
    *,
    gamma: float,
    intercept: float,
    label: str = "",
    xlabel: str = "x",
    ylabel: str = "y",
    title: str = "",
    ax=None,
):
    """Log-log scatter of positive (x, y) with the fitted line log y = γ log x + c."""
    fig, ax = _axes(ax)
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    pts = ax.scatter(x[ok], y[ok], s=6, alpha=0.5, label=label or None)
    if ok.any():
        grid = np.geomspace(x[ok].min(), x[ok].max(), 50)
        ax.plot(
            grid,
            np.exp(intercept) * grid**gamma,
            color=pts.get_facecolor()[0][:3],
            lw=1.5,
            label=f"γ = {gamma:.2f}",
        )
    _finish(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=True, logy=True)
    return fig


def scatter(
    points: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    annotate: Mapping[str, Sequence[str]] | None = None,
    ax=None,
):
    """Scatter of several labelled point sets (e.g. sharpness vs generalisation gap)."""
    fig, ax = _axes(ax)
    for label, (x, y) in points.items():
        ax.scatter(np.asarray(x, float), np.asarray(y, float), s=18, label=label)
        for i, text in enumerate((annotate or {}).get(label, ())):
            ax.annotate(text, (float(np.asarray(x)[i]), float(np.asarray(y)[i])), fontsize=6)
    _finish(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, logy=logy)
    return fig


def spectra(
    eigenvalues: Mapping[str, np.ndarray],
    *,
    title: str = "",
    ylabel: str = "eigenvalue",
    symlog: bool = True,
    ax=None,
):
    """Sorted spectra (descending, against their index) of several matrices on one axis."""
    fig, ax = _axes(ax)
    for label, vals in eigenvalues.items():
        vals = np.sort(np.asarray(vals, float))[::-1]
        ax.plot(np.arange(1, vals.size + 1), vals, marker=".", ms=3, lw=1.0, label=label)
    if symlog:
        finite = np.concatenate([np.abs(np.asarray(v, float)) for v in eigenvalues.values()])
        finite = finite[(finite > 0) & np.isfinite(finite)]
        ax.set_yscale("symlog", linthresh=float(np.quantile(finite, 0.1)) if finite.size else 1e-8)
    _finish(ax, xlabel="index", ylabel=ylabel, title=title)
    return fig


def save(fig, path: str | os.PathLike) -> str:
    """Saves ``fig`` as PNG at ``path`` (directories created) and closes it; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
