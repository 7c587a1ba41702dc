"""Quotient geometry of shallow networks (Dong & Cheng 2026): ambient flatness moves along the
rescaling orbits (a_i, w_i, b_i) → (c^{−k} a_i, c w_i, c b_i) while the quotient curvature does
not; the ambient Hessian has "false flat" zero modes along the orbits that the symmetry-reduced
Hessian removes; vertical (gauge) motion leaves the predictor unchanged to first order; and
gradient descent conserves Q_i = k‖a_i‖² − ‖w_i‖² − b_i² up to a drift that vanishes with η.

Shallow ReLU nets (k = 1) and quadratic nets (k = 2) on teacher–student regression with
½‖f − y‖² and n·K < P (see ``experiments/configs/quotient_geometry.py`` for the two setups).
The study's measurement (``quotient_geometry``, registered on import) runs inside the training
loop and records, at every measurement step, the dense spectra of H = ∇²L (ambient), of BᵀHB
(B an orthonormal basis of the Euclidean horizontal space W = V^⊥: reduced) and, on the regular
set, the generalised spectrum of (BᵀHB, BᵀGB) with G = JᵀJ/n (the quotient curvature; W of the
``scale_invariant`` metric, under which it is invariant at every regular point), together with
the conserved quantities, the parameters, and the split of the step the optimizer takes next
into horizontal and vertical parts (``quotient.decompose_update``). Checks, per model:

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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments.configs.quotient_geometry import MEASUREMENT
from experiments.studies import common
from sharpness_jax import data, minibatch, models, operators, quotient, records, training
from sharpness_jax.objective import Batch, get_loss
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
    "shallow_activation",
    "step_weights",
]


# ================================================================ pure helpers


def shallow_activation(model: Mapping[str, Any]) -> str:
    """The activation of a ``shallow`` or ``quadratic`` model config (``sharpness_jax.models``).

    Raises:
      ValueError: for another model, or an activation without rescaling symmetry.
    """
    name = model["name"]
    if name == "quadratic":
        return "quadratic"
    if name != "shallow":
        raise ValueError(f"the quotient geometry needs a shallow or quadratic model, got {name!r}")
    activation = model.get("activation") or "relu"  # the zoo's default for "shallow"
    if HOMOGENEITY.get(activation) is None:
        raise ValueError(
            f"activation {activation!r} has no continuous rescaling symmetry; use one of "
            f"{sorted(a for a, k in HOMOGENEITY.items() if k is not None)}"
        )
    return activation


def relative_change(values: np.ndarray, reference: np.ndarray) -> float:
    """max_j |λ_j − λ_j^ref| / max_j |λ_j^ref| for two spectra sorted the same way."""
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if values.shape != reference.shape:
        raise ValueError(f"spectra of different sizes: {values.shape} vs {reference.shape}")
    return float(np.max(np.abs(values - reference)) / np.max(np.abs(reference)))


def relative_drift(conserved: np.ndarray, scale: float) -> np.ndarray:
    """max_i |Q_i(t) − Q_i(0)| / scale for each row t of ``conserved`` (shape (T, m))."""
    conserved = np.asarray(conserved, float)
    return np.max(np.abs(conserved - conserved[:1]), axis=1) / scale


def log_slope(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares slope of log y against log x (NaN for fewer than two positive pairs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def orbit_scales(
    low: float, high: float, points: int, random: int, m: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uniform factors c on a log grid over [low, high], (random, m) per-unit factors drawn
    log-uniformly on the same range)."""
    if not 0 < low < 1 < high:
        raise ValueError(f"the orbit range must satisfy 0 < low < 1 < high, got {(low, high)}")
    grid = np.geomspace(low, high, points)
    rng = np.random.default_rng(seed)
    per_unit = np.exp(rng.uniform(np.log(low), np.log(high), size=(random, m)))
    return grid, per_unit


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


# ================================================================ the measurement


def _rms(outputs: jax.Array) -> jax.Array:
    """(1/n Σ_p ‖o_p‖²)^{1/2} of per-example outputs (n, K)."""
    return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(outputs), axis=-1)))


def _tree_norm(tree) -> jax.Array:
    return jnp.linalg.norm(ravel_pytree(tree)[0])


@functools.partial(jax.jit, static_argnames=("activation", "loss_name", "generalised", "split"))
def _quotient_measures(
    params,
    batch: Batch,
    step_weights: jax.Array,
    learning_rate: jax.Array,
    weight_decay: jax.Array,
    zero_rtol: jax.Array,
    *,
    activation: str,
    loss_name: str,
    generalised: bool,
    split: bool,
) -> dict[str, jax.Array]:
    """Everything the study records at one point θ (see the module docstring).

    H = ∇²L with L the MEAN loss over ``batch``; near-zero eigenvalues are counted with the
    same threshold zero_rtol · max|λ(H)| for the ambient and the reduced spectrum. With
    ``split``, the step is δ = −η(∇L_B(θ) + λθ) with L_B = Σ_p ω_p ℓ_p (``step_weights`` ω:
    the multiplicity of example p in the mini-batch over its size; 1/n for the full batch),
    split with the Euclidean metric; the plain gradient step −η∇L_B(θ) is split with the
    ``scale_invariant`` metric. Predictor changes are RMS over ``batch``'s inputs.
    """
    objective = quotient.shallow_objective(get_loss(loss_name), activation=activation)
    grad = operators.gradient(objective, params, batch)
    eu = quotient.quotient_spectra(
        objective, params, batch, activation=activation, metric="euclidean"
    )
    tol = zero_rtol * jnp.max(jnp.abs(eu.ambient))
    reg = quotient.regularity(params, batch.inputs, activation=activation)
    sv = reg.singular_values
    out = {
        "quotient_params": ravel_pytree(params)[0],
        "quotient_conserved": quotient.conserved_quantities(params, activation=activation),
        "quotient_gradient_norm": _tree_norm(grad),
        "quotient_ambient": eu.ambient,
        "quotient_reduced": eu.reduced,
        "quotient_lambda_max": eu.ambient[0],
        "quotient_reduced_lambda_max": eu.reduced[0],
        "quotient_ambient_zeros": jnp.sum((jnp.abs(eu.ambient) <= tol).astype(jnp.int32)),
        "quotient_reduced_zeros": jnp.sum((jnp.abs(eu.reduced) <= tol).astype(jnp.int32)),
        "quotient_rank": reg.rank,
        "quotient_expected_rank": reg.expected_rank,
        "quotient_regular": reg.is_regular.astype(jnp.int32),
        "quotient_jacobian_condition": sv[0] / sv[jnp.minimum(reg.expected_rank, sv.size) - 1],
    }
    if generalised:
        si = quotient.quotient_spectra(
            objective, params, batch, activation=activation, metric="scale_invariant"
        )
        out.update(
            quotient_generalised=si.generalised,
            quotient_generalised_lambda_max=si.generalised[0],
            quotient_generalised_euclidean=eu.generalised,
            quotient_generalised_euclidean_lambda_max=eu.generalised[0],
        )
    if split:
        step_grad = jax.grad(lambda p: jnp.sum(step_weights * objective.batch_losses(p, batch)))(
            params
        )
        with_decay = jax.tree.map(
            lambda g, p: -learning_rate * (g + weight_decay * p), step_grad, params
        )
        plain = jax.tree.map(lambda g: -learning_rate * g, step_grad)
        for prefix, delta, metric in (
            ("split", with_decay, "euclidean"),
            ("split_si", plain, "scale_invariant"),
        ):
            parts = quotient.decompose_update(
                params, delta, batch.inputs, activation=activation, metric=metric
            )
            out.update(
                {
                    f"{prefix}_step_norm": _tree_norm(delta),
                    f"{prefix}_horizontal_norm": _tree_norm(parts.horizontal),
                    f"{prefix}_vertical_norm": _tree_norm(parts.vertical),
                    f"{prefix}_jvp_horizontal": _rms(parts.first_order_horizontal),
                    f"{prefix}_jvp_vertical": _rms(parts.first_order_vertical),
                    f"{prefix}_change_horizontal": _rms(parts.change_horizontal),
                    f"{prefix}_change_vertical": _rms(parts.change_vertical),
                    f"{prefix}_change_total": _rms(parts.change_total),
                }
            )
    return out


def step_weights(indices: np.ndarray, num_examples: int) -> np.ndarray:
    """ω_p = (multiplicity of p in the mini-batch) / B, so that L_B = Σ_p ω_p ℓ_p."""
    indices = np.asarray(indices)
    return np.bincount(indices, minlength=num_examples) / indices.size


def _check_step_rule(config) -> None:
    """The split reproduces the step θ ← θ − η(∇L_B + λθ): plain GD/SGD, constant η."""
    o = config.optimizer
    if o.name not in ("gd", "sgd") or o.schedule != "constant" or o.warmup_steps:
        raise ValueError(
            f"{MEASUREMENT}: split=True reproduces the step of plain GD/SGD with a constant "
            f"learning rate; got optimizer {o.name!r}, schedule {o.schedule!r}, warmup "
            f"{o.warmup_steps}"
        )


def _measure(ctx: training.MeasureContext) -> dict[str, Any]:
    """The ``quotient_geometry`` measurement, on the measurement batch (the training set).

    Metrics row: ``quotient_lambda_max`` (λ_max(H)), ``quotient_reduced_lambda_max``
    (λ_max(BᵀHB), Euclidean W), ``quotient_ambient_zeros`` / ``quotient_reduced_zeros``
    (#|λ| ≤ zero_rtol·max|λ(H)|), ``quotient_gradient_norm``, ``quotient_rank`` /
    ``quotient_expected_rank`` / ``quotient_regular`` / ``quotient_jacobian_condition``
    (``quotient.regularity``); with ``generalised``: ``quotient_generalised_lambda_max`` (top
    eigenvalue of BᵀHB y = λ BᵀGB y, scale-invariant W) and its Euclidean-W counterpart; with
    ``split`` (plain GD/SGD with a constant η only): ``split_*`` (Euclidean split of
    δ = −η(∇L_B + λθ)) and ``split_si_*`` (scale-invariant split of −η∇L_B), each with
    ``step_norm``, ``horizontal_norm``, ``vertical_norm`` (‖·‖₂ of δ, δ_h, δ_v),
    ``jvp_horizontal`` / ``jvp_vertical`` (RMS of J δ_h, J δ_v over the inputs) and
    ``change_horizontal`` / ``change_vertical`` / ``change_total`` (RMS of the exact output
    changes). B_s is the batch the sampler gives training at this step, so δ is the update
    training applies next. Arrays: ``quotient_params`` (ravelled θ), ``quotient_conserved``
    (Q_i), ``quotient_ambient``, ``quotient_reduced`` and, with ``generalised``,
    ``quotient_generalised`` and ``quotient_generalised_euclidean`` (descending spectra).
    """
    opts, c = ctx.options, ctx.config
    activation = shallow_activation(c.model)
    dtype = jax.tree.leaves(ctx.params)[0].dtype
    n = ctx.info.num_train
    if opts["split"]:
        _check_step_rule(c)
        sampler = minibatch.Sampler(n, ctx.info.batch_size, replace=c.replace, seed=c.seed)
        weights = step_weights(sampler.indices(ctx.step), n)
        lr, wd = c.optimizer.learning_rate, c.optimizer.weight_decay
    else:
        weights, lr, wd = np.full(n, 1.0 / n), 0.0, 0.0
    return _quotient_measures(
        ctx.params,
        Batch(*ctx.batch),
        jnp.asarray(weights, dtype),
        jnp.asarray(lr, dtype),
        jnp.asarray(wd, dtype),
        jnp.asarray(opts["zero_rtol"], dtype),
        activation=activation,
        loss_name=c.loss.name,
        generalised=bool(opts["generalised"]),
        split=bool(opts["split"]),
    )


def _check_measure(options: Mapping[str, Any], info: training.RunInfo) -> None:
    for key in ("generalised", "split"):
        if not isinstance(options[key], bool):
            raise ValueError(f"{MEASUREMENT}: {key} must be a bool, got {options[key]!r}")
    if not options["zero_rtol"] > 0:
        raise ValueError(f"{MEASUREMENT}: zero_rtol must be positive, got {options['zero_rtol']}")
    if info.num_params > info.exact_param_limit:
        raise ValueError(
            f"{MEASUREMENT}: builds dense P × P Hessians, P={info.num_params:,} exceeds "
            f"measure.exact_param_limit={info.exact_param_limit:,}"
        )
    if options["split"] and info.num_measure != info.num_train:
        raise ValueError(
            f"{MEASUREMENT}: split=True needs the whole training set as the measurement batch "
            f"(measure_subset=None), got {info.num_measure} of {info.num_train} examples"
        )


training.register_measurement(
    MEASUREMENT,
    _measure,
    defaults={"generalised": False, "split": False, "zero_rtol": 1e-6},
    check=_check_measure,
    overwrite=True,
)


# ================================================================ runs and analyses


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
    ds_opts = {k: v for k, v in cfg.dataset.to_dict().items() if k not in ("name", "dtype")}
    dataset = data.load_dataset(cfg.dataset.name, dtype=cfg.dtype, **ds_opts)
    model_opts = {k: v for k, v in cfg.model.to_dict().items() if k != "name"}
    model = models.build_model(
        cfg.model.name,
        input_shape=dataset.train.inputs.shape[1:],
        num_outputs=dataset.num_classes,
        param_dtype=cfg.dtype,
        **model_opts,
    )
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)
    flat, unravel = ravel_pytree(template)
    n, d = dataset.train.inputs.shape
    sizes = {
        "P": int(flat.size),
        "m": int(template["w"].shape[0]),
        "d": int(d),
        "n": int(n),
        "K": int(dataset.num_classes),
    }
    batch = Batch(jnp.asarray(dataset.train.inputs), jnp.asarray(dataset.train.targets))
    return activation, HOMOGENEITY[activation], unravel, batch, sizes


def _unit_scale(params, k: int) -> float:
    """(1/m) Σ_i (k‖a_i‖² + ‖w_i‖² + b_i²): the size of the terms of Q_i."""
    total = k * jnp.sum(jnp.square(params["a"])) + jnp.sum(jnp.square(params["w"]))
    if "b" in params:
        total = total + jnp.sum(jnp.square(params["b"]))
    return float(total) / params["w"].shape[0]


def _point(params, batch, rtol, *, activation, loss_name, generalised):
    """The spectra at θ, with the compiled program of the measurement of the same setup
    (underdetermined runs: ``split``; regular runs: ``generalised``)."""
    dtype = jax.tree.leaves(params)[0].dtype
    n = batch.inputs.shape[0]
    device = next(iter(jnp.zeros(()).devices()))
    # Placed like the measurement's arguments (committed params and data, uncommitted
    # scalars), so that the compiled program is reused.
    params, batch = jax.device_put((params, batch), device)
    out = _quotient_measures(
        params,
        batch,
        jnp.full((n,), 1.0 / n, dtype),
        jnp.zeros((), dtype),
        jnp.zeros((), dtype),
        jnp.asarray(rtol, dtype),
        activation=activation,
        loss_name=loss_name,
        generalised=generalised,
        split=not generalised,
    )
    return {k: np.asarray(v) for k, v in out.items()}


_rescale = jax.jit(quotient.rescale_units, static_argnames="activation")


def _orbit(config, cfg, params, *, generalised: bool) -> dict[str, Any]:
    """Spectra along the orbit of θ: every unit rescaled by c (grid), and per-unit factors."""
    activation, _, _, batch, sizes = _problem(cfg)
    grid, per_unit = orbit_scales(
        *config.orbit_range,
        config.orbit_points,
        config.orbit_random,
        sizes["m"],
        config.orbit_seed,
    )
    kw = {"activation": activation, "loss_name": cfg.loss.name, "generalised": generalised}
    ref = _point(params, batch, config.zero_rtol, **kw)

    def at(scales):
        return _point(
            _rescale(params, jnp.asarray(scales), activation=activation),
            batch,
            config.zero_rtol,
            **kw,
        )

    points = [at(np.full(sizes["m"], c)) for c in grid] + [at(s) for s in per_unit]
    out = {
        "c": grid,
        "ambient_lambda_max": np.array([p["quotient_lambda_max"] for p in points[: grid.size]]),
        "reduced_lambda_max": np.array(
            [p["quotient_reduced_lambda_max"] for p in points[: grid.size]]
        ),
        "ambient_zeros": np.array([p["quotient_ambient_zeros"] for p in points[: grid.size]]),
        "reduced_zeros": np.array([p["quotient_reduced_zeros"] for p in points[: grid.size]]),
        "ambient_lambda_max_all": np.array([p["quotient_lambda_max"] for p in points]),
        "reference_ambient": ref["quotient_ambient"],
        "reference_reduced": ref["quotient_reduced"],
        "regular": bool(ref["quotient_regular"]),
        "jacobian_condition": float(ref["quotient_jacobian_condition"]),
        "gradient_norm": float(ref["quotient_gradient_norm"]),
    }
    lam = out["ambient_lambda_max_all"]
    out["ambient_ratio"] = float(np.max(lam) / np.min(lam))
    red = out["reduced_lambda_max"]
    out["reduced_ratio"] = float(np.max(red) / np.min(red))
    if generalised:
        gen = ref["quotient_generalised"]
        out["reference_generalised"] = gen
        out["generalised_lambda_max"] = np.array(
            [p["quotient_generalised_lambda_max"] for p in points[: grid.size]]
        )
        out["generalised_euclidean_lambda_max"] = np.array(
            [p["quotient_generalised_euclidean_lambda_max"] for p in points[: grid.size]]
        )
        changes = [relative_change(p["quotient_generalised"], gen) for p in points]
        eu_changes = [
            relative_change(
                p["quotient_generalised_euclidean"], ref["quotient_generalised_euclidean"]
            )
            for p in points
        ]
        out["generalised_changes"] = np.array(changes)
        out["generalised_change"] = float(np.max(changes))
        out["generalised_euclidean_change"] = float(np.max(eu_changes))
    return out


def _gd_runs(config, workdir: Path, model: str, setup) -> dict[float, tuple[str, Any]]:
    """GD at η₀·f for each f, all for the same time η·steps; {η: (run name, run config)}."""
    runs = {}
    lr0, steps0 = setup.optimizer.learning_rate, setup.max_steps
    for f in config.lr_factors:
        lr, steps = float(lr0 * f), round(steps0 / f)
        cfg = _run_config(
            config,
            setup,
            **{
                "optimizer.name": "gd",
                "optimizer.learning_rate": lr,
                "max_steps": steps,
                "measure.every": max(1, steps // config.measurements_per_run),
                "measure.num_log_steps": int(config.num_log_measurements),
                "measure.options": _options(config, generalised=False),
            },
        )
        name = f"{model}_gd_lr{lr:g}"
        common.train_run(workdir, name, cfg)
        runs[lr] = (name, cfg)
    return runs


def _sgd_run(config, workdir: Path, model: str, setup, lr0: float) -> str:
    """SGD with weight decay on the underdetermined setup; its steps are split."""
    sgd, steps = config.sgd, int(config.sgd.max_steps)
    cfg = _run_config(
        config,
        setup,
        **{
            "optimizer.name": "sgd",
            "optimizer.learning_rate": float(lr0 * sgd.lr_factor),
            "optimizer.weight_decay": float(sgd.weight_decay),
            "batch_size": int(sgd.batch_size),
            "max_steps": steps,
            "measure.every": max(1, steps // config.measurements_per_run),
            "measure.num_log_steps": int(config.num_log_measurements),
            "measure.options": _options(config, generalised=False),
        },
    )
    name = f"{model}_sgd_wd{sgd.weight_decay:g}"
    common.train_run(workdir, name, cfg)
    return name


def _regular_run(config, workdir: Path, model: str, setup) -> tuple[str, Any]:
    """GD on the regular setup, with the quotient curvature at every measurement."""
    steps = int(setup.max_steps)
    cfg = _run_config(
        config,
        setup,
        **{
            "optimizer.name": "gd",
            "measure.every": max(1, steps // 4),
            "measure.num_log_steps": int(config.num_log_measurements),
            "measure.options": _options(config, generalised=True),
        },
    )
    name = f"{model}_regular_gd"
    common.train_run(workdir, name, cfg)
    return name, cfg


def _conservation(workdir: Path, runs, k: int) -> dict[str, Any]:
    """Drift of Q_i = k‖a_i‖² − ‖w_i‖² − b_i² along each GD run, against time η·step."""
    out = {"learning_rates": [], "drift_max": [], "curves": {}}
    for lr, (name, cfg) in sorted(runs.items()):
        rows = _rows(workdir, name)
        unravel = _problem(cfg)[2]
        first = _arrays(workdir, name, rows[0])
        scale = _unit_scale(unravel(jnp.asarray(first["quotient_params"])), k)
        conserved = np.stack([_arrays(workdir, name, r)["quotient_conserved"] for r in rows])
        drift = relative_drift(conserved, scale)
        steps = np.array([r["step"] for r in rows], float)
        out["learning_rates"].append(lr)
        out["drift_max"].append(float(np.max(drift)))
        out["curves"][lr] = (lr * steps, drift)
    out["slope"] = log_slope(out["learning_rates"], out["drift_max"])
    return out


def _split_summary(split: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per split ("split": Euclidean, SGD + weight decay; "split_si": scale-invariant, plain
    SGD): the gain ratio (‖Jδ_v‖/‖δ_v‖)/(‖Jδ_h‖/‖δ_h‖) and the fraction ‖δ_v‖/‖δ‖ per step."""
    out = {"ratio": {}, "fraction": {}}
    for prefix in ("split", "split_si"):
        h_gain = split[f"{prefix}_jvp_horizontal"] / split[f"{prefix}_horizontal_norm"]
        v_gain = split[f"{prefix}_jvp_vertical"] / split[f"{prefix}_vertical_norm"]
        out["ratio"][prefix] = v_gain / h_gain
        out["fraction"][prefix] = split[f"{prefix}_vertical_norm"] / split[f"{prefix}_step_norm"]
    return out


def _model_study(config, workdir: Path, model: str, setups) -> tuple[list, dict, dict]:
    under = setups.underdetermined

    # Underdetermined: GD at several η (interpolating minimum, conservation), SGD split.
    gd = _gd_runs(config, workdir, model, under)
    lr0 = max(gd)
    name0, cfg0 = gd[lr0]
    activation, k, unravel, _, sizes_u = _problem(cfg0)
    rows0 = _rows(workdir, name0)
    first, last = rows0[0], rows0[-1]
    last_arrays = _arrays(workdir, name0, last)
    orbit_min = common.cached(
        workdir,
        f"{model}_orbit_minimum",
        lambda: _orbit(
            config, cfg0, unravel(jnp.asarray(last_arrays["quotient_params"])), generalised=False
        ),
    )
    conservation = _conservation(workdir, gd, k)
    sgd_name = _sgd_run(config, workdir, model, under, lr0)
    split = common.columns(workdir, sgd_name)
    split_summary = _split_summary(split)

    # Regular: the quotient curvature along the orbit of the last regular point.
    reg_name, reg_cfg = _regular_run(config, workdir, model, setups.regular)
    reg_rows = _rows(workdir, reg_name)
    regular_rows = [r for r in reg_rows if r.get("quotient_regular") == 1]
    point_row = (regular_rows or reg_rows)[-1]
    reg_unravel, sizes_r = _problem(reg_cfg)[2], _problem(reg_cfg)[4]
    point = _arrays(workdir, reg_name, point_row)["quotient_params"]
    orbit_reg = common.cached(
        workdir,
        f"{model}_orbit_regular_step{point_row['step']}",
        lambda: _orbit(config, reg_cfg, reg_unravel(jnp.asarray(point)), generalised=True),
    )

    facts = {
        "model": model,
        "sizes_u": sizes_u,
        "sizes_r": sizes_r,
        "lr0": lr0,
        "last": last,
        "orbit_step": int(point_row["step"]),
        "orbit_min": orbit_min,
        "orbit_reg": orbit_reg,
        "conservation": conservation,
        "split_summary": split_summary,
        "time": lr0 * under.max_steps,
    }
    checks = _checks(config, facts)
    results = {
        "underdetermined": {
            **sizes_u,
            "activation": activation,
            "final_loss": {
                f"{lr:g}": _rows(workdir, n)[-1]["train_loss"] for lr, (n, _) in gd.items()
            },
            "gradient_norm_final": float(last["quotient_gradient_norm"]),
            "ambient_zeros": int(last["quotient_ambient_zeros"]),
            "reduced_zeros": int(last["quotient_reduced_zeros"]),
            "lambda_max_initial": float(first["quotient_lambda_max"]),
            "lambda_max_final": float(last["quotient_lambda_max"]),
            "orbit_ambient_ratio": orbit_min["ambient_ratio"],
            "orbit_reduced_ratio": orbit_min["reduced_ratio"],
            "drift_max": {
                f"{lr:g}": d
                for lr, d in zip(
                    conservation["learning_rates"], conservation["drift_max"], strict=True
                )
            },
            "drift_slope": conservation["slope"],
            "sgd_final_loss": float(split["train_loss"][-1]),
            "sgd_vertical_ratio_max": {
                p: float(np.nanmax(r)) for p, r in split_summary["ratio"].items()
            },
            "sgd_vertical_fraction_median": {
                p: float(np.nanmedian(f)) for p, f in split_summary["fraction"].items()
            },
            "sgd_second_order_vertical_change_median": float(
                np.nanmedian(split["split_change_vertical"] / split["split_change_horizontal"])
            ),
        },
        "regular": {
            **sizes_r,
            "orbit_step": int(point_row["step"]),
            "regular": orbit_reg["regular"],
            "train_loss": float(point_row["train_loss"]),
            "gradient_norm": orbit_reg["gradient_norm"],
            "jacobian_condition": orbit_reg["jacobian_condition"],
            "ambient_ratio": orbit_reg["ambient_ratio"],
            "reduced_ratio": orbit_reg["reduced_ratio"],
            "generalised_change": orbit_reg["generalised_change"],
            "generalised_euclidean_change": orbit_reg["generalised_euclidean_change"],
            "generalised_lambda_max": float(orbit_reg["reference_generalised"][0]),
        },
    }
    plot_data = {
        **facts,
        "init_spectra": tuple(_arrays(workdir, name0, first)[key] for key in _SPECTRA),
        "min_spectra": tuple(last_arrays[key] for key in _SPECTRA),
        "training": common.columns(workdir, name0),
        "split": split,
    }
    return checks, results, plot_data


def _checks(config, f: Mapping[str, Any]) -> list[common.Check]:
    """The claims of the paper, for one model (see the module docstring)."""
    model, su, sr = f["model"], f["sizes_u"], f["sizes_r"]
    orbit_reg, last, conservation = f["orbit_reg"], f["last"], f["conservation"]
    lo, hi = config.orbit_range
    where = f"regular setup (P={sr['P']}, n·K={sr['n'] * sr['K']}), step {f['orbit_step']}"
    regular = orbit_reg["regular"]
    checks = [
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
    zeros_amb, zeros_red = int(last["quotient_ambient_zeros"]), int(last["quotient_reduced_zeros"])
    interpolating = last["train_loss"] <= config.interpolation_loss
    checks.append(
        common.check_range(
            f"{model}: at the interpolating minimum the ambient Hessian has m = {su['m']} more "
            "near-zero eigenvalues than the reduced Hessian",
            zeros_amb - zeros_red,
            low=su["m"],
            high=su["m"],
            detail=f"GD η={f['lr0']:g}, final loss {last['train_loss']:.3g}"
            f"{'' if interpolating else ' (not interpolating)'}; |λ| ≤ "
            f"{config.zero_rtol:g}·λ_max: ambient {zeros_amb}, reduced {zeros_red} "
            f"(P − n·K = {su['P'] - su['n'] * su['K']})",
        )
    )
    ratio, fraction = f["split_summary"]["ratio"], f["split_summary"]["fraction"]
    checks.append(
        common.check_range(
            f"{model}: vertical motion does not change the predictor to first order "
            "(max (‖Jδ_v‖/‖δ_v‖)/(‖Jδ_h‖/‖δ_h‖) over SGD steps)",
            float(np.nanmax(np.concatenate([ratio["split"], ratio["split_si"]]))),
            high=config.vertical_ratio_max,
            detail="Euclidean split of SGD+weight-decay steps and scale-invariant split of the "
            "plain SGD steps",
        )
    )
    medians = {p: float(np.nanmedian(v)) for p, v in fraction.items()}
    checks.append(
        common.check_range(
            f"{model}: the split steps have a vertical part "
            "(median ‖δ_v‖/‖δ‖, the smaller of the two splits)",
            min(medians.values()),
            low=config.vertical_fraction_min,
            detail=f"Euclidean {medians['split']:.3g}, scale-invariant {medians['split_si']:.3g}",
        )
    )
    lrs, drifts = conservation["learning_rates"], conservation["drift_max"]
    smallest = min(lrs)
    checks.append(
        common.check_range(
            f"{model}: k‖a_i‖² − ‖w_i‖² − b_i² is conserved along GD "
            f"(max relative drift at η={smallest:g})",
            drifts[lrs.index(smallest)],
            high=config.drift_max,
            detail="relative to (1/m)Σ_i(k‖a_i‖² + ‖w_i‖² + b_i²) at step 0, over time "
            f"η·steps = {f['time']:g}",
        )
    )
    checks.append(
        common.check_range(
            f"{model}: the drift shrinks with η (log-log slope of the drift against η)",
            conservation["slope"],
            low=config.drift_slope[0],
            high=config.drift_slope[1],
            detail="drifts "
            + ", ".join(f"η={lr:g}: {d:.3g}" for lr, d in zip(lrs, drifts, strict=True)),
        )
    )
    return checks


def run(config: ml_collections.ConfigDict, workdir: Path):
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
            c, r, p = _model_study(config, workdir, model, config.models[model])
            checks += c
            results[model] = r
            plot_data[model] = p
        figures = [
            _spectra_figure(workdir, plot_data),
            _training_figure(workdir, plot_data),
            _orbit_figure(workdir, plot_data, config),
            _split_figure(workdir, plot_data),
            _conservation_figure(workdir, plot_data),
        ]
    return checks, results, figures


# ================================================================ figures


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
        ax.set(yscale="log", xlabel="step", title=f"{model}: GD η={p['lr0']:g} (underdetermined)")
        ax.legend(fontsize=7, frameon=False)
        ax = axes[1, j]
        ax.plot(t["step"], t["quotient_ambient_zeros"], label="H ambient")
        ax.plot(t["step"], t["quotient_reduced_zeros"], label="BᵀHB reduced")
        for value, label in (
            (s["P"] - s["n"] * s["K"], "P − n·K"),
            (s["P"] - s["m"] - s["n"] * s["K"], "P − m − n·K"),
        ):
            ax.axhline(value, ls=":", lw=1.0, color="gray")
            ax.annotate(label, (t["step"][-1], value), fontsize=7, ha="right", va="bottom")
        ax.set(
            xlabel="step",
            ylabel="near-zero eigenvalues",
            title=f"{model}: false-flat zero modes (m = {s['m']})",
        )
        ax.legend(fontsize=7, frameon=False)
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
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="rescaling c of every unit",
            ylabel="|λ_max|",
            title=f"{model}: orbit of the regular point (step {p['orbit_step']})",
        )
        ax.legend(fontsize=7, frameon=False)
        om = p["orbit_min"]
        ax = axes[1, j]
        for label in ("λ_max(H) ambient", "λ_max(BᵀHB) reduced"):
            key = "ambient_lambda_max" if "ambient" in label else "reduced_lambda_max"
            ax.plot(om["c"], om[key], marker="o", ms=3, label=label, **styles[label])
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="rescaling c of every unit",
            ylabel="λ_max",
            title=f"{model}: orbit of the interpolating minimum",
        )
        ax.legend(fontsize=7, frameon=False)
        ax = axes[2, j]
        ax.plot(om["c"], om["ambient_zeros"], marker="o", ms=3, label="H ambient")
        ax.plot(om["c"], om["reduced_zeros"], marker="o", ms=3, label="BᵀHB reduced")
        ax.set(
            xscale="log",
            xlabel="rescaling c of every unit",
            ylabel=f"#|λ| ≤ {config.zero_rtol:g}·λ_max(H)",
            title=f"{model}: near-zero eigenvalues along that orbit",
        )
        ax.legend(fontsize=7, frameon=False)
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
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="step",
            ylabel="predictor change (RMS)",
            title=f"{model}: predictor change of the parts of SGD steps",
        )
        ax.legend(fontsize=6, frameon=False)
    return _save(workdir, "split", fig)


def _conservation_figure(workdir, plot_data) -> str:
    fig, axes = _grid(2, len(plot_data))
    for j, (model, p) in enumerate(plot_data.items()):
        c = p["conservation"]
        ax = axes[0, j]
        for lr, (t, drift) in sorted(c["curves"].items()):
            ok = t > 0
            ax.plot(t[ok], np.maximum(drift[ok], np.finfo(float).tiny), label=f"η={lr:g}")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="time η·step",
            ylabel="max_i |Q_i(t) − Q_i(0)| / scale",
            title=f"{model}: drift of k‖a_i‖² − ‖w_i‖² − b_i² along GD",
        )
        ax.legend(fontsize=7, frameon=False)
        ax = axes[1, j]
        lrs, drift = np.array(c["learning_rates"]), np.array(c["drift_max"])
        ax.plot(lrs, drift, marker="o", label=f"measured (slope {c['slope']:.2f})")
        ax.plot(lrs, drift[-1] * lrs / lrs[-1], ls="--", color="gray", label="∝ η")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="η",
            ylabel="max drift over the run",
            title=f"{model}: drift against the step size",
        )
        ax.legend(fontsize=7, frameon=False)
    return _save(workdir, "conserved", fig)
