"""Quotient geometry of shallow networks (Dong & Cheng 2026): ambient flatness moves along the
rescaling orbits (a_i, w_i, b_i) → (c^{−k} a_i, c w_i, c b_i) while the quotient curvature does
not; the ambient Hessian has "false flat" zero modes along the orbits that the symmetry-reduced
Hessian removes; vertical (gauge) motion leaves the predictor unchanged to first order; and
gradient descent conserves Q_i = k‖a_i‖² − ‖w_i‖² − b_i² up to a drift that vanishes with η.

Shallow ReLU nets (k = 1) and quadratic nets (k = 2) on teacher–student regression with
½‖f − y‖² and n·K < P (see ``experiments/configs/quotient_geometry.py`` for the two setups).
The study's measurement (``quotient_geometry``, a built-in measurement of the library,
``sharpness_jax.quotient_summary``) runs inside the training loop and records, at every
measurement step, the dense spectra of H = ∇²L (ambient), of BᵀHB (B an orthonormal basis
of the Euclidean horizontal space W = V^⊥: reduced) and, on the regular set, the generalised
spectrum of (BᵀHB, BᵀGB) with G = JᵀJ/n (the quotient curvature; W of the
``scale_invariant`` metric, under which it is invariant at every regular point), together with
the conserved quantities, the parameters, and the split of the step the optimizer takes next
into horizontal and vertical parts (``quotient.decompose_update``; the update and the batch
are those of the training step, ``MeasureContext.update``). Checks, per model:

* ambient flatness moves along the orbit: max/min of λ_max(H) over c ∈ [0.1, 10] ≥ 10, at the
  last regular point of the regular-setup run;
* the quotient curvature does not: the generalised spectrum changes by at most 1e-6 (relative
  to its largest magnitude) over the same orbit, uniform and per-unit rescalings;
* the ambient Hessian at the interpolating minimum has exactly m more near-zero eigenvalues
  than the reduced Hessian (spec H = spec BᵀHB ∪ {0}^m at a critical point);
* vertical motion does not change the predictor to first order: (‖Jδ_v‖/‖δ_v‖)/(‖Jδ_h‖/‖δ_h‖)
  ≤ 1e-8 over the SGD steps, for the Euclidean split of SGD with weight decay (whose vertical
  part −ηλ P_V θ is non-zero; a plain gradient step is exactly horizontal in that split) and
  the ``scale_invariant`` split of the plain gradient step; and the vertical part is a
  non-negligible fraction of the step, so that the first check is not vacuous;
* Q_i is conserved along GD: relative drift ≤ 1e-2 at the smallest η, and the drift over a
  fixed gradient-flow time shrinks like η (log-log slope in [0.5, 1.5]).

Sources: Dong & Cheng 2026 (arXiv 2603.21502) via PAPERS.md §2: checks 1-2 "ambient flatness is
representation-dependent; quotient curvature is not"; 3 "removes the false flat zero modes";
4 "the vertical part is gauge"; 5 "a_i² − ‖w_i‖² − b_i² is conserved by gradient flow" (ReLU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments.configs.quotient_geometry import MEASUREMENT
from experiments.studies import common, quotient_geometry_figures
from sharpness_jax import records
from sharpness_jax.objective import Batch
from sharpness_jax.problem import problem_from_config
from sharpness_jax.quotient_summary import (
    conserved_scale,
    log_slope,
    orbit_scales,
    orbit_summary,
    relative_change,
    relative_drift,
    shallow_activation,
    split_ratios,
)
from sharpness_jax.shallow import HOMOGENEITY

NAME = "quotient_geometry"

# The measurement's arrays of the ambient and the reduced spectrum.
_SPECTRA = ("quotient_ambient", "quotient_reduced")

__all__ = [
    "MEASUREMENT",
    "NAME",
    "flatten_overrides",
    "log_slope",
    "orbit_scales",
    "relative_change",
    "relative_drift",
    "run",
]


def flatten_overrides(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: nested overrides as the dotted paths of ``run_config``."""
    flat = {}
    for key, value in nested.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "options":
            flat.update(flatten_overrides(value, f"{path}."))
        else:
            flat[path] = value
    return flat


# ================================================================ runs


def _run_dir(workdir: Path, name: str) -> Path:
    return Path(workdir) / "runs" / name


def _rows(workdir: Path, name: str) -> list[dict[str, Any]]:
    return records.read_metrics(_run_dir(workdir, name))


def _arrays(workdir: Path, name: str, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return records.load_arrays(_run_dir(workdir, name), row)


def _run_config(config, setup, **overrides) -> ml_collections.ConfigDict:
    return common.run_config(config.base, **{**flatten_overrides(setup.to_dict()), **overrides})


def _options(config, *, generalised: bool) -> dict[str, Any]:
    """Underdetermined runs split their steps; regular runs compute the quotient curvature
    (one compiled program per setup, shared with the orbit analyses)."""
    return {
        MEASUREMENT: {
            "generalised": generalised,
            "split": not generalised,
            "zero_rtol": float(config.zero_rtol),
        }
    }


def _problem(cfg: ml_collections.ConfigDict):
    """(activation, k, unravel, Batch of the training set, sizes) of a run config."""
    activation = shallow_activation(cfg.model)
    problem = problem_from_config(cfg)
    train = problem.dataset.train
    template = jax.eval_shape(problem.model.init, jax.random.PRNGKey(0))
    template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)
    flat, unravel = ravel_pytree(template)
    n, d = train.inputs.shape
    sizes = {
        "P": int(flat.size),
        "m": int(template["w"].shape[0]),
        "d": int(d),
        "n": int(n),
        "K": int(problem.dataset.num_classes),
    }
    batch = Batch(jnp.asarray(train.inputs), jnp.asarray(train.targets))
    return activation, HOMOGENEITY[activation], unravel, batch, sizes


def _orbit(config, cfg, params, *, generalised: bool) -> dict[str, Any]:
    """Spectra along the orbit of θ: every unit rescaled by c (grid), and per-unit factors."""
    activation, _, _, batch, sizes = _problem(cfg)
    grid, per_unit = orbit_scales(
        *config.orbit_range, config.orbit_points, config.orbit_random, sizes["m"], config.orbit_seed
    )
    kw = {"activation": activation, "loss_name": cfg.loss.name, "generalised": generalised}
    return orbit_summary(params, batch, config.zero_rtol, grid=grid, per_unit=per_unit, **kw)


# A run trainer: ``(name, setup, *, every, generalised, **overrides) -> run config``.
_Train = Callable[..., ml_collections.ConfigDict]


def _train(
    config,
    workdir: Path,
    name: str,
    setup,
    *,
    every: int,
    generalised: bool,
    mesh,
    cache,
    **overrides,
):
    """Trains run ``name`` of ``setup`` (with dotted-path ``overrides``), measuring the study's
    measurement every ``every`` steps and at the early log-spaced steps; returns its config."""
    measure = {
        "measure.every": max(1, every),
        "measure.num_log_steps": int(config.num_log_measurements),
        "measure.options": _options(config, generalised=generalised),
    }
    cfg = _run_config(config, setup, **overrides, **measure)
    common.train_run(workdir, name, cfg, mesh=mesh, cache=cache)
    return cfg


def _gd_runs(config, model: str, setup, train: _Train) -> dict[float, tuple[str, Any]]:
    """GD at η₀·f for each f, all for the same time η·steps; {η: (run name, run config)}."""
    runs = {}
    lr0, steps0 = setup.optimizer.learning_rate, setup.max_steps
    for f in config.lr_factors:
        lr, steps = float(lr0 * f), round(steps0 / f)
        name = f"{model}_gd_lr{lr:g}"
        overrides = {"optimizer.name": "gd", "optimizer.learning_rate": lr, "max_steps": steps}
        every = steps // config.measurements_per_run
        runs[lr] = (name, train(name, setup, every=every, generalised=False, **overrides))
    return runs


def _sgd_run(config, model: str, setup, lr0: float, train: _Train) -> str:
    """SGD with weight decay on the underdetermined setup; its steps are split."""
    sgd, steps = config.sgd, int(config.sgd.max_steps)
    overrides = {
        "optimizer.name": "sgd",
        "optimizer.learning_rate": float(lr0 * sgd.lr_factor),
        "optimizer.weight_decay": float(sgd.weight_decay),
        "batch_size": int(sgd.batch_size),
        "max_steps": steps,
    }
    name = f"{model}_sgd_wd{sgd.weight_decay:g}"
    every = steps // config.measurements_per_run
    train(name, setup, every=every, generalised=False, **overrides)
    return name


def _regular_run(model: str, setup, train: _Train) -> tuple[str, Any]:
    """GD on the regular setup, with the quotient curvature at every measurement."""
    name = f"{model}_regular_gd"
    every = int(setup.max_steps) // 4
    return name, train(name, setup, every=every, generalised=True, **{"optimizer.name": "gd"})


# ================================================================ analyses


def _conservation(workdir: Path, runs, k: int) -> dict[str, Any]:
    """Drift of Q_i = k‖a_i‖² − ‖w_i‖² − b_i² along each GD run, against time η·step."""
    out = {"learning_rates": [], "drift_max": [], "curves": {}}
    for lr, (name, cfg) in sorted(runs.items()):
        rows = _rows(workdir, name)
        unravel = _problem(cfg)[2]
        first = _arrays(workdir, name, rows[0])
        scale = conserved_scale(unravel(jnp.asarray(first["quotient_params"])), k)
        conserved = np.stack([_arrays(workdir, name, r)["quotient_conserved"] for r in rows])
        drift = relative_drift(conserved, scale)
        steps = np.array([r["step"] for r in rows], float)
        out["learning_rates"].append(lr)
        out["drift_max"].append(float(np.max(drift)))
        out["curves"][lr] = (lr * steps, drift)
    out["slope"] = log_slope(out["learning_rates"], out["drift_max"])
    return out


def _underdetermined(config, workdir: Path, model: str, setup, train: _Train) -> dict[str, Any]:
    """GD at several η (the interpolating minimum and its orbit, the conservation of Q_i) and
    the SGD split, on the underdetermined setup."""
    gd = _gd_runs(config, model, setup, train)
    lr0 = max(gd)
    name0, cfg0 = gd[lr0]
    activation, k, unravel, _, sizes_u = _problem(cfg0)
    rows0 = _rows(workdir, name0)
    last_arrays = _arrays(workdir, name0, rows0[-1])
    orbit_min = common.cached(
        workdir,
        f"{model}_orbit_minimum",
        lambda: _orbit(
            config, cfg0, unravel(jnp.asarray(last_arrays["quotient_params"])), generalised=False
        ),
    )
    conservation = _conservation(workdir, gd, k)
    split = common.columns(workdir, _sgd_run(config, model, setup, lr0, train))
    return {
        "gd": gd,
        "name0": name0,
        "activation": activation,
        "sizes_u": sizes_u,
        "lr0": lr0,
        "first": rows0[0],
        "last": rows0[-1],
        "last_arrays": last_arrays,
        "orbit_min": orbit_min,
        "conservation": conservation,
        "split": split,
        "split_summary": split_ratios(split),
        "time": lr0 * setup.max_steps,
    }


def _regular(config, workdir: Path, model: str, setup, train: _Train) -> dict[str, Any]:
    """GD on the regular setup; the quotient curvature along the orbit of its last regular
    point (its last point if none was regular)."""
    name, cfg = _regular_run(model, setup, train)
    rows = _rows(workdir, name)
    regular_rows = [r for r in rows if r.get("quotient_regular") == 1]
    point_row = (regular_rows or rows)[-1]
    _, _, unravel, _, sizes_r = _problem(cfg)
    point = _arrays(workdir, name, point_row)["quotient_params"]
    orbit_reg = common.cached(
        workdir,
        f"{model}_orbit_regular_step{point_row['step']}",
        lambda: _orbit(config, cfg, unravel(jnp.asarray(point)), generalised=True),
    )
    return {
        "sizes_r": sizes_r,
        "point_row": point_row,
        "orbit_step": int(point_row["step"]),
        "orbit_reg": orbit_reg,
    }


def _results(workdir: Path, f: Mapping[str, Any]) -> dict[str, Any]:
    """The model's entry of the study's results."""
    first, last, conservation = f["first"], f["last"], f["conservation"]
    split, split_summary = f["split"], f["split_summary"]
    orbit_min, orbit_reg = f["orbit_min"], f["orbit_reg"]
    drifts = zip(conservation["learning_rates"], conservation["drift_max"], strict=True)
    underdetermined = {
        **f["sizes_u"],
        "activation": f["activation"],
        "final_loss": {
            f"{lr:g}": _rows(workdir, n)[-1]["train_loss"] for lr, (n, _) in f["gd"].items()
        },
        "gradient_norm_final": float(last["quotient_gradient_norm"]),
        "ambient_zeros": int(last["quotient_ambient_zeros"]),
        "reduced_zeros": int(last["quotient_reduced_zeros"]),
        "lambda_max_initial": float(first["quotient_lambda_max"]),
        "lambda_max_final": float(last["quotient_lambda_max"]),
        "orbit_ambient_ratio": orbit_min["ambient_ratio"],
        "orbit_reduced_ratio": orbit_min["reduced_ratio"],
        "drift_max": {f"{lr:g}": d for lr, d in drifts},
        "drift_slope": conservation["slope"],
        "sgd_final_loss": float(split["train_loss"][-1]),
        "sgd_vertical_ratio_max": {
            p: float(np.nanmax(r)) for p, r in split_summary["ratio"].items()
        },
        "sgd_vertical_fraction_median": {
            p: float(np.nanmedian(v)) for p, v in split_summary["fraction"].items()
        },
        "sgd_second_order_vertical_change_median": float(
            np.nanmedian(split["split_change_vertical"] / split["split_change_horizontal"])
        ),
    }
    regular = {
        **f["sizes_r"],
        "orbit_step": f["orbit_step"],
        "regular": orbit_reg["regular"],
        "train_loss": float(f["point_row"]["train_loss"]),
        "gradient_norm": orbit_reg["gradient_norm"],
        "jacobian_condition": orbit_reg["jacobian_condition"],
        "ambient_ratio": orbit_reg["ambient_ratio"],
        "reduced_ratio": orbit_reg["reduced_ratio"],
        "generalised_change": orbit_reg["generalised_change"],
        "generalised_euclidean_change": orbit_reg["generalised_euclidean_change"],
        "generalised_lambda_max": float(orbit_reg["reference_generalised"][0]),
    }
    return {"underdetermined": underdetermined, "regular": regular}


def _model_study(
    config, workdir: Path, model: str, setups, *, mesh=None, cache=None
) -> tuple[list, dict, dict]:
    """The runs, checks and results of one model, with what its figures draw."""
    train = functools.partial(_train, config, workdir, mesh=mesh, cache=cache)
    facts = {
        "model": model,
        **_underdetermined(config, workdir, model, setups.underdetermined, train),
        **_regular(config, workdir, model, setups.regular, train),
    }
    plot_data = {
        **facts,
        "init_spectra": tuple(
            _arrays(workdir, facts["name0"], facts["first"])[key] for key in _SPECTRA
        ),
        "min_spectra": tuple(facts["last_arrays"][key] for key in _SPECTRA),
        "training": common.columns(workdir, facts["name0"]),
    }
    return _checks(config, facts), _results(workdir, facts), plot_data


# ================================================================ checks


def _checks(config, f: Mapping[str, Any]) -> list[common.Check]:
    """The claims of the paper, for one model (see the module docstring)."""
    return [
        *_orbit_checks(config, f),
        _zero_mode_check(config, f),
        *_split_checks(config, f),
        *_conservation_checks(config, f),
    ]


def _orbit_checks(config, f: Mapping[str, Any]) -> list[common.Check]:
    """Ambient flatness moves along the orbit of the regular point; the quotient curvature
    does not."""
    model, sr, orbit_reg = f["model"], f["sizes_r"], f["orbit_reg"]
    lo, hi = config.orbit_range
    where = f"regular setup (P={sr['P']}, n·K={sr['n'] * sr['K']}), step {f['orbit_step']}"
    regular = orbit_reg["regular"]
    return [
        common.check_range(
            f"{model}: ambient flatness moves along the orbit "
            f"(max/min λ_max(H), c ∈ [{lo:g}, {hi:g}])",
            orbit_reg["ambient_ratio"],
            low=config.ambient_change_min,
            detail=f"{where}; uniform and per-unit rescalings",
        ),
        common.Check(
            f"{model}: the quotient curvature does not move along the orbit (max relative "
            "change of the generalised spectrum of (BᵀHB, BᵀGB), scale-invariant W)",
            orbit_reg["generalised_change"] if regular else None,
            f"<= {config.invariance_tol:.4g}",
            bool(orbit_reg["generalised_change"] <= config.invariance_tol) if regular else None,
            f"{where}; cond(J) = {orbit_reg['jacobian_condition']:.3g}; Euclidean W (not "
            f"invariant off critical points): {orbit_reg['generalised_euclidean_change']:.3g}"
            + ("" if regular else "; no regular point was reached: not evaluated"),
        ),
    ]


def _zero_mode_check(config, f: Mapping[str, Any]) -> common.Check:
    """The ambient Hessian at the interpolating minimum has m more near-zero eigenvalues than
    the reduced Hessian."""
    su, last = f["sizes_u"], f["last"]
    zeros_amb, zeros_red = int(last["quotient_ambient_zeros"]), int(last["quotient_reduced_zeros"])
    interpolating = last["train_loss"] <= config.interpolation_loss
    return common.check_range(
        f"{f['model']}: at the interpolating minimum the ambient Hessian has m = {su['m']} more "
        "near-zero eigenvalues than the reduced Hessian",
        zeros_amb - zeros_red,
        low=su["m"],
        high=su["m"],
        detail=f"GD η={f['lr0']:g}, final loss {last['train_loss']:.3g}"
        f"{'' if interpolating else ' (not interpolating)'}; |λ| ≤ "
        f"{config.zero_rtol:g}·λ_max: ambient {zeros_amb}, reduced {zeros_red} "
        f"(P − n·K = {su['P'] - su['n'] * su['K']})",
    )


def _split_checks(config, f: Mapping[str, Any]) -> list[common.Check]:
    """Vertical motion leaves the predictor unchanged to first order, and is not negligible."""
    model = f["model"]
    ratio, fraction = f["split_summary"]["ratio"], f["split_summary"]["fraction"]
    medians = {p: float(np.nanmedian(v)) for p, v in fraction.items()}
    return [
        common.check_range(
            f"{model}: vertical motion does not change the predictor to first order "
            "(max (‖Jδ_v‖/‖δ_v‖)/(‖Jδ_h‖/‖δ_h‖) over SGD steps)",
            float(np.nanmax(np.concatenate([ratio["split"], ratio["split_si"]]))),
            high=config.vertical_ratio_max,
            detail="Euclidean split of SGD+weight-decay steps and scale-invariant split of the "
            "plain SGD steps",
        ),
        common.check_range(
            f"{model}: the split steps have a vertical part "
            "(median ‖δ_v‖/‖δ‖, the smaller of the two splits)",
            min(medians.values()),
            low=config.vertical_fraction_min,
            detail=f"Euclidean {medians['split']:.3g}, scale-invariant {medians['split_si']:.3g}",
        ),
    ]


def _conservation_checks(config, f: Mapping[str, Any]) -> list[common.Check]:
    """Q_i is conserved along GD up to a drift that shrinks like η."""
    model, conservation = f["model"], f["conservation"]
    lrs, drifts = conservation["learning_rates"], conservation["drift_max"]
    smallest = min(lrs)
    return [
        common.check_range(
            f"{model}: k‖a_i‖² − ‖w_i‖² − b_i² is conserved along GD "
            f"(max relative drift at η={smallest:g})",
            drifts[lrs.index(smallest)],
            high=config.drift_max,
            detail="relative to (1/m)Σ_i(k‖a_i‖² + ‖w_i‖² + b_i²) at step 0, over time "
            f"η·steps = {f['time']:g}",
        ),
        common.check_range(
            f"{model}: the drift shrinks with η (log-log slope of the drift against η)",
            conservation["slope"],
            low=config.drift_slope[0],
            high=config.drift_slope[1],
            detail="drifts "
            + ", ".join(f"η={lr:g}: {d:.3g}" for lr, d in zip(lrs, drifts, strict=True)),
        ),
    ]


# ================================================================ the study


def run(config: ml_collections.ConfigDict, workdir: Path, *, mesh=None, cache=None):
    """Runs the study (float64 throughout); returns (checks, results, figures)."""
    workdir = Path(workdir)
    with jax.enable_x64(True):
        checks, results, plot_data = [], {}, {}
        if sorted(config.model_names) != sorted(config.models):
            raise ValueError(
                f"model_names {tuple(config.model_names)} must list the keys of models "
                f"{tuple(config.models)}"
            )
        for model in config.model_names:
            c, r, p = _model_study(
                config, workdir, model, config.models[model], mesh=mesh, cache=cache
            )
            checks += c
            results[model] = r
            plot_data[model] = p
        figures = quotient_geometry_figures.figures(workdir, plot_data, config)
    return checks, results, figures
