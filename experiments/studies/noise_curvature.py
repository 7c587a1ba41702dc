"""SGD noise vs curvature (Zhang, Yang & Tu 2026): per layer, the per-sample gradient
covariance C, the Hessian H and the per-sample Hessian second moment E_p[h_p²].

One SGD run per loss (cross-entropy and squared error); after training, for every analysed
layer S (one weight matrix) and on a fixed set of n training examples, everything is computed
exactly on the restricted objective (the S-blocks C_SS, H_SS and E_p[(h_p)_SS²]):

* H as a dense matrix (P_S Hessian-vector products, ``linalg.dense``) and its full
  eigendecomposition H v_i = λ_i v_i, λ_1 ≥ λ_2 ≥ …;
* C = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ as a dense matrix (``noise.gradient_covariance_dense``);
* diag E_p[h_p²] = (1/n) Σ_p ‖h_p e_i‖² (``second_moment.hessian_second_moment_diagonal``)
  and v_iᵀ E_p[h_p²] v_i = (1/n) Σ_p ‖h_p v_i‖² for the top N eigenvectors
  (``second_moment.hessian_second_moment_quadratic_forms``), both with h_p v in the factored
  form of the MLP's Dense layers (one batched pass per vector, not n per-example HVPs).

Then, with ``noise.fit_power_law`` (least squares on log-log pairs, percentile-bootstrap 95%
intervals), exactly what ``noise.eigenbasis_power_law`` and ``noise.diagonal_power_law`` fit:

* the eigenbasis exponent: v_iᵀ C v_i ∝ λ_i^γ over the top N = ``eigen_fraction``·P_S
  eigenpairs (the paper code's fit) — the primary γ;
* the coordinate exponent: C_ii ∝ H_ii^γ over the coordinates (reported);
* the exponents predicted by the activity–weight duality, C ∝ E_p[h_p²]: v_iᵀ E_p[h_p²] v_i
  ∝ λ_i^γ and E_p[h_p²]_ii ∝ H_ii^γ, and the direct fits of C against E_p[h_p²];
* the relative commutator ‖CH − HC‖_F / ‖CH‖_F against its value with H replaced by Q H Qᵀ
  for Haar-random Q (``noise.relative_commutator``, ``noise.rotation_baseline``: what
  ``noise.noise_curvature_commutation`` computes, here from the C and H already formed).

Conventions. C is the per-sample covariance with the 1/n normalisation; the noise of a
mini-batch gradient is C/B (with replacement), a factor that changes neither γ nor the
commutators. E_p[h_p²] is that of the layer's own per-sample Hessian, E_p[(h_p)_SS²] (the
paper code's per-layer h_p). The commutator is normalised by ‖CH‖_F as in the paper's
text (its code divides by ‖C‖_F‖H‖_F); either way it is compared with its value for a
random rotation of H's eigenbasis, the paper code's spectrum-preserving baseline. The
analysis runs in ``analysis_dtype`` (float64 by default) on the float32-trained weights.

Checks, per layer (and per loss where it applies), each with its source (Zhang, Yang & Tu
2026, arXiv 2602.05600, and the summary in the project's PAPERS.md §4):

* cross-entropy: 1 ≤ γ ≤ 2 for the eigenbasis γ (the paper's theoretical bound:
  λ_i² ≤ v_iᵀE_p[h_p²]v_i ≤ κ_max λ_i; PAPERS.md §4). The paper's "diagonal elements" are
  v_iᵀ C v_i against the Hessian eigenvalues λ_i: its bounds are derived in the Hessian
  eigenbasis and its code fits there, over the top N. The coordinate γ (C_ii against H_ii)
  is reported but not checked: a coordinate's H_ii averages many eigenvalues, so its exponent
  is a different, basis-dependent quantity that the paper does not bound;
* squared error of the softmax outputs (the paper's "mse", ``softmax_squared_error``):
  γ ≈ 1, band ``mse_gamma_band`` ([0.9, 1.15]; the paper reports γ ≈ 1 for it, PAPERS.md §4).
  For another squared-error loss in ``losses`` the bound 1 ≤ γ ≤ 2 is checked instead;
* γ(cross-entropy) > γ(squared error) (the paper: superlinear γ > 1 for cross-entropy, γ ≈ 1
  for its mse; PAPERS.md §4): the difference, passing when the two bootstrap intervals are
  disjoint with the cross-entropy one above;
* C and H nearly commute (the paper's commutator against a random rotation of H's eigenbasis,
  its code's baseline; PAPERS.md §4): relative commutator ≤ ``commutator_factor`` × the mean
  of its random-rotation baseline;
* C ∝ E_p[h_p²] (the paper's activity–weight-duality prediction, γ_AWD against γ_emp;
  PAPERS.md §4): the eigenbasis γ predicted from E_p[h_p²] lies within
  ``prediction_tolerance`` of the measured one. The direct fit of v_iᵀCv_i against
  v_iᵀE_p[h_p²]v_i (slope 1 under exact proportionality) and its R² are reported with it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.studies import common
from sharpness_jax import plots, subsets
from sharpness_jax.layer_noise import (
    FIT_FIELDS,
    FITS,
    commutation,
    fit_pairs,
    layer_quantities,
    num_eigen,
    power_law_fits,
)
from sharpness_jax.objective import Batch
from sharpness_jax.problem import problem_from_config

NAME = "noise_curvature"

_LOSS_LABELS = {
    "cross_entropy": "CE",
    "squared_error_half": "MSE",
    "squared_error_sum": "MSE",
    "softmax_squared_error": "MSE(softmax)",
}


def _run_name(loss: str) -> str:
    return loss


def _slug(layer: str) -> str:
    return layer.strip("/").replace("/", "_")


def _objective_and_batch(run_cfg: ml_collections.ConfigDict, num_examples: int | None):
    """The run's objective (model and loss as the training loop builds them) and the first
    ``num_examples`` training examples."""
    problem = problem_from_config(run_cfg)
    inputs, targets = problem.dataset.train
    n = len(targets) if num_examples is None else min(num_examples, len(targets))
    batch = Batch(jnp.asarray(inputs[:n]), jnp.asarray(targets[:n]))
    return problem.objective, batch


def _layer_sizes(config, params) -> dict[str, int]:
    sizes = {layer: subsets.num_params(subsets.select(params, layer)) for layer in config.layers}
    for layer, size in sizes.items():
        if size > config.max_dense_params:
            raise ValueError(
                f"layer {layer} has {size} parameters, above max_dense_params="
                f"{config.max_dense_params}: its dense C and H would not fit; choose a smaller "
                "layer"
            )
    return sizes


def _analyse(config, run_cfg, params, layer: str, key: jax.Array) -> dict[str, Any]:
    """The layer's analysis (``layer_quantities``, ``power_law_fits``, ``commutation``) in
    ``config.analysis_dtype``: float64 runs under ``jax.enable_x64`` with the trained
    parameters and the inputs cast up, so that the small Hessian eigenvalues of the top N
    are far above rounding."""
    if config.analysis_dtype not in ("float32", "float64"):
        raise ValueError(f"analysis_dtype must be float32 or float64, got {config.analysis_dtype}")
    if config.analysis_dtype == "float32":
        return _analyse_in_dtype(config, run_cfg, params, layer, key)
    with jax.enable_x64(True):
        return _analyse_in_dtype(config, run_cfg, params, layer, key)


def _analyse_in_dtype(config, run_cfg, params, layer: str, key: jax.Array) -> dict[str, Any]:
    dtype = jnp.dtype(config.analysis_dtype)
    objective, batch = _objective_and_batch(run_cfg, config.analysis_examples)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    batch = Batch(jnp.asarray(batch.inputs, dtype), batch.targets)
    sizes = _layer_sizes(config, params)
    size = sizes[layer]
    n_eig = num_eigen(size, config.eigen_fraction)
    quantities = jax.jit(
        functools.partial(
            layer_quantities,
            objective,
            layer=layer,
            num_eigen=n_eig,
            chunk_size=config.chunk_size,
            basis_chunk_size=config.basis_chunk_size,
        )
    )(params, batch)
    fit_key, rotation_key = jax.random.split(key)
    out = {k: v for k, v in quantities.items() if k not in ("h", "c")}
    # Objective-independent programs: jax.jit of the same library function reuses its
    # compiled program for every layer of the same size and across the runs.
    out.update(
        jax.jit(power_law_fits, static_argnames=("num_resamples",))(
            *fit_pairs(quantities, num_eigen=n_eig, length=max(sizes.values())),
            key=fit_key,
            num_resamples=config.num_resamples,
        )
    )
    out.update(
        jax.jit(commutation, static_argnames=("num_rotations",))(
            quantities["c"], quantities["h"], key=rotation_key, num_rotations=config.num_rotations
        )
    )
    out = {k: np.asarray(v) for k, v in out.items()}
    out.update(
        num_params=size,
        num_eigen=n_eig,
        num_examples=int(batch.targets.shape[0]),
        dtype=config.analysis_dtype,
    )
    return out


def _fit(an: dict[str, Any], name: str) -> dict[str, float]:
    return {f: float(np.asarray(an[f"{name}/{f}"])) for f in FIT_FIELDS}


def run(config: ml_collections.ConfigDict, workdir: Path, *, mesh=None, cache=None):
    checks, results, analyses = [], {}, {}
    for loss_index, loss in enumerate(config.losses):
        name = _run_name(loss)
        run_cfg = common.run_config(config.base, **{"loss.name": loss})
        result = common.train_run(workdir, name, run_cfg, mesh=mesh, cache=cache)
        cols = common.columns(workdir, name)
        entry = {
            "status": result.status,
            "step": int(result.step),
            "final_train_loss": float(cols["train_loss"][-1]),
            "final_train_accuracy": float(cols["train_accuracy"][-1]),
            "final_test_accuracy": float(cols["test_accuracy"][-1]),
            "layers": {},
        }
        results[name] = entry
        if result.status == "diverged":
            checks.append(
                common.diverged_check(
                    f"SGD with the {loss} loss trains", result.step, "no analysis"
                )
            )
            continue
        for layer_index, layer in enumerate(config.layers):
            key = jax.random.fold_in(
                jax.random.fold_in(jax.random.PRNGKey(config.seed), loss_index), layer_index
            )
            an = common.cached(
                workdir,
                f"{name}__{_slug(layer)}",
                lambda layer=layer, key=key: _analyse(config, run_cfg, result.params, layer, key),
            )
            analyses[(loss, layer)] = an
            entry["layers"][layer] = _layer_results(an)
            checks.extend(_layer_checks(config, loss, layer, entry["layers"][layer]))
    checks.extend(_loss_comparison_checks(config, results))
    figures = []
    if analyses:
        figures = [
            _power_law_figure(workdir, config, analyses, "eigen"),
            _power_law_figure(workdir, config, analyses, "coordinate"),
            _second_moment_figure(workdir, config, analyses),
            _commutator_figure(workdir, config, analyses),
            _gamma_figure(workdir, config, results),
        ]
    return checks, results, figures


def _layer_results(an: dict[str, Any]) -> dict[str, Any]:
    relative = float(np.asarray(an["relative_commutator"]))
    mean = float(np.asarray(an["baseline_mean"]))
    return {
        "num_params": int(an["num_params"]),
        "num_eigen": int(an["num_eigen"]),
        "num_examples": int(an["num_examples"]),
        "lambda_max": float(np.asarray(an["eigenvalues"])[0]),
        "num_positive_eigenvalues": int(np.sum(np.asarray(an["eigenvalues"]) > 0)),
        "fits": {fit: _fit(an, fit) for fit in FITS},
        "relative_commutator": relative,
        "baseline_mean": mean,
        "baseline_std": float(np.asarray(an["baseline_std"])),
        "commutator_ratio": relative / mean,
    }


def _layer_checks(config, loss: str, layer: str, res: dict[str, Any]) -> list[common.Check]:
    label = f"{_LOSS_LABELS.get(loss, loss)}, {layer}"
    eig, coord = res["fits"]["eigen"], res["fits"]["coordinate"]
    pred = res["fits"]["eigen_second_moment"]
    direct = res["fits"]["eigen_c_vs_second_moment"]
    low, high = config.gamma_bounds
    claim = f"1 ≤ γ ≤ 2 in the Hessian eigenbasis ({label}; paper's bound)"
    if loss == "softmax_squared_error":
        low, high = config.mse_gamma_band
        claim = f"γ ≈ 1 in the Hessian eigenbasis ({label}; paper reports γ ≈ 1)"
    tol = config.prediction_tolerance
    return [
        common.check_range(
            claim,
            eig["gamma"],
            low=low,
            high=high,
            detail=(
                f"v_iᵀCv_i ∝ λ_i^γ over the top {res['num_eigen']} of {res['num_params']} "
                f"eigenpairs: 95% CI [{eig['ci_low']:.3f}, {eig['ci_high']:.3f}], "
                f"R² = {eig['r2']:.3f}; coordinate fit C_ii ∝ H_ii^γ: γ = {coord['gamma']:.3f} "
                f"[{coord['ci_low']:.3f}, {coord['ci_high']:.3f}], R² = {coord['r2']:.3f} "
                "(reported, not checked)"
            ),
        ),
        common.check_range(
            f"C and H nearly commute ({label}): commutator / random-rotation baseline "
            "(paper's commutator test)",
            res["commutator_ratio"],
            high=config.commutator_factor,
            detail=(
                f"‖CH − HC‖_F/‖CH‖_F = {res['relative_commutator']:.3f}; with H → QHQᵀ "
                f"(Haar Q): {res['baseline_mean']:.3f} ± {res['baseline_std']:.3f}"
            ),
        ),
        common.check_range(
            f"C ∝ E_p[h_p²] ({label}): γ predicted from E_p[h_p²] minus measured γ "
            "(paper's γ_AWD vs γ_emp)",
            pred["gamma"] - eig["gamma"],
            low=-tol,
            high=tol,
            detail=(
                f"v_iᵀE[h²]v_i ∝ λ_i^γ: γ = {pred['gamma']:.3f} "
                f"[{pred['ci_low']:.3f}, {pred['ci_high']:.3f}] against {eig['gamma']:.3f}; "
                f"direct fit v_iᵀCv_i ∝ (v_iᵀE[h²]v_i)^s: s = {direct['gamma']:.3f}, "
                f"R² = {direct['r2']:.3f}"
            ),
        ),
    ]


def _loss_comparison_checks(config, results) -> list[common.Check]:
    ce = [loss for loss in config.losses if loss == "cross_entropy"]
    mse = [loss for loss in config.losses if "squared_error" in loss]
    if not ce or not mse:
        return []
    ce_res, mse_res = results[ce[0]]["layers"], results[mse[0]]["layers"]
    checks = []
    for layer in config.layers:
        if layer not in ce_res or layer not in mse_res:
            checks.append(
                common.Check(f"γ(CE) > γ(MSE) ({layer})", None, "> 0", None, "a run diverged")
            )
            continue
        a, b = ce_res[layer]["fits"]["eigen"], mse_res[layer]["fits"]["eigen"]
        checks.append(
            common.Check(
                f"γ(CE) > γ(MSE) in the Hessian eigenbasis ({layer}; paper: CE γ > 1, mse γ ≈ 1)",
                a["gamma"] - b["gamma"],
                "> 0, with the CE bootstrap interval above the MSE one",
                bool(a["ci_low"] > b["ci_high"]),
                (
                    f"CE {a['gamma']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}], "
                    f"MSE {b['gamma']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]"
                ),
            )
        )
    return checks


# ---------------------------------------------------------------------------------- figures


def _panel_label(loss: str, layer: str, sep: str = ", ") -> str:
    return f"{_LOSS_LABELS.get(loss, loss)}{sep}{layer.split('/')[-2]}"


def _panels(config, analyses, figsize_per=(3.6, 3.0)):
    """A figure with a row per loss and a column per layer, and ``(ax, loss, layer, analysis)``
    for every panel that has an analysis (the others are left blank)."""
    import matplotlib.pyplot as plt

    losses = [loss for loss in config.losses if any(k[0] == loss for k in analyses)]
    rows, cols = len(losses), len(config.layers)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(figsize_per[0] * cols, figsize_per[1] * rows),
        constrained_layout=True,
        squeeze=False,
    )
    panels = []
    for i, loss in enumerate(losses):
        for j, layer in enumerate(config.layers):
            an = analyses.get((loss, layer))
            if an is None:
                axes[i, j].set_axis_off()
            else:
                panels.append((axes[i, j], loss, layer, an))
    return fig, panels


def _setting(config) -> str:
    """The training setting of the runs, for figure titles."""
    b = config.base
    widths = "-".join(str(w) for w in b.model.widths)
    return (
        f"{b.dataset.name}, {b.model.name} {widths}, SGD η = {b.optimizer.learning_rate:g}, "
        f"B = {b.batch_size}, {b.max_steps} steps"
    )


def _log_limits(ax, x: np.ndarray, y: np.ndarray, margin: float = 2.0) -> None:
    """Log-axis limits spanning the positive points (x, y) with a factor ``margin`` of room."""
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if ok.any():
        ax.set_xlim(x[ok].min() / margin, x[ok].max() * margin)
        ax.set_ylim(y[ok].min() / margin, y[ok].max() * margin)


def _power_law_figure(workdir, config, analyses, basis: str) -> str:
    fig, panels = _panels(config, analyses)
    for ax, loss, layer, an in panels:
        fit = _fit(an, basis)
        if basis == "eigen":
            n, p = int(an["num_eigen"]), int(np.asarray(an["eigenvalues"]).size)
            x, y = np.asarray(an["eigenvalues"]), np.asarray(an["c_eigen"])
            pos = (x > 0) & (y > 0)
            ax.scatter(x[n:][pos[n:]], y[n:][pos[n:]], s=3, c="0.75", label="beyond top N")
            x, y = x[:n], y[:n]
            label = f"fitted: top N = {n} of {p} eigenpairs"
            xlabel, ylabel = "Hessian eigenvalue λ_i", "v_iᵀ C v_i"
            title = f"{_panel_label(loss, layer)}: fit on top N = {n}"
        else:
            x, y = np.asarray(an["h_diag"]), np.asarray(an["c_diag"])
            label, xlabel, ylabel = "coordinates", "H_ii", "C_ii"
            title = _panel_label(loss, layer)
        plots.power_law(
            x,
            y,
            gamma=fit["gamma"],
            intercept=fit["intercept"],
            label=f"{label} (R² = {fit['r2']:.2f})",
            xlabel=xlabel,
            ylabel=ylabel,
            title=title,
            ax=ax,
        )
        if basis == "eigen":
            # The axes span the fitted points: the near-zero eigenvalues beyond the top N
            # would stretch them over tens of decades.
            _log_limits(ax, x, y)
    fig.suptitle(_setting(config), fontsize=9)
    name = "power_law_eigenbasis" if basis == "eigen" else "power_law_coordinates"
    return common.figure(workdir, name, fig)


def _second_moment_figure(workdir, config, analyses) -> str:
    fig, panels = _panels(config, analyses)
    for ax, loss, layer, an in panels:
        n = int(an["num_eigen"])
        fit = _fit(an, "eigen_c_vs_second_moment")
        plots.power_law(
            np.asarray(an["e_eigen"]),
            np.asarray(an["c_eigen"])[:n],
            gamma=fit["gamma"],
            intercept=fit["intercept"],
            label=f"top {n} eigendirections (R² = {fit['r2']:.2f})",
            xlabel="v_iᵀ E_p[h_p²] v_i",
            ylabel="v_iᵀ C v_i",
            title=f"C ∝ E_p[h_p²]? {_panel_label(loss, layer)}",
            ax=ax,
        )
    return common.figure(workdir, "covariance_vs_second_moment", fig)


def _commutator_figure(workdir, config, analyses) -> str:
    import matplotlib.pyplot as plt

    keys = [(loss, layer) for loss in config.losses for layer in config.layers]
    keys = [k for k in keys if k in analyses]
    labels = [_panel_label(loss, layer, "\n") for loss, layer in keys]
    measured = [float(np.asarray(analyses[k]["relative_commutator"])) for k in keys]
    base = [float(np.asarray(analyses[k]["baseline_mean"])) for k in keys]
    std = [float(np.nan_to_num(np.asarray(analyses[k]["baseline_std"]))) for k in keys]
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.4), constrained_layout=True)
    pos = np.arange(len(keys))
    ax.bar(pos - 0.2, measured, width=0.4, label="‖CH − HC‖_F / ‖CH‖_F")
    ax.bar(pos + 0.2, base, width=0.4, yerr=std, color="0.6", label="H → QHQᵀ, Haar Q")
    _finish_bars(
        ax, pos, labels, "relative commutator", "C and H commute far better than randomly rotated"
    )
    return common.figure(workdir, "commutator", fig)


def _gamma_figure(workdir, config, results) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4), constrained_layout=True)
    fits = (
        ("eigen", "eigenbasis"),
        ("eigen_second_moment", "from E[h²]"),
        ("coordinate", "coord."),
    )
    ticks, labels, x = [], [], 0.0
    for loss in config.losses:
        for layer in config.layers:
            res = results.get(loss, {}).get("layers", {}).get(layer)
            if res is None:
                continue
            for k, (fit_name, fit_label) in enumerate(fits):
                f = res["fits"][fit_name]
                ax.errorbar(
                    x + 0.2 * k,
                    f["gamma"],
                    yerr=[[f["gamma"] - f["ci_low"]], [f["ci_high"] - f["gamma"]]],
                    fmt="os^"[k],
                    color=f"C{k}",
                    label=fit_label if not ticks else None,
                )
            ticks.append(x + 0.2)
            labels.append(_panel_label(loss, layer, "\n"))
            x += 1.0
    low, high = config.gamma_bounds
    ax.axhspan(low, high, color="0.9", zorder=0, label=f"{low:g} ≤ γ ≤ {high:g}")
    _finish_bars(
        ax, ticks, labels, "γ (95% bootstrap CI)", "power-law exponents of the noise covariance"
    )
    return common.figure(workdir, "gamma", fig)


def _finish_bars(ax, ticks, labels, ylabel: str, title: str) -> None:
    """Tick labels (one per loss and layer), the y label, the title and a frameless legend."""
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
