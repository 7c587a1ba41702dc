"""Edge of stochastic stability (Andreyev & Beneventano 2024): under SGD with step size η and
batch size b, the batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²] (batches of size b drawn like the
sampler, g_B and H_B of the batch mean loss) rises and settles at the stability threshold 2/η,
while λ_max(H) of the full loss plateaus below 2/η, the lower the smaller the batch; full-batch
GD (Cohen et al. 2021) instead brings λ_max itself to 2/η.

One SGD run per batch size at a fixed η and one full-batch GD run on the same data. At every
measurement step: batch sharpness (Monte-Carlo to a relative standard error target, with its
standard error), λ_max(H) (Lanczos, warm-started), GNI = E_B[g_Bᵀ H g_B]/‖∇L‖² (Hutchinson on
tr(HC)) and E_B[λ_max(H_B)] (Lanczos per batch); λ_max and ḡᵀHḡ/‖ḡ‖² for GD. The late phase
is the last ``late_fraction`` of each run's measurements. Checks:

* batch sharpness settles at 2/η: for every batch size, the late median of
  batch sharpness/(2/η) lies in ``sharpness_band``;
* λ_max stays below 2/η for small batches: the late median of λ_max/(2/η) is at most
  ``lambda_max_below`` for every b in ``small_batch_sizes``;
* the λ_max plateau grows with the batch size: Spearman correlation of b with the late median
  λ_max over the SGD runs is at least ``min_rank_correlation``;
* full-batch GD on the same data reaches the edge of stability: its late median
  λ_max/(2/η) lies in ``gd_band``.

Sources: the first three checks are the claims of Andreyev & Beneventano 2024 (arXiv
2412.20553), abstract and Definition 3 (batch sharpness as the expectation of the ratio), as
summarised in PAPERS.md §5 ("under SGD it settles at 2/η, while λ_max(H) stays below and rises
with the batch size"); the last is Cohen et al. 2021, §3 and Fig. 1 (PAPERS.md §5,
"Full-batch reference").
"""

from __future__ import annotations

import math
from pathlib import Path

import ml_collections
import numpy as np

from experiments.studies import common
from sharpness_jax import plots, series, sharpness

NAME = "edge_of_stochastic_stability"

# Measured curvatures: metric column -> (label, colour) in the figures. The results hold the
# late median of each; the SGD runs measure ``QUANTITIES``, the GD run λ_max and ḡᵀHḡ/‖ḡ‖².
_CURVATURES = {
    "batch_sharpness": ("batch sharpness", "C0"),
    "lambda_max": ("λ_max(H)", "C1"),
    "gni": ("GNI", "C2"),
    "batch_lambda_max": ("E_B[λ_max(H_B)]", "C3"),
    "gradient_rayleigh": ("ḡᵀHḡ/‖ḡ‖²", "C4"),
}
QUANTITIES = ("batch_sharpness", "lambda_max", "gni", "batch_lambda_max")


def _sgd_name(batch_size: int) -> str:
    return f"sgd_b{batch_size}"


GD_NAME = "gd"


def _run_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The training config of every run: one SGD run per batch size, then the GD run."""
    lr = float(config.learning_rate)
    runs = {}
    for b in config.batch_sizes:
        names = tuple(config.base.measure.names)
        options = config.base.measure.options.to_dict()
        if b in config.batch_lambda_max_sizes:
            names += ("batch_lambda_max",)
            options["batch_lambda_max"] = config.batch_lambda_max_options.to_dict()
        runs[_sgd_name(b)] = common.run_config(
            config.base,
            **{
                "optimizer.learning_rate": lr,
                "batch_size": int(b),
                "measure.names": names,
                "measure.options": options,
            },
        )
    gd_names = tuple(config.gd_measure_names)
    gd_options = {k: v for k, v in config.base.measure.options.to_dict().items() if k in gd_names}
    runs[GD_NAME] = common.run_config(
        config.base,
        **{
            "optimizer.name": "gd",
            "optimizer.learning_rate": lr,
            "batch_size": None,
            "max_steps": int(config.gd_max_steps),
            "measure.names": gd_names,
            "measure.options": gd_options,
        },
    )
    return runs


def _nan_column(cols: dict[str, np.ndarray], name: str) -> np.ndarray:
    return cols[name].astype(float) if name in cols else np.full(len(cols["step"]), np.nan)


def _curves(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The columns of one run that the results and figures read (NaN where not measured)."""
    return {
        "step": cols["step"].astype(float),
        "train_loss": _nan_column(cols, "train_loss"),
        "gradient_rayleigh": _nan_column(cols, "gradient_rayleigh"),
        **{q: _nan_column(cols, q) for q in QUANTITIES},
        "batch_sharpness_stderr": _nan_column(cols, "batch_sharpness_stderr"),
        "batch_lambda_max_stderr": _nan_column(cols, "batch_lambda_max_stderr"),
        "gni_stderr": _nan_column(cols, "gni_stderr"),
    }


def _entry(result, c: dict[str, np.ndarray], threshold: float, fraction: float) -> dict:
    """The results of one run: status, final loss, initial λ_max, and the late median of
    every measured quantity with its ratio to 2/η."""
    entry = {
        "status": result.status,
        "steps": int(result.step),
        "final_loss": float(c["train_loss"][-1]),
        "lambda_max_initial": float(c["lambda_max"][0]),
    }
    for q in _CURVATURES:
        median = series.late_median(c[q], fraction=fraction)
        if math.isfinite(median):
            entry[f"late_{q}"] = median
            entry[f"late_{q}_ratio"] = median / threshold
    return entry


def run(config: ml_collections.ConfigDict, workdir: Path, *, mesh=None, cache=None):
    lr = float(config.learning_rate)
    threshold = float(sharpness.stability_threshold(lr))
    fraction = float(config.late_fraction)
    results: dict = {"learning_rate": lr, "threshold": threshold}
    curves: dict[str, dict[str, np.ndarray]] = {}
    statuses = {}
    for name, run_cfg in _run_configs(config).items():
        statuses[name] = common.train_run(workdir, name, run_cfg, mesh=mesh, cache=cache)
        curves[name] = _curves(common.columns(workdir, name))
        results[name] = _entry(statuses[name], curves[name], threshold, fraction)

    sgd = [(int(b), _sgd_name(int(b))) for b in config.batch_sizes]
    trained = {
        name: statuses[name].status != "diverged" for name in (*(n for _, n in sgd), GD_NAME)
    }
    checks = [
        common.diverged_check(
            f"{name} trains at η={lr:g}", statuses[name].step, "its checks are not evaluated"
        )
        for name, ok in trained.items()
        if not ok
    ]
    checks += _checks(config, results, sgd, trained, fraction)
    figures = [
        _trajectories_figure(workdir, curves, sgd, lr, threshold),
        _plateau_figure(
            workdir, results, sgd, threshold, fraction, config.base.dataset.get("num_train")
        ),
        _loss_figure(workdir, curves, sgd, lr),
    ]
    return checks, results, figures


def _checks(config, results: dict, sgd, trained: dict[str, bool], fraction: float):
    """The claim checks of the runs that trained; adds the plateau trend to ``results``."""
    checks = []
    detail = f"median over the last {fraction:.0%} of measurements"
    for b, name in sgd:
        if trained[name]:
            checks.append(
                common.check_band(
                    f"batch sharpness settles at 2/η (b={b}): late batch sharpness/(2/η)",
                    results[name].get("late_batch_sharpness_ratio"),
                    config.sharpness_band,
                    detail=detail,
                )
            )
    for b, name in sgd:
        if b in config.small_batch_sizes and trained[name]:
            checks.append(
                common.check_range(
                    f"λ_max stays below 2/η for a small batch (b={b}): late λ_max/(2/η)",
                    results[name].get("late_lambda_max_ratio"),
                    high=config.lambda_max_below,
                    detail=detail,
                )
            )
    sizes = [b for b, name in sgd if trained[name]]
    plateaus = [results[name].get("late_lambda_max", math.nan) for b, name in sgd if trained[name]]
    rho = common.rank_correlation(sizes, plateaus)
    results["lambda_max_plateau_rank_correlation"] = rho
    finite = [p for p in plateaus if math.isfinite(p)]
    if len(finite) >= 2:
        results["lambda_max_plateau_largest_over_smallest_batch"] = finite[-1] / finite[0]
    checks.append(
        common.check_range(
            "the λ_max plateau grows with the batch size: Spearman ρ(b, late λ_max)",
            rho,
            low=config.min_rank_correlation,
            detail=f"SGD runs b = {', '.join(str(b) for b in sizes)}; "
            + ", ".join(f"{p:.3g}" for p in plateaus),
        )
    )
    if trained[GD_NAME]:
        checks.append(
            common.check_band(
                "full-batch GD reaches the edge of stability: late λ_max/(2/η)",
                results[GD_NAME].get("late_lambda_max_ratio"),
                config.gd_band,
                detail=detail,
            )
        )
    return checks


def _trajectories_figure(workdir: Path, curves, sgd, lr: float, threshold: float) -> str:
    """Per batch size (and GD): batch sharpness ± SE, λ_max, GNI, E_B[λ_max(H_B)] against 2/η,
    on a log axis spanning every plotted value (bands included) and 2/η."""
    import matplotlib.pyplot as plt

    panels = [(f"SGD, b = {b}", name) for b, name in sgd] + [("full-batch GD", GD_NAME)]
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(4.2 * ncols, 3.3 * nrows),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    fig.suptitle(f"curvature along training at η = {lr:g} (2/η = {threshold:.4g})")
    shown = [threshold]
    for ax, (title, name) in zip(axes.flat, panels, strict=False):
        c = curves[name]
        for q, (label, color) in _CURVATURES.items():
            y = c[q]
            ok = np.isfinite(y)
            if not ok.any():
                continue
            x = c["step"]
            ax.plot(x[ok], y[ok], color=color, lw=1.4, label=label)
            shown.append(y[ok])
            se = c.get(f"{q}_stderr")
            if se is not None and np.isfinite(se[ok]).all():
                band = (y[ok] - se[ok], y[ok] + se[ok])
                ax.fill_between(
                    x[ok], *band, color=color, alpha=0.2, lw=0, label=f"{label} ± 1 SE (batches)"
                )
                shown += list(band)
        ax.axhline(threshold, ls="--", lw=1.0, color="k", label="2/η")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, framealpha=0.8)  # over the curves it may cover
    for ax in axes[:, 0]:
        ax.set_ylabel("curvature")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    # E_B[λ_max(H_B)] of small batches may lie far above 2/η: a log axis holds every curve
    # and keeps the threshold readable.
    values = np.concatenate([np.atleast_1d(np.asarray(v, float)) for v in shown])
    values = values[np.isfinite(values) & (values > 0)]
    axes.flat[0].set_yscale("log")
    axes.flat[0].set_ylim(values.min() / 1.2, values.max() * 1.2)
    return common.figure(workdir, "sharpness_by_batch_size", fig)


def _plateau_figure(
    workdir: Path, results, sgd, threshold: float, fraction: float, num_train: int | None
) -> str:
    """Late-phase medians against the batch size, with 2/η and GD's λ_max at b = n."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8), constrained_layout=True)
    sizes = np.asarray([b for b, _ in sgd], float)
    for q in QUANTITIES:
        label, color = _CURVATURES[q]
        values = np.asarray([results[name].get(f"late_{q}", np.nan) for _, name in sgd], float)
        ok = np.isfinite(values)
        if ok.any():
            ax.plot(sizes[ok], values[ok], marker="o", lw=1.4, color=color, label=label)
    gd_lambda = results[GD_NAME].get("late_lambda_max")
    if gd_lambda is not None:
        x_gd = float(num_train) if num_train else 2.0 * sizes.max()
        ax.scatter(
            [x_gd],
            [gd_lambda],
            marker="*",
            s=90,
            color=_CURVATURES["lambda_max"][1],
            zorder=3,
            label="λ_max(H), full-batch GD (b = n)",
        )
    ax.axhline(threshold, ls="--", lw=1.0, color="k", label="2/η")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size b")
    ax.set_ylabel(f"late-phase median (last {fraction:.0%})")
    ax.set_title(
        f"late plateaus against the batch size, SGD at η = {2.0 / threshold:.4g}", fontsize=10
    )
    ax.legend(fontsize=7, frameon=False)
    return common.figure(workdir, "plateau_vs_batch_size", fig)


def _loss_figure(workdir: Path, curves, sgd, lr: float) -> str:
    names = {f"b = {b}": name for b, name in sgd} | {"GD": GD_NAME}
    fig = plots.curves(
        {label: curves[name]["step"] for label, name in names.items()},
        {label: curves[name]["train_loss"] for label, name in names.items()},
        ylabel="train loss (1/n) Σ_p ‖f(x_p) − onehot(y_p)‖²",
        logy=True,
        title=f"training loss, SGD per batch size b and full-batch GD at η = {lr:g}",
    )
    return common.figure(workdir, "loss", fig)
