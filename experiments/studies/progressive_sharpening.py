"""Progressive sharpening and the input–output Jacobian (MacDonald, Valmadre & Lucey 2023): the
top Hessian eigenvalue λ_max and the norm of the input–output Jacobian ∂f(x)/∂x over the
training sample rise together early in training; the effective regularisers lower the
Jacobian norm, while only SAM directly lowers λ_max; and the Jacobian norm tracks the
generalisation gap across training setups at least as well as λ_max does.

One SGD run per variant (baseline, label smoothing, SAM, weight decay, a larger batch, a
smaller learning rate; see the config) and seed, each for the same number of epochs. At every
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

Checks, each with its source (the paper as summarised in PAPERS.md §3, whose figure
references come from the OpenReview reviews):

* baseline, Fig. 1: λ_max grows (peak / initial ≥ ``growth_factor``), the Jacobian norm grows
  (final / initial ≥ ``growth_factor``), and Spearman's ρ of λ_max against the Jacobian norm
  over the steps up to the peak of λ_max (the sharpening phase, resolved by extra
  log-spaced measurements early on) is at least ``time_correlation_min``. Fig. 1 shows the
  two tracking each other over the *early* part of training; over all of training the
  relation is weaker (Fig. 29), so the whole-run ρ(λ_max, Jacobian norm) is reported, not
  checked;
* baseline, the paper's ansatz (§3: λ_max goes with the Jacobian norm *modulated by the
  output curvature Λ*): Spearman's ρ of λ_max against the Λ-weighted term max_p κ_p over the
  whole run is at least ``time_correlation_min``. With cross-entropy Λ_p shrinks as the
  loss saturates late in training, which the unweighted ‖J_p‖₂² does not see; checking
  this co-movement over the whole run is our reading of the ansatz, not a figure of the
  paper;
* Fig. 5: every regulariser of the study (``regularisers``: label smoothing, weight decay,
  SAM, a larger learning rate) lowers the final Jacobian norm against the baseline; SAM,
  the only regulariser that directly lowers sharpness, lowers the final λ_max (weight decay
  can even raise λ_max while it improves generalisation, Fig. 2; the λ_max ratios of the
  other regularisers are reported, not checked);
* Fig. 5: across all runs the final Jacobian norm ranks the generalisation gap (error gap
  train − test accuracy; loss gap test − train unsmoothed loss) with a positive Spearman ρ,
  at least as well as the final λ_max does.

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
from experiments.studies import progressive_sharpening_figures as figs
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
GAPS = figs.GAPS


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
        "sam_rho": float(cfg.optimizer.sam_rho),
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
    unknown = [v for v in config.regularisers if v not in config.variants]
    if unknown:
        raise ValueError(f"regularisers {unknown} are not variants {list(config.variants)}")
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
    styles = figs.styles(variant_of, list(config.seeds))
    col = config.jacobian_column
    figures = [
        figs.figure_curves(workdir, runs, styles, col, _setting(config.base)),
        figs.figure_scatter(workdir, runs, styles, col),
        figs.figure_gaps(workdir, entries, styles, results["gap_correlations"], col),
        figs.figure_ratios(workdir, runs, styles),
    ]
    return checks_, results, figures


def _setting(base) -> str:
    """The training setting in a few words, e.g. "mnist5k, mlp (128, 128), cross_entropy,
    sgd η=0.1, B=32"."""
    m, o = base.model, base.optimizer
    widths = f" {tuple(m.widths)}" if m.get("widths") is not None else ""
    return (
        f"{base.dataset.name}, {m.name}{widths}, {base.loss.name}, {o.name} "
        f"η={o.learning_rate:g}, B={base.batch_size}"
    )


def _checks(config, entries, variant_of):
    """The study's checks, per claim (baseline growth and co-movement, the regularisers, the
    generalisation gaps), and the results they are computed from."""
    by_variant = {
        v: [entries[name] for name, vv in variant_of.items() if vv == v]
        for v in dict.fromkeys(variant_of.values())
    }
    results: dict[str, Any] = {"baseline": _baseline_results(config, by_variant)}
    checks_ = baseline_checks(
        results["baseline"],
        col=config.jacobian_column,
        growth_factor=config.growth_factor,
        correlation_min=config.time_correlation_min,
    )
    results["regularisers"] = _regulariser_ratios(config, by_variant)
    checks_ += regulariser_checks(config.regularisers, results["regularisers"])
    results["gap_correlations"] = _gap_correlations(entries)
    checks_ += gap_checks(config.jacobian_column, results["gap_correlations"], len(entries))
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


_FIG1 = "source: MacDonald et al. 2023, Fig. 1 (PAPERS.md §3, OpenReview reviews)"
_ANSATZ = "source: the paper's ansatz, λ_max ~ Jacobian modulated by Λ (PAPERS.md §3); our reading"
_FIG5 = "source: MacDonald et al. 2023, Fig. 5 (PAPERS.md §3, OpenReview reviews)"


def baseline_checks(
    baseline: Mapping[str, Any], *, col: str, growth_factor: float, correlation_min: float
) -> list[common.Check]:
    """Fig. 1: λ_max and the Jacobian norm rise, and rise together over the sharpening phase
    (the early part of training). The ansatz (PAPERS.md §3): λ_max co-moves with the
    Λ-weighted term max_p κ_p over the whole run. The whole-run ρ with the unweighted
    Jacobian norm is not a claim of the paper (weaker over all training, Fig. 29): it is in
    the results (``time_correlation``), not here."""
    return [
        common.check_range(
            "progressive sharpening (baseline): λ_max rises during training",
            baseline["lambda_max_growth"],
            low=growth_factor,
            detail=f"peak λ_max over λ_max at step 0 (minimum over seeds); {_FIG1}",
        ),
        common.check_range(
            f"baseline: the Jacobian norm ({col}) rises during training",
            baseline["jacobian_growth"],
            low=growth_factor,
            detail=f"final over initial (minimum over seeds); {_FIG1}",
        ),
        common.check_range(
            f"baseline: λ_max and the Jacobian norm ({col}) rise together during sharpening",
            baseline["sharpening_correlation"],
            low=correlation_min,
            detail="Spearman ρ across the measurement steps up to the peak of λ_max (at least "
            f"{baseline['sharpening_points']} points; minimum over seeds); {_FIG1}",
        ),
        common.check_range(
            "baseline: λ_max co-moves with the Λ-weighted Jacobian term max_p ‖Λ_p^½ J_p‖₂² "
            "over the whole run",
            baseline["time_correlation_gauss_newton"],
            low=correlation_min,
            detail="Spearman ρ across the equally spaced measurement steps of the whole run "
            f"(minimum over seeds); {_ANSATZ}",
        ),
    ]


def _regulariser_ratios(config, by_variant) -> dict[str, dict[str, float]]:
    """Per regulariser variant: final λ_max and final Jacobian norm over the baseline's (means
    over seeds)."""
    return {
        v: {
            key: _mean_over_seeds(by_variant, v, key)
            / _mean_over_seeds(by_variant, "baseline", key)
            for key in ("lambda_max_final", "jacobian_final")
        }
        for v in config.regularisers
    }


def _below_one(claim: str, ratio: float, detail: str) -> common.Check:
    passed = bool(ratio < 1) if math.isfinite(ratio) else None
    return common.Check(claim, ratio, "< 1", passed, detail)


def regulariser_checks(
    regularisers: Sequence[str], ratios: Mapping[str, Mapping[str, float]]
) -> list[common.Check]:
    """Fig. 5: every regulariser lowers the final Jacobian norm; only SAM directly lowers
    sharpness, so the λ_max check is SAM's alone (weight decay can even raise λ_max while it
    improves generalisation, Fig. 2; the other λ_max ratios are reported in the results)."""
    detail = "{} / baseline, means over the final window and the seeds; " + _FIG5
    checks_ = [
        _below_one(
            f"{v} (a regulariser) lowers the final Jacobian norm",
            ratios[v]["jacobian_final"],
            detail.format("final Jacobian norm"),
        )
        for v in regularisers
    ]
    if "sam" in regularisers:
        checks_.append(
            _below_one(
                "SAM lowers the final λ_max",
                ratios["sam"]["lambda_max_final"],
                detail.format("final λ_max"),
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


def gap_checks(col: str, gap_corr, num_runs: int) -> list[common.Check]:
    """Fig. 5: across runs the final Jacobian norm tracks each gap (ρ > 0), at least as well
    as λ_max (ρ_J − ρ_λ ≥ 0)."""
    checks_ = []
    for gap in GAPS:
        rho_j, rho_l = gap_corr[gap][col], gap_corr[gap]["lambda_max"]
        checks_.append(
            common.Check(
                f"the final Jacobian norm tracks the {_GAP_WORDS[gap]} across runs",
                rho_j,
                "> 0",
                bool(rho_j > 0) if math.isfinite(rho_j) else None,
                f"Spearman ρ over {num_runs} runs of {col} vs the gap; {_FIG5}",
            )
        )
        diff = rho_j - rho_l
        checks_.append(
            common.Check(
                f"the Jacobian norm tracks the {_GAP_WORDS[gap]} at least as well as λ_max",
                diff,
                ">= 0",
                bool(diff >= 0) if math.isfinite(diff) else None,
                f"ρ(Jacobian, gap) − ρ(λ_max, gap) = {rho_j:.3g} − {rho_l:.3g}; {_FIG5}",
            )
        )
    return checks_
