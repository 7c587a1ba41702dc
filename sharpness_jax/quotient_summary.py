"""The quotient geometry of a shallow network at one point θ, in one compiled program.

:func:`point_summary` gathers what the quotient-geometry study (Dong & Cheng 2026) records at a
point (the ``quotient_geometry`` measurement and the study's orbit analyses): the dense
spectra of the ambient Hessian H = ∇²L and of the reduced Hessian BᵀHB (B an orthonormal
basis of the Euclidean horizontal space), optionally the generalised spectrum of
(BᵀHB, BᵀGB) with G = JᵀJ/n, the regularity of the realisation map, the conserved quantities,
and optionally the split of a step δ into horizontal and vertical parts with what each part
does to the predictor (:func:`sharpness_jax.quotient.decompose_update`). The geometry itself is
:mod:`sharpness_jax.quotient`.

Around it, what the study derives from those summaries: :func:`orbit_summary` (the summaries
along the rescaling orbit of θ, with :func:`orbit_scales` the orbit's factors and
:func:`relative_change` the change of a spectrum along it), :func:`conserved_scale` and
:func:`relative_drift` (the drift of the conserved quantities), :func:`log_slope` (its
power law in η) and :func:`split_ratios` (the gain ratio and vertical fraction of split
steps).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sharpness_jax import operators, quotient, quotient_spectra, symmetries
from sharpness_jax.objective import Batch, Objective, get_loss
from sharpness_jax.shallow import HOMOGENEITY

PyTree = Any

__all__ = [
    "conserved_scale",
    "log_slope",
    "orbit_scales",
    "orbit_summary",
    "point_summary",
    "relative_change",
    "relative_drift",
    "shallow_activation",
    "split_ratios",
]


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


def _rms(outputs: jax.Array) -> jax.Array:
    """(1/n Σ_p ‖o_p‖²)^{1/2} of per-example outputs (n, K)."""
    return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(outputs), axis=-1)))


def _tree_norm(tree) -> jax.Array:
    return jnp.linalg.norm(ravel_pytree(tree)[0])


@functools.partial(jax.jit, static_argnames=("activation", "loss_name", "generalised", "split"))
def point_summary(
    params: PyTree,
    batch: Batch,
    update: PyTree,
    gradient: PyTree,
    learning_rate: jax.Array,
    zero_rtol: jax.Array,
    *,
    activation: str,
    loss_name: str,
    generalised: bool,
    split: bool,
) -> dict[str, jax.Array]:
    """Everything the quotient-geometry study records at one point θ (jitted).

    H = ∇²L with L the MEAN loss over ``batch``; near-zero eigenvalues are counted with the
    same threshold zero_rtol · max|λ(H)| for the ambient and the reduced spectrum. With
    ``split``, the step δ = ``update`` (the update training applies next, e.g.
    −η(∇L_B(θ) + λθ) for SGD with weight decay) is split with the Euclidean metric
    (``split_*``), and the plain gradient step −η∇L_B(θ) (``gradient`` = ∇L_B(θ), η =
    ``learning_rate``) with the ``scale_invariant`` metric (``split_si_*``). Predictor changes
    are RMS over ``batch``'s inputs.

    Args:
      params: θ of a shallow network (``quotient``'s layout).
      batch: the examples.
      update: the step δ (params' structure; unused without ``split``).
      gradient: ∇L_B(θ) of the step's mini-batch (unused without ``split``).
      learning_rate: η of the plain gradient step.
      zero_rtol: the relative threshold of a near-zero eigenvalue.
      activation: the hidden activation (see :func:`shallow_activation`).
      loss_name: the loss (``objective.LOSSES``), without label smoothing.
      generalised: also the generalised spectra (regular points only).
      split: also the splits of the step.

    Returns:
      ``{name: array}``: scalars (``quotient_*``, ``split_*``, ``split_si_*``) and the arrays
      ``quotient_params``, ``quotient_conserved``, ``quotient_ambient``,
      ``quotient_reduced`` (and ``quotient_generalised*``), descending spectra.
    """
    objective = quotient_spectra.shallow_objective(get_loss(loss_name), activation=activation)
    out, euclidean = _spectra(objective, params, batch, zero_rtol, activation=activation)
    if generalised:
        out.update(_generalised(objective, params, batch, euclidean, activation=activation))
    if split:
        plain = jax.tree.map(lambda g: -learning_rate * g, gradient)
        for prefix, delta, metric in (
            ("split", update, "euclidean"),
            ("split_si", plain, "scale_invariant"),
        ):
            out.update(_split(params, delta, batch.inputs, prefix, activation, metric))
    return out


def _spectra(
    objective: Objective, params: PyTree, batch: Batch, zero_rtol, *, activation: str
) -> tuple[dict[str, jax.Array], quotient_spectra.QuotientSpectra]:
    """Ambient and reduced (Euclidean W) spectra, regularity and conserved quantities; and
    the Euclidean-W spectra themselves."""
    grad = operators.gradient(objective, params, batch)
    eu = quotient_spectra.quotient_spectra(
        objective, params, batch, activation=activation, metric="euclidean"
    )
    tol = zero_rtol * jnp.max(jnp.abs(eu.ambient))
    reg = quotient_spectra.regularity(params, batch.inputs, activation=activation)
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
    return out, eu


def _generalised(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    euclidean: quotient_spectra.QuotientSpectra,
    *,
    activation: str,
) -> dict[str, jax.Array]:
    """The generalised spectra of (BᵀHB, BᵀGB): scale-invariant W and Euclidean W."""
    si = quotient_spectra.quotient_spectra(
        objective, params, batch, activation=activation, metric="scale_invariant"
    )
    return {
        "quotient_generalised": si.generalised,
        "quotient_generalised_lambda_max": si.generalised[0],
        "quotient_generalised_euclidean": euclidean.generalised,
        "quotient_generalised_euclidean_lambda_max": euclidean.generalised[0],
    }


def _split(
    params: PyTree, delta: PyTree, inputs: jax.Array, prefix: str, activation: str, metric: str
) -> dict[str, jax.Array]:
    """Norms of δ and its parts, and RMS first-order and exact predictor changes."""
    parts = quotient.decompose_update(params, delta, inputs, activation=activation, metric=metric)
    return {
        f"{prefix}_step_norm": _tree_norm(delta),
        f"{prefix}_horizontal_norm": _tree_norm(parts.horizontal),
        f"{prefix}_vertical_norm": _tree_norm(parts.vertical),
        f"{prefix}_jvp_horizontal": _rms(parts.first_order_horizontal),
        f"{prefix}_jvp_vertical": _rms(parts.first_order_vertical),
        f"{prefix}_change_horizontal": _rms(parts.change_horizontal),
        f"{prefix}_change_vertical": _rms(parts.change_vertical),
        f"{prefix}_change_total": _rms(parts.change_total),
    }


# ================================================================ along an orbit, over a run


def relative_change(values: np.ndarray, reference: np.ndarray) -> float:
    """max_j |λ_j − λ_j^ref| / max_j |λ_j^ref| for two spectra sorted the same way.

    Raises:
      ValueError: for spectra of different sizes.
    """
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if values.shape != reference.shape:
        raise ValueError(f"spectra of different sizes: {values.shape} vs {reference.shape}")
    return float(np.max(np.abs(values - reference)) / np.max(np.abs(reference)))


def relative_drift(conserved: np.ndarray, scale: float) -> np.ndarray:
    """max_i |Q_i(t) − Q_i(0)| / scale for each row t of ``conserved`` (shape (T, m))."""
    conserved = np.asarray(conserved, float)
    return np.max(np.abs(conserved - conserved[:1]), axis=1) / scale


def conserved_scale(params: PyTree, k: int) -> float:
    """(1/m) Σ_i (k‖a_i‖² + ‖w_i‖² + b_i²): the size of the terms of Q_i = k‖a_i‖² − ‖w_i‖² − b_i²
    (k the activation's degree of homogeneity), the scale of :func:`relative_drift`."""
    total = k * jnp.sum(jnp.square(params["a"])) + jnp.sum(jnp.square(params["w"]))
    if "b" in params:
        total = total + jnp.sum(jnp.square(params["b"]))
    return float(total) / params["w"].shape[0]


def log_slope(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares slope of log y against log x (NaN for fewer than two positive pairs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def split_ratios(split: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per split ("split": Euclidean; "split_si": scale-invariant, of :func:`point_summary`'s
    columns over steps): the gain ratio (‖Jδ_v‖/‖δ_v‖)/(‖Jδ_h‖/‖δ_h‖) (``"ratio"``) and the
    fraction ‖δ_v‖/‖δ‖ (``"fraction"``) per step."""
    out = {"ratio": {}, "fraction": {}}
    for prefix in ("split", "split_si"):
        h_gain = split[f"{prefix}_jvp_horizontal"] / split[f"{prefix}_horizontal_norm"]
        v_gain = split[f"{prefix}_jvp_vertical"] / split[f"{prefix}_vertical_norm"]
        out["ratio"][prefix] = v_gain / h_gain
        out["fraction"][prefix] = split[f"{prefix}_vertical_norm"] / split[f"{prefix}_step_norm"]
    return out


def orbit_scales(
    low: float, high: float, points: int, random: int, m: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uniform factors c on a log grid over [low, high], (random, m) per-unit factors drawn
    log-uniformly on the same range).

    Raises:
      ValueError: unless 0 < low < 1 < high.
    """
    if not 0 < low < 1 < high:
        raise ValueError(f"the orbit range must satisfy 0 < low < 1 < high, got {(low, high)}")
    grid = np.geomspace(low, high, points)
    rng = np.random.default_rng(seed)
    per_unit = np.exp(rng.uniform(np.log(low), np.log(high), size=(random, m)))
    return grid, per_unit


def _summary_at(params, batch, zero_rtol, *, activation, loss_name, generalised):
    """:func:`point_summary` at θ without a step, placed like the ``quotient_geometry``
    measurement's arguments, so that the measurement's compiled program of the same setup is
    reused (underdetermined runs: ``split``; regular runs: ``generalised``)."""
    dtype = jax.tree.leaves(params)[0].dtype
    device = next(iter(jnp.zeros(()).devices()))
    # Committed params, data and step, uncommitted scalars; no step is split here.
    params, batch = jax.device_put((params, batch), device)
    zeros = jax.device_put(jax.tree.map(jnp.zeros_like, params), device)
    out = point_summary(
        params,
        batch,
        zeros,
        zeros,
        jnp.zeros((), dtype),
        jnp.asarray(zero_rtol, dtype),
        activation=activation,
        loss_name=loss_name,
        generalised=generalised,
        split=not generalised,
    )
    return {k: np.asarray(v) for k, v in out.items()}


def orbit_summary(
    params: PyTree,
    batch: Batch,
    zero_rtol: float,
    *,
    grid: np.ndarray,
    per_unit: np.ndarray,
    activation: str,
    loss_name: str,
    generalised: bool,
) -> dict[str, Any]:
    """The spectra along the rescaling orbit of θ (``symmetries.rescale_units``): every unit
    rescaled by each c of ``grid``, then by each row of per-unit factors ``per_unit``.

    Args:
      params: θ of a shallow network.
      batch: the examples of L (a mean).
      zero_rtol: the relative threshold of a near-zero eigenvalue.
      grid: (C,) uniform factors c.
      per_unit: (R, m) per-unit factors.
      activation: the hidden activation.
      loss_name: the loss.
      generalised: also the generalised spectra (θ regular).

    Returns:
      ``c`` (= ``grid``), over the grid: ``ambient_lambda_max``, ``reduced_lambda_max``,
      ``ambient_zeros``, ``reduced_zeros``; λ_max(H) at every point of the orbit
      (``ambient_lambda_max_all``); at θ: ``reference_ambient``, ``reference_reduced``,
      ``regular``, ``jacobian_condition``, ``gradient_norm``; the ratios max/min of λ_max(H)
      over the orbit (``ambient_ratio``) and of λ_max(BᵀHB) over the grid
      (``reduced_ratio``); with ``generalised``, also ``reference_generalised``, the quotient
      λ_max over the grid for the scale-invariant and the Euclidean W
      (``generalised_lambda_max``, ``generalised_euclidean_lambda_max``), and the relative
      changes of the generalised spectrum (:func:`relative_change`) at every point
      (``generalised_changes``) and their maxima (``generalised_change``,
      ``generalised_euclidean_change``).
    """
    kw = {"activation": activation, "loss_name": loss_name, "generalised": generalised}
    ref = _summary_at(params, batch, zero_rtol, **kw)
    rescale = jax.jit(symmetries.rescale_units, static_argnames="activation")
    m = per_unit.shape[1]

    def at(scales):
        moved = rescale(params, jnp.asarray(scales), activation=activation)
        return _summary_at(moved, batch, zero_rtol, **kw)

    points = [at(np.full(m, c)) for c in grid] + [at(s) for s in per_unit]
    on_grid = points[: grid.size]

    def column(key, among=on_grid):
        return np.array([p[key] for p in among])

    out = {
        "c": grid,
        "ambient_lambda_max": column("quotient_lambda_max"),
        "reduced_lambda_max": column("quotient_reduced_lambda_max"),
        "ambient_zeros": column("quotient_ambient_zeros"),
        "reduced_zeros": column("quotient_reduced_zeros"),
        "ambient_lambda_max_all": column("quotient_lambda_max", points),
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
        out.update(_orbit_generalised(ref, points, on_grid))
    return out


def _orbit_generalised(ref, points, on_grid) -> dict[str, Any]:
    """The generalised spectra along an orbit: λ_max over the grid and the relative changes
    from the reference ``ref`` at every point (scale-invariant W; Euclidean W)."""
    gen, gen_eu = ref["quotient_generalised"], ref["quotient_generalised_euclidean"]
    changes = [relative_change(p["quotient_generalised"], gen) for p in points]
    eu_changes = [relative_change(p["quotient_generalised_euclidean"], gen_eu) for p in points]
    key, eu_key = "quotient_generalised_lambda_max", "quotient_generalised_euclidean_lambda_max"
    return {
        "reference_generalised": gen,
        "generalised_lambda_max": np.array([p[key] for p in on_grid]),
        "generalised_euclidean_lambda_max": np.array([p[eu_key] for p in on_grid]),
        "generalised_changes": np.array(changes),
        "generalised_change": float(np.max(changes)),
        "generalised_euclidean_change": float(np.max(eu_changes)),
    }
