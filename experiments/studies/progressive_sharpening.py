"""Progressive sharpening and the input–output Jacobian (MacDonald, Valmadre & Lucey 2023): the
top Hessian eigenvalue λ_max and the norm of the input–output Jacobian ∂f(x)/∂x over the
training sample rise together during training; regularisers such as label smoothing lower
both; and the Jacobian norm tracks the generalisation gap across training setups at least as
well as λ_max does.

One SGD run per variant (baseline, label smoothing, weight decay, a larger batch, a smaller
learning rate; see the config) and seed, each for the same number of epochs. At every
measurement step: the full train/test loss and accuracy, λ_max(H) of the training loss on the
measurement batch (warm-started Lanczos), the Jacobian norms ‖J_p‖₂ and ‖J_p‖_F of the logits,
J_p = ∂f(x_p)/∂x, mean and max over the measurement batch, and two terms of the paper's
argument (built-in measurements of the library, ``sharpness_jax.measurements``):

* ``progressive_sharpening_curvature``: the output curvature ‖Λ_p‖₂, Λ_p = ∇²_f ℓ(f(x_p), y_p)
  (softmax cross-entropy: diag(p) − ppᵀ, which label smoothing leaves unchanged), and the
  input-space Gauss–Newton curvature κ_p = ‖J_pᵀ Λ_p J_p‖₂ = ‖Λ_p^{1/2} J_p‖₂² ≤ ‖Λ_p‖₂ ‖J_p‖₂²,
  mean and max over the batch. The loss Hessian's Gauss–Newton part is
  G = (1/n) Σ_p ∂_θf_pᵀ Λ_p ∂_θf_p; through the first layer, ∂_θf_p and J_p share the factor
  ∂f/∂z (z the first pre-activation), so large Jacobians weighted by Λ go with large λ_max
  (standard form of the argument). The study reports λ_max / max_p ‖J_p‖₂² and
  λ_max / max_p κ_p over training;
* ``progressive_sharpening_unsmoothed_loss``: the train and test cross-entropy WITHOUT label
  smoothing, so that loss gaps compare across variants.

Checks (claims of the paper):

* baseline: λ_max grows (peak / initial ≥ ``growth_factor``), the Jacobian norm grows (final
  / initial ≥ ``growth_factor``), and Spearman's ρ of λ_max against the Jacobian norm is at
  least ``time_correlation_min`` (they rise together), both across the equally spaced
  measurement steps of the whole run and across the steps up to the peak of λ_max (the
  sharpening phase, resolved by extra log-spaced measurements early on). With cross-entropy
  the output curvature Λ_p shrinks as the training loss goes to zero, so the theory expects
  λ_max to follow κ_p rather than ‖J_p‖₂² late in training; the ρ of λ_max against
  max_p κ_p is reported beside it;
* label smoothing lowers the final λ_max and the final Jacobian norm against the baseline;
* across all runs, the final Jacobian norm has a positive rank correlation with the
  generalisation gap, at least as large as that of the final λ_max (for the error gap
  train accuracy − test accuracy and for the loss gap test − train unsmoothed loss).

The generalisation bound of the paper in terms of the empirical Jacobian is reported through
its Jacobian term (``sharpness_jax.jacobian.jacobian_bound_term``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from experiments.studies import common
from sharpness_jax import checks
from sharpness_jax.jacobian import jacobian_bound_term
from sharpness_jax.problem import problem_from_config
from sharpness_jax.series import final_value, sharpening_phase

NAME = "progressive_sharpening"

JACOBIAN_COLUMNS = (
    "jacobian_spectral_max",
    "jacobian_spectral_mean",
    "jacobian_frobenius_max",
    "jacobian_frobenius_mean",
)
GAPS = ("error_gap", "loss_gap")


# ================================================================================ analysis


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "options":
            out.update(_dotted(value, path + "."))
        else:
            out[path] = value
    return out


def _data_sizes(base: ml_collections.ConfigDict) -> tuple[int, int]:
    """(n, D): training examples and input dimension of the base config's data."""
    dataset = problem_from_config(base).dataset
    n = checks.num_examples(dataset.train)
    return n, int(np.prod(np.shape(dataset.train.inputs)[1:]))


def _run_name(variant: str, seed: int, seeds: Sequence[int]) -> str:
    return variant if len(seeds) == 1 else f"{variant}_seed{seed}"


def _run_config(config, overrides, seed: int, n: int) -> ml_collections.ConfigDict:
    """The base config with the variant's overrides, the seed and an epoch-based schedule:
    ``round(epochs · n / B)`` steps, measured every ``max_steps // num_measurements`` steps
    and at ``num_log_measurements`` log-spaced steps up to the first of those."""
    cfg = common.run_config(config.base, **_dotted(overrides), seed=int(seed))
    batch = n if cfg.batch_size is None else int(cfg.batch_size)
    max_steps = max(1, round(config.epochs * n / batch))
    every = max(1, max_steps // config.num_measurements)
    cfg.max_steps = max_steps
    cfg.measure.every = every
    if config.num_log_measurements:
        cfg.measure.num_log_steps = int(config.num_log_measurements)
        cfg.measure.log_max_step = every
    return cfg


def _summarise(config, cols, cfg, n: int, dimension: int) -> dict[str, Any]:
    """Per-run curves and final values."""
    w = config.final_window
    steps = np.asarray(cols["step"], float)
    every = int(cfg.measure.every)
    grid = (cols["step"] % every == 0) | (cols["step"] == cols["step"][-1])
    phase = sharpening_phase(cols["lambda_max"])
    batch = n if cfg.batch_size is None else int(cfg.batch_size)
    lam = cols["lambda_max"]
    spec_max = cols["jacobian_spectral_max"]
    gn_max = cols["input_gauss_newton_max"]
    error_gap = cols["train_accuracy"] - cols["test_accuracy"]
    loss_gap = cols["unsmoothed_test_loss"] - cols["unsmoothed_train_loss"]
    jac = cols[config.jacobian_column]
    curves = {
        "epoch": steps * batch / n,
        "lambda_max": lam,
        "jacobian": jac,
        "ratio_jacobian": lam / spec_max**2,
        "ratio_gauss_newton": lam / gn_max,
    }
    entry = {
        "steps": int(steps[-1]),
        "batch_size": batch,
        "learning_rate": float(cfg.optimizer.learning_rate),
        "label_smoothing": float(cfg.loss.label_smoothing),
        "weight_decay": float(cfg.optimizer.weight_decay),
        "lambda_max_initial": float(lam[0]),
        "lambda_max_peak": float(np.nanmax(lam)),
        "lambda_max_final": final_value(lam, w),
        "jacobian_initial": float(jac[0]),
        "jacobian_final": final_value(jac, w),
        "input_gauss_newton_max_final": final_value(gn_max, w),
        "output_curvature_mean_final": final_value(cols["output_curvature_mean"], w),
        "ratio_lambda_over_jacobian_sq_final": final_value(curves["ratio_jacobian"], w),
        "ratio_lambda_over_gauss_newton_final": final_value(curves["ratio_gauss_newton"], w),
        "train_accuracy_final": final_value(cols["train_accuracy"], w),
        "test_accuracy_final": final_value(cols["test_accuracy"], w),
        "error_gap": final_value(error_gap, w),
        "loss_gap": final_value(loss_gap, w),
        "peak_epoch": float(curves["epoch"][phase[-1]]) if phase.size else math.nan,
        "time_correlation": {
            col: common.rank_correlation(lam[grid], cols[col][grid])
            for col in (*JACOBIAN_COLUMNS, "input_gauss_newton_max")
        },
        "sharpening_correlation": {
            col: common.rank_correlation(lam[phase], cols[col][phase])
            for col in (*JACOBIAN_COLUMNS, "input_gauss_newton_max")
        },
        "sharpening_points": int(phase.size),
    }
    for col in JACOBIAN_COLUMNS:
        entry[f"{col}_final"] = final_value(cols[col], w)
    entry["bound_jacobian_term_final"] = jacobian_bound_term(
        entry["jacobian_spectral_max_final"], n, dimension
    )
    return {"entry": entry, "curves": curves}


# ================================================================================ the study


def _validate(config: ml_collections.ConfigDict) -> None:
    if "baseline" not in config.variants:
        raise ValueError("the variants must include 'baseline'")
    if config.jacobian_column not in JACOBIAN_COLUMNS:
        raise ValueError(
            f"jacobian_column must be one of {JACOBIAN_COLUMNS}, got {config.jacobian_column!r}"
        )
    if not config.seeds:
        raise ValueError("seeds must name at least one seed")
    for key in ("epochs", "num_measurements", "final_window"):
        if not (isinstance(config[key], int) and config[key] >= 1):
            raise ValueError(f"{key} must be a positive int, got {config[key]!r}")


def run(config: ml_collections.ConfigDict, workdir: Path, *, mesh=None, cache=None):
    _validate(config)
    n, input_dim = _data_sizes(config.base)
    dimension = input_dim if config.bound_dimension is None else int(config.bound_dimension)
    runs: dict[str, dict[str, Any]] = {}
    variant_of: dict[str, str] = {}
    for variant, overrides in config.variants.items():
        for seed in config.seeds:
            name = _run_name(variant, seed, config.seeds)
            cfg = _run_config(config, overrides.to_dict(), seed, n)
            result = common.train_run(workdir, name, cfg, mesh=mesh, cache=cache)
            if result.status == "diverged":
                raise RuntimeError(f"run {name} diverged at step {result.step}; lower its η")
            cols = common.columns(workdir, name)
            runs[name] = _summarise(config, cols, cfg, n, dimension)
            variant_of[name] = variant

    entries = {name: r["entry"] for name, r in runs.items()}
    checks_, results = _checks(config, entries, variant_of)
    results["runs"] = entries
    results["num_train"] = n
    results["bound_dimension"] = dimension
    styles = _styles(variant_of)
    col = config.jacobian_column
    figures = [
        _figure_curves(workdir, runs, styles, col),
        _figure_scatter(workdir, runs, styles, col),
        _figure_gaps(workdir, entries, styles, results["gap_correlations"], col),
        _figure_ratios(workdir, runs, styles),
    ]
    return checks_, results, figures


def _checks(config, entries, variant_of):
    """The study's checks, per claim (baseline growth and co-movement, label smoothing, the
    generalisation gaps), and the results they are computed from."""
    by_variant = {
        v: [entries[name] for name, vv in variant_of.items() if vv == v]
        for v in dict.fromkeys(variant_of.values())
    }
    results: dict[str, Any] = {"baseline": _baseline_results(config, by_variant)}
    checks_ = _baseline_checks(config, results["baseline"])
    if "label_smoothing" in by_variant:
        checks_ += _label_smoothing_checks(config, by_variant, results)
    results["gap_correlations"] = _gap_correlations(entries)
    checks_ += _gap_checks(config, results["gap_correlations"], len(entries))
    return checks_, results


def _mean_over_seeds(by_variant, variant, key) -> float:
    return float(np.mean([e[key] for e in by_variant[variant]]))


def _worst(values) -> float:
    """The minimum over seeds; NaN (not evaluated) if any is NaN."""
    return float(np.min(np.asarray(list(values), float)))


def _baseline_results(config, by_variant) -> dict[str, Any]:
    """The baseline's growth of λ_max and of the Jacobian norm and their rank correlations
    (minimum over seeds), and its final ratios of λ_max to the Jacobian terms."""
    col = config.jacobian_column
    base = by_variant["baseline"]
    return {
        "lambda_max_growth": _worst(e["lambda_max_peak"] / e["lambda_max_initial"] for e in base),
        "jacobian_growth": _worst(e["jacobian_final"] / e["jacobian_initial"] for e in base),
        "time_correlation": _worst(e["time_correlation"][col] for e in base),
        "sharpening_correlation": _worst(e["sharpening_correlation"][col] for e in base),
        "sharpening_points": min(e["sharpening_points"] for e in base),
        "time_correlation_gauss_newton": _worst(
            e["time_correlation"]["input_gauss_newton_max"] for e in base
        ),
        "ratio_lambda_over_jacobian_sq_final": _mean_over_seeds(
            by_variant, "baseline", "ratio_lambda_over_jacobian_sq_final"
        ),
        "ratio_lambda_over_gauss_newton_final": _mean_over_seeds(
            by_variant, "baseline", "ratio_lambda_over_gauss_newton_final"
        ),
    }


def _baseline_checks(config, baseline: Mapping[str, Any]) -> list[common.Check]:
    """λ_max and the Jacobian norm rise during training, and rise together."""
    col = config.jacobian_column
    return [
        common.check_range(
            "progressive sharpening (baseline): λ_max rises during training",
            baseline["lambda_max_growth"],
            low=config.growth_factor,
            detail="peak λ_max over λ_max at step 0 (minimum over seeds)",
        ),
        common.check_range(
            f"baseline: the Jacobian norm ({col}) rises during training",
            baseline["jacobian_growth"],
            low=config.growth_factor,
            detail="final over initial (minimum over seeds)",
        ),
        common.check_range(
            f"baseline: λ_max and the Jacobian norm ({col}) rise together",
            baseline["time_correlation"],
            low=config.time_correlation_min,
            detail="Spearman ρ across the equally spaced measurement steps of the whole run "
            "(minimum over seeds)",
        ),
        common.check_range(
            f"baseline: λ_max and the Jacobian norm ({col}) rise together during sharpening",
            baseline["sharpening_correlation"],
            low=config.time_correlation_min,
            detail="Spearman ρ across the measurement steps up to the peak of λ_max (at least "
            f"{baseline['sharpening_points']} points; minimum over seeds)",
        ),
    ]


def _label_smoothing_checks(config, by_variant, results) -> list[common.Check]:
    """Label smoothing lowers the final λ_max and the final Jacobian norm; records the ratios
    (label smoothing / baseline) in ``results``."""
    checks_ = []
    for key, what in (("lambda_max_final", "λ_max"), ("jacobian_final", "Jacobian norm")):
        ratio = _mean_over_seeds(by_variant, "label_smoothing", key) / _mean_over_seeds(
            by_variant, "baseline", key
        )
        results[f"label_smoothing_{key}_ratio"] = ratio
        checks_.append(
            common.Check(
                f"label smoothing lowers the final {what}",
                ratio,
                "< 1",
                bool(ratio < 1) if math.isfinite(ratio) else None,
                f"final {key.removesuffix('_final')} (label smoothing / baseline, "
                f"mean of the last {config.final_window} measurements and over seeds)",
            )
        )
    return checks_


def _gap_correlations(entries) -> dict[str, dict[str, float]]:
    """Spearman ρ over the runs of each final quantity against each generalisation gap."""
    quantities = {
        "lambda_max": "lambda_max_final",
        **{c: f"{c}_final" for c in JACOBIAN_COLUMNS},
        "input_gauss_newton_max": "input_gauss_newton_max_final",
        "bound_jacobian_term": "bound_jacobian_term_final",
    }
    names = list(entries)
    return {
        gap: {
            q: common.rank_correlation(
                [entries[r][key] for r in names], [entries[r][gap] for r in names]
            )
            for q, key in quantities.items()
        }
        for gap in GAPS
    }


_GAP_WORDS = {
    "error_gap": "error gap (train − test accuracy)",
    "loss_gap": "loss gap (test − train unsmoothed loss)",
}


def _gap_checks(config, gap_corr, num_runs: int) -> list[common.Check]:
    """The final Jacobian norm tracks each gap across runs, at least as well as λ_max."""
    col = config.jacobian_column
    checks_ = []
    for gap in GAPS:
        rho_j, rho_l = gap_corr[gap][col], gap_corr[gap]["lambda_max"]
        checks_.append(
            common.Check(
                f"the final Jacobian norm tracks the {_GAP_WORDS[gap]} across runs",
                rho_j,
                "> 0",
                bool(rho_j > 0) if math.isfinite(rho_j) else None,
                f"Spearman ρ over {num_runs} runs of {col} vs the gap",
            )
        )
        diff = rho_j - rho_l
        checks_.append(
            common.Check(
                f"the Jacobian norm tracks the {_GAP_WORDS[gap]} at least as well as λ_max",
                diff,
                ">= 0",
                bool(diff >= 0) if math.isfinite(diff) else None,
                f"ρ(Jacobian, gap) − ρ(λ_max, gap) = {rho_j:.3g} − {rho_l:.3g}",
            )
        )
    return checks_


# ================================================================================ figures


def _styles(variant_of: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Matplotlib styles per run: one colour per variant, line style and marker per seed."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = list(dict.fromkeys(variant_of.values()))
    styles, seen = {}, {}
    for name, variant in variant_of.items():
        k = seen[variant] = seen.get(variant, -1) + 1
        styles[name] = {
            "color": colors[variants.index(variant) % len(colors)],
            "ls": ("-", "--", ":", "-.")[k % 4],
            "marker": ("o", "s", "^", "D")[k % 4],
            "label": variant if k == 0 else None,  # one legend entry per variant
        }
    return styles


def _epoch_figure(workdir, name: str, runs, styles, panels, **axis) -> str:
    """Two panels of curves against the epoch, one curve per run; ``panels`` holds
    ``(curve key, ylabel, title)`` of each, ``axis`` further axis properties (e.g. yscale)."""
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
    axes[0].legend(fontsize=7, frameon=False)
    return common.figure(workdir, name, fig)


def _figure_curves(workdir, runs, styles, col) -> str:
    panels = (
        ("lambda_max", "λ_max(H)", "sharpness over training"),
        ("jacobian", _jacobian_label(col), "input–output Jacobian norm over training"),
    )
    return _epoch_figure(workdir, "lambda_max_and_jacobian", runs, styles, panels)


def _figure_scatter(workdir, runs, styles, col) -> str:
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


def _figure_gaps(workdir, entries, styles, gap_corr, col) -> str:
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


def _figure_ratios(workdir, runs, styles) -> str:
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
