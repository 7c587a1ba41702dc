"""The quotient geometry of a shallow network at one point θ, in one compiled program.

:func:`point_summary` gathers what the quotient-geometry study (Dong & Cheng 2026) records at a
point (the ``quotient_geometry`` measurement and the study's orbit analyses): the dense
spectra of the ambient Hessian H = ∇²L and of the reduced Hessian BᵀHB (B an orthonormal
basis of the Euclidean horizontal space), optionally the generalised spectrum of
(BᵀHB, BᵀGB) with G = JᵀJ/n, the regularity of the realisation map, the conserved quantities,
and optionally the split of a step δ into horizontal and vertical parts with what each part
does to the predictor (:func:`sharpness_jax.quotient.decompose_update`). The geometry itself is
:mod:`sharpness_jax.quotient`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import operators, quotient, quotient_spectra
from sharpness_jax.objective import Batch, Objective, get_loss
from sharpness_jax.shallow import HOMOGENEITY

PyTree = Any

__all__ = ["point_summary", "shallow_activation"]


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
