"""Edge of stability (Cohen et al. 2021): under full-batch GD with step size η, the top
Hessian eigenvalue λ_max rises (progressive sharpening) until it reaches the stability
threshold 2/η, then hovers just above it while the loss keeps falling, non-monotonically.

One GD run per η; λ_max (and λ_2) by warm-started Lanczos on the full-batch Hessian at every
measurement step. Checks:

* progressive sharpening: in every run whose 2/η lies above the initial λ_max, λ_max grows
  by ``sharpening_factor`` before reaching 2/η (or by the end);
* edge of stability: in every run that reaches 0.9·2/η, the late-phase ratio λ_max/(2/η) has
  its median in ``median_band`` and all values in ``band``;
* the loss keeps decreasing at the edge: final loss below the loss when 2/η was first reached.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from experiments.studies import common
from sharpness_jax import plots, series, sharpness

NAME = "edge_of_stability"


def _run_name(lr: float) -> str:
    return f"gd_lr{lr:g}"


def run(config: ml_collections.ConfigDict, workdir: Path, *, mesh=None, cache=None):
    checks, results, curves = [], {}, {}
    for lr in config.learning_rates:
        name = _run_name(lr)
        run_cfg = common.run_config(config.base, **{"optimizer.learning_rate": float(lr)})
        result = common.train_run(workdir, name, run_cfg, mesh=mesh, cache=cache)
        cols = common.columns(workdir, name)
        steps, lam, loss = cols["step"], cols["lambda_max"], cols["train_loss"]
        threshold = sharpness.stability_threshold(float(lr))
        ratio = lam / threshold
        first = series.first_reached(ratio, 0.9)
        late = series.late_phase(ratio, fraction=config.late_fraction)
        entry = {
            "learning_rate": float(lr),
            "threshold": threshold,
            "status": result.status,
            "lambda_max_initial": float(lam[0]),
            "lambda_max_final": float(lam[-1]),
            "lambda_max_peak": float(np.nanmax(lam)),
            "reached_step": None if first is None else int(steps[first]),
            "late_ratio_median": float(np.nanmedian(late)) if first is not None else None,
            "late_ratio_min": float(np.nanmin(late)) if first is not None else None,
            "late_ratio_max": float(np.nanmax(late)) if first is not None else None,
            "final_loss": float(loss[-1]),
        }
        results[name] = entry
        curves[f"η={lr:g}"] = (steps, lam, loss, threshold)
        if result.status == "diverged":
            checks.append(
                common.diverged_check(
                    f"GD at η={lr:g} trains", result.step, "reported, not an edge-of-stability run"
                )
            )
            continue

        checks += _checks(config, entry, lam, loss, first)

    figures = [_figure(workdir, curves)]
    return checks, results, figures


def _checks(config, entry: dict, lam: np.ndarray, loss: np.ndarray, first: int | None):
    """The claim checks of one GD run that trained: progressive sharpening (when 2/η lies
    above the initial λ_max) and, once λ_max reached 0.9·2/η at measurement ``first``, the
    edge-of-stability band and the falling loss."""
    lr, threshold = entry["learning_rate"], entry["threshold"]
    checks = []
    if threshold > lam[0]:
        end = first if first is not None else len(lam) - 1
        growth = float(np.nanmax(lam[: end + 1]) / lam[0])
        checks.append(
            common.check_range(
                f"progressive sharpening at η={lr:g}: λ_max grows before reaching 2/η",
                growth,
                low=config.sharpening_factor,
                detail="max λ_max up to the first step at 0.9·2/η, over λ_max at step 0",
            )
        )
    if first is None:
        return checks
    return [
        *checks,
        common.check_band(
            f"edge of stability at η={lr:g}: median late λ_max/(2/η)",
            entry["late_ratio_median"],
            config.median_band,
            detail=f"last {config.late_fraction:.0%} of measurements",
        ),
        common.check_band(
            f"edge of stability at η={lr:g}: every late λ_max/(2/η) in the band",
            entry["late_ratio_max"],
            config.band,
            detail=f"max over the late phase; min is {entry['late_ratio_min']:.3g}",
        ),
        common.check_range(
            f"loss keeps falling at the edge (η={lr:g}): final / at-arrival loss",
            float(loss[-1] / loss[first]),
            high=1.0,
        ),
    ]


def _figure(workdir: Path, curves) -> str:
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lam) = plt.subplots(1, 2, figsize=(9.5, 3.6), constrained_layout=True)
    plots.curves(
        {n: c[0] for n, c in curves.items()},
        {n: c[2] for n, c in curves.items()},
        ylabel="train loss",
        logy=True,
        title="full-batch GD: training loss",
        ax=ax_loss,
    )
    plots.curves(
        {n: c[0] for n, c in curves.items()},
        {n: c[1] for n, c in curves.items()},
        hlines={f"2/η ({n})": c[3] for n, c in curves.items()},
        ylabel="λ_max(H)",
        title="sharpness against the stability threshold 2/η",
        ax=ax_lam,
    )
    return common.figure(workdir, "lambda_max", fig)
