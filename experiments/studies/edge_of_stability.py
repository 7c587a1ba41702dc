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

Sources: Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge
of stability" (ICLR 2021), §3 and Fig. 1 (fc-tanh on 5k CIFAR-10: λ_max rises, reaches 2/η,
hovers just above it; the loss falls non-monotonically over long timescales); PAPERS.md §5,
"Full-batch reference".

Adam arm (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", abstract
and Fig. 1: full-batch Adam on a fully-connected network on CIFAR-10; PAPERS.md "Beyond the
five papers"): under full-batch Adam with β₁ the preconditioned sharpness λ_max(P⁻¹H),
P = diag(√ν̂ + ε) of the optimiser's state, rises to the adaptive stability threshold
(2 + 2β₁)/((1 − β₁)η) (38/η for β₁ = 0.9) and equilibrates there. Checks: it reaches 0.9 of
the threshold, and the late ratio λ_max(P⁻¹H)/threshold has its median in ``median_band``
and all values in ``band`` (the GD bands: the paper describes the same equilibrium at the
threshold of the corresponding non-adaptive method as the GD edge of stability, so the
tolerance is the same). λ_max(P⁻¹H) at step 0 is not defined (no second-moment estimate yet)
and is recorded as NaN.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from experiments.studies import common
from sharpness_jax import plots, preconditioned, series, sharpness

NAME = "edge_of_stability"


def _late_checks(config, prefix: str, what: str, entry) -> list[common.Check]:
    """The late ratio's median in ``median_band`` and every late value in ``band``."""
    return [
        common.check_band(
            f"{prefix}median late {what}",
            entry["late_ratio_median"],
            config.median_band,
            detail=f"last {config.late_fraction:.0%} of measurements",
        ),
        common.check_band(
            f"{prefix}every late {what} in the band",
            entry["late_ratio_max"],
            config.band,
            detail=f"max over the late phase; min is {entry['late_ratio_min']:.3g}",
        ),
    ]


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
        curves[f"η={lr:g}"] = (steps, lam, loss, threshold, result.status)
        if result.status == "diverged":
            checks.append(
                common.diverged_check(
                    f"GD at η={lr:g} trains", result.step, "reported, not an edge-of-stability run"
                )
            )
            continue

        checks += _checks(config, entry, lam, loss, first)

    adam_curves = {}
    for lr in config.adam_learning_rates:
        name, entry, adam_checks, curve = _adam_run(config, workdir, float(lr), mesh, cache)
        results[name], adam_curves[f"Adam η={lr:g}"] = entry, curve
        checks += adam_checks
    figures = [_figure(workdir, curves, adam_curves, config.preset, config.adam_b1)]
    return checks, results, figures


def _adam_run(config, workdir: Path, lr: float, mesh, cache):
    """One full-batch Adam run of the adaptive edge-of-stability arm (Cohen et al. 2022, §3,
    Fig. 1): its entry, claim checks and curve ``(steps, λ_max(P⁻¹H), loss, threshold,
    status)``."""
    name = f"adam_lr{lr:g}"
    names = (*config.base.measure.names, "preconditioned_sharpness")
    overrides = {
        "optimizer.name": "adam",
        "optimizer.learning_rate": lr,
        "optimizer.b1": float(config.adam_b1),
        "measure.names": names,
    }
    run_cfg = common.run_config(config.base, **overrides)
    result = common.train_run(workdir, name, run_cfg, mesh=mesh, cache=cache)
    cols = common.columns(workdir, name)
    steps, pre, loss = cols["step"], cols["preconditioned_sharpness"], cols["train_loss"]
    threshold = preconditioned.adaptive_stability_threshold(lr, float(config.adam_b1))
    ratio = pre / threshold
    first = series.first_reached(ratio, 0.9)
    late = series.late_phase(ratio, fraction=config.late_fraction)
    entry = {
        "optimizer": "adam",
        "learning_rate": lr,
        "b1": float(config.adam_b1),
        "threshold": threshold,
        "status": result.status,
        "preconditioned_sharpness_initial": float(pre[0]),
        "preconditioned_sharpness_peak": float(np.nanmax(pre)),
        "reached_step": None if first is None else int(steps[first]),
        "late_ratio_median": float(np.nanmedian(late)) if first is not None else None,
        "late_ratio_min": float(np.nanmin(late)) if first is not None else None,
        "late_ratio_max": float(np.nanmax(late)) if first is not None else None,
        "final_loss": float(loss[-1]),
    }
    curve = (steps, pre, loss, threshold, result.status)
    if result.status == "diverged":
        check = common.diverged_check(
            f"Adam at η={lr:g} trains", result.step, "reported, not an adaptive-EoS run"
        )
        return name, entry, [check], curve
    what = f"Adam η={lr:g}, β₁={config.adam_b1:g}: λ_max(P⁻¹H)/((2+2β₁)/((1−β₁)η))"
    checks = [
        common.check_range(
            f"adaptive edge of stability: {what} reaches 0.9",
            float(np.nanmax(ratio)),
            low=0.9,
            detail="peak over the run",
        )
    ]
    if first is not None:
        checks += [
            *_late_checks(config, "adaptive edge of stability: ", what, entry),
        ]
    return name, entry, checks, curve


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
        *_late_checks(config, f"edge of stability at η={lr:g}: ", "λ_max/(2/η)", entry),
        common.check_range(
            f"loss keeps falling at the edge (η={lr:g}): final / at-arrival loss",
            float(loss[-1] / loss[first]),
            high=1.0,
        ),
    ]


def _diverged(curve) -> bool:
    """A run that diverged: its status says so, or its loss is non-finite or grew past
    1e6 × its initial value."""
    loss = np.asarray(curve[2], float)
    return curve[4] == "diverged" or (
        bool(loss.size) and (not np.all(np.isfinite(loss)) or np.nanmax(loss) > 1e6 * abs(loss[0]))
    )


def _loss_panel(ax, curves, title: str) -> None:
    """Training loss per run on a log axis limited to the runs that did not diverge; a
    diverged run is drawn up to the axis top and labelled "(diverged)"."""
    labels = {n: f"{n} (diverged)" if _diverged(c) else n for n, c in curves.items()}
    plots.curves(
        {labels[n]: c[0] for n, c in curves.items()},
        {labels[n]: c[2] for n, c in curves.items()},
        ylabel="train loss",
        logy=True,
        title=title,
        ax=ax,
    )
    kept = [np.asarray(c[2], float) for n, c in curves.items() if labels[n] == n]
    kept = np.concatenate(kept) if kept else np.array([])
    kept = kept[np.isfinite(kept) & (kept > 0)]
    if kept.size:
        ax.set_ylim(kept.min() / 1.5, kept.max() * 1.5)


def _figure(workdir: Path, curves, adam_curves, preset: str, b1: float) -> str:
    import matplotlib.pyplot as plt

    rows = 2 if adam_curves else 1
    fig, axes = plt.subplots(
        rows, 2, figsize=(9.5, 3.6 * rows), constrained_layout=True, squeeze=False
    )
    fig.suptitle(f"Edge of stability, full batch ({preset} preset)")
    _loss_panel(axes[0, 0], curves, "full-batch GD: training loss")
    plots.curves(
        {n: c[0] for n, c in curves.items()},
        {n: c[1] for n, c in curves.items()},
        hlines={f"2/η ({n})": c[3] for n, c in curves.items()},
        ylabel="λ_max(H)",
        title="GD: sharpness λ_max(H) against 2/η (dashed)",
        ax=axes[0, 1],
    )
    if adam_curves:
        _loss_panel(axes[1, 0], adam_curves, "full-batch Adam: training loss")
        plots.curves(
            {n: c[0] for n, c in adam_curves.items()},
            {n: c[1] for n, c in adam_curves.items()},
            hlines={f"(2+2β₁)/((1−β₁)η) ({n})": c[3] for n, c in adam_curves.items()},
            ylabel="λ_max(P⁻¹H)",
            logy=True,
            title=f"Adam (β₁={b1:g}): λ_max(P⁻¹H), threshold dashed",
            ax=axes[1, 1],
        )
    return common.figure(workdir, "lambda_max", fig)
