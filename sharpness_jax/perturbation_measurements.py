"""Built-in measurements of the perturbation, preconditioned and inverse-curvature measures
(the second half of
:mod:`sharpness_jax.builtin_measurements`, listed in the same table of
:mod:`sharpness_jax.measurements`).

Each is ``fn(ctx: MeasureContext) -> {key: value}`` with an option check
``(options, info) -> None``; the math is in :mod:`sharpness_jax.worst_case`,
:mod:`sharpness_jax.preconditioned`, :mod:`sharpness_jax.landscape` and
:mod:`sharpness_jax.inverse`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from sharpness_jax import inverse, landscape, operators, preconditioned, subsets, worst_case
from sharpness_jax.checks import is_int as _is_int
from sharpness_jax.checks import is_number as _is_number
from sharpness_jax.checks import require as _require
from sharpness_jax.inverse_preconditioners import PRECONDITIONERS

if TYPE_CHECKING:
    from sharpness_jax.measurements import MeasureContext, RunInfo

__all__ = [
    "check_average_sharpness",
    "check_full_riemannian_sharpness",
    "check_lambda_max_gradient",
    "check_loss_slice",
    "check_m_sharpness",
    "check_natural_gradient",
    "check_preconditioned_sharpness",
    "check_relative_flatness",
    "check_takeuchi_information_criterion",
    "check_worst_case_sharpness",
    "measure_average_sharpness",
    "measure_full_riemannian_sharpness",
    "measure_lambda_max_gradient",
    "measure_loss_slice",
    "measure_m_sharpness",
    "measure_natural_gradient",
    "measure_preconditioned_sharpness",
    "measure_relative_flatness",
    "measure_takeuchi_information_criterion",
    "measure_worst_case_sharpness",
]


def _positive(name: str, key: str, value: Any) -> None:
    _require(
        _is_number(value) and value > 0, f"{name}: {key} must be a positive number, got {value!r}"
    )


def _count(name: str, key: str, value: Any, low: int) -> None:
    _require(
        _is_int(value) and value >= low, f"{name}: {key} must be an int >= {low}, got {value!r}"
    )


def check_preconditioned_sharpness(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _count("preconditioned_sharpness", "num_iters", options["num_iters"], 1)


def measure_preconditioned_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """λ_max(P⁻¹H) with P = diag(√ν̂ + ε) of the run's Adam state, and the adaptive stability
    threshold (2 + 2β₁)/((1 − β₁)η) of the run's optimiser (Cohen et al. 2022)."""
    opt = ctx.config.optimizer
    if opt.name != "adam":
        raise ValueError(
            "preconditioned_sharpness needs optimizer.name='adam' (it reads Adam's second-moment "
            f"estimate), got {opt.name!r}"
        )

    def top(objective, params, batch, opt_state):
        diag = preconditioned.adam_preconditioner(opt_state, b2=opt.b2, eps=opt.eps)
        eig = preconditioned.preconditioned_lambda_max(
            objective,
            params,
            batch,
            diag,
            num_iters=ctx.options["num_iters"],
            tol=ctx.options["tol"],
            chunk_size=ctx.chunk_size,
        )
        return eig.values[0], eig.num_matvecs

    value, matvecs = ctx.jit(top)(ctx.objective, ctx.params, ctx.batch, ctx.opt_state)
    threshold = preconditioned.adaptive_stability_threshold(opt.learning_rate, opt.b1)
    return {
        "preconditioned_sharpness": value,
        "preconditioned_sharpness_num_matvecs": matvecs,
        "adaptive_stability_threshold": threshold,
    }


def _ascent(options: Mapping[str, Any]) -> dict[str, Any]:
    """The projected-ascent options shared by worst-case and m-sharpness."""
    return {k: options[k] for k in ("rho", "num_steps", "adaptive", "xi")}


def check_worst_case_sharpness(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _positive("worst_case_sharpness", "rho", options["rho"])
    _count("worst_case_sharpness", "num_steps", options["num_steps"], 0)


def measure_worst_case_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """max_{‖ε ⊘ c‖ ≤ ρ} L(θ + ε) − L(θ) (``adaptive``: c = |θ| + ξ) by projected ascent."""
    o = ctx.options

    def sharp(objective, params, batch):
        result = worst_case.worst_case_sharpness(
            objective, params, batch, **_ascent(o), chunk_size=ctx.chunk_size
        )
        return result.sharpness, result.perturbation_norm

    value, norm = ctx.jit(sharp)(ctx.objective, ctx.params, ctx.batch)
    return {"worst_case_sharpness": value, "worst_case_perturbation_norm": norm}


def check_m_sharpness(options: Mapping[str, Any], info: RunInfo) -> None:
    _positive("m_sharpness", "rho", options["rho"])
    _count("m_sharpness", "num_steps", options["num_steps"], 0)
    m = options["m"]
    _count("m_sharpness", "m", m, 1)
    _require(
        info.num_measure % m == 0,
        f"m_sharpness: m={m} must divide the measurement batch of {info.num_measure} examples",
    )


def measure_m_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """m-sharpness (Foret et al. 2021; Andriushchenko et al. 2023): the worst-case sharpness
    of each of the disjoint batches of ``m`` consecutive measurement examples, averaged."""
    o = ctx.options

    def sharp(objective, params, batch):
        return worst_case.m_sharpness(objective, params, batch, m=o["m"], **_ascent(o))

    return {"m_sharpness": ctx.jit(sharp)(ctx.objective, ctx.params, ctx.batch)}


def _last_kernel(params: Any) -> str:
    """The path of the last 2-D leaf named ``kernel`` (the output layer of a flax network)."""
    leaves = jax.tree_util.tree_leaves(params)
    kernels = [
        path
        for path, leaf in zip(subsets.leaf_paths(params), leaves, strict=True)
        if path.endswith("kernel") and leaf.ndim == 2
    ]
    if not kernels:
        raise ValueError("relative_flatness: the model has no 2-D kernel; set option 'kernel'")
    return kernels[-1]


def check_relative_flatness(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    kernel = options["kernel"]
    _require(
        kernel is None or isinstance(kernel, str),
        f"relative_flatness: kernel must be a parameter path or None, got {kernel!r}",
    )
    _positive("relative_flatness", "max_bytes", options["max_bytes"])


def measure_relative_flatness(ctx: MeasureContext) -> dict[str, Any]:
    """Petzka et al. (2021) relative flatness of one layer (default: the last 2-D kernel),
    exactly from its dense Hessian block."""
    o = ctx.options
    kernel = o["kernel"] or _last_kernel(ctx.params)

    def flatness(objective, params, batch):
        return worst_case.relative_flatness(
            objective,
            params,
            batch,
            kernel=kernel,
            chunk_size=ctx.chunk_size,
            max_bytes=o["max_bytes"],
        )

    return {"relative_flatness": ctx.jit(flatness)(ctx.objective, ctx.params, ctx.batch)}


def check_lambda_max_gradient(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _count("lambda_max_gradient", "num_iters", options["num_iters"], 2)
    tol = options["tol"]
    _require(tol is None or (_is_number(tol) and tol > 0), "lambda_max_gradient: tol must be > 0")


def measure_lambda_max_gradient(ctx: MeasureContext) -> dict[str, Any]:
    """‖∇_θ λ_max‖ and its cosine with the loss gradient ḡ (self-stabilisation, Damian et al.
    2023: at the edge of stability the step along −ḡ moves λ_max by −η ḡᵀ∇λ_max)."""
    o = ctx.options

    def terms(objective, params, batch):
        res = preconditioned.lambda_max_gradient(
            objective,
            params,
            batch,
            num_iters=o["num_iters"],
            tol=o["tol"],
            chunk_size=ctx.chunk_size,
        )
        g = operators.gradient(objective, params, batch, chunk_size=ctx.chunk_size)
        norm, g_norm = optax.tree.norm(res.gradient), optax.tree.norm(g)
        cosine = optax.tree.vdot(res.gradient, g) / (norm * g_norm)
        return res.value, norm, jnp.where(norm * g_norm > 0, cosine, jnp.nan)

    value, norm, cosine = ctx.jit(terms)(ctx.objective, ctx.params, ctx.batch)
    return {
        "lambda_max_gradient_value": value,
        "lambda_max_gradient_norm": norm,
        "lambda_max_gradient_cosine": cosine,
    }


def check_average_sharpness(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _positive("average_sharpness", "sigma", options["sigma"])
    _count("average_sharpness", "num_samples", options["num_samples"], 2)


def measure_average_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """E_ε[L(θ + ε)] − L(θ), ε ∼ N(0, σ² diag c²), Monte Carlo with its standard error."""
    o = ctx.options

    def average(objective, params, batch, key):
        est = worst_case.average_sharpness(
            objective,
            params,
            batch,
            sigma=o["sigma"],
            key=key,
            num_samples=o["num_samples"],
            adaptive=o["adaptive"],
            chunk_size=ctx.chunk_size,
        )
        return est.value, est.stderr

    value, stderr = ctx.jit(average)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    return {"average_sharpness": value, "average_sharpness_stderr": stderr}


def check_loss_slice(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _positive("loss_slice", "radius", options["radius"])
    _count("loss_slice", "num_points", options["num_points"], 2)


def measure_loss_slice(ctx: MeasureContext) -> dict[str, Any]:
    """L(θ + αu) for α on ``num_points`` points of [−radius, radius] along a filter-normalised
    direction u (Li et al. 2018) drawn with the step's key; saved as arrays beside the
    metrics (``loss_slice_alphas``, ``loss_slice_values``)."""
    o = ctx.options
    alphas = jnp.linspace(-o["radius"], o["radius"], o["num_points"])

    def line(objective, params, batch, key, alphas):
        u = landscape.filter_normalised_direction(params, key)
        return landscape.slice_1d(
            objective, params, batch, u, alphas, chunk_size=ctx.chunk_size
        ).values

    values = ctx.jit(line)(
        ctx.objective, ctx.params, ctx.batch, ctx.key, alphas.astype(_dtype(ctx.params))
    )
    return {"loss_slice_alphas": alphas, "loss_slice_values": values}


def _check_solves(name: str, options: Mapping[str, Any], probes: bool = True) -> None:
    _positive(name, "damping", options["damping"])
    _positive(name, "tol", options["tol"])
    if probes:
        _count(name, "num_probes", options["num_probes"], 2)
    max_iters = options["max_iters"]
    _require(
        max_iters is None or (_is_int(max_iters) and max_iters >= 1),
        f"{name}: max_iters must be None or an int >= 1, got {max_iters!r}",
    )


def check_takeuchi_information_criterion(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _check_solves("takeuchi_information_criterion", options)
    _require(
        options["method"] in inverse.SOLVE_METHODS,
        f"takeuchi_information_criterion: method must be one of {inverse.SOLVE_METHODS}, got "
        f"{options['method']!r}",
    )
    _count("takeuchi_information_criterion", "restart", options["restart"], 1)


def measure_takeuchi_information_criterion(ctx: MeasureContext) -> dict[str, Any]:
    """tr((H + λI)⁻¹ C) with its standard error: Hutchinson, one solve per probe (GMRES by
    default: H + λI is indefinite away from a minimum; a larger ``restart`` helps when it is
    nearly singular), :func:`sharpness_jax.inverse.takeuchi_information_criterion`. NaN
    when a solve did not converge."""
    o = ctx.options

    def tic(objective, params, batch, key):
        est = inverse.takeuchi_information_criterion(
            objective,
            params,
            batch,
            damping=o["damping"],
            key=key,
            num_probes=o["num_probes"],
            method=o["method"],
            tol=o["tol"],
            max_iters=o["max_iters"],
            restart=o["restart"],
            chunk_size=ctx.chunk_size,
        )
        return est.value, est.stderr

    value, stderr = ctx.jit(tic)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    return {
        "takeuchi_information_criterion": value,
        "takeuchi_information_criterion_stderr": stderr,
    }


def check_natural_gradient(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _check_solves("natural_gradient", options, probes=False)
    for key, allowed in (
        ("fisher", tuple(inverse.FISHER_KINDS)),
        ("method", inverse.SOLVE_METHODS),
        ("preconditioner", (None, *PRECONDITIONERS)),
    ):
        _require(
            options[key] in allowed,
            f"natural_gradient: {key} must be one of {allowed}, got {options[key]!r}",
        )


def measure_natural_gradient(ctx: MeasureContext) -> dict[str, Any]:
    """The natural-gradient direction x = (F + λI)⁻¹ ḡ (:func:`sharpness_jax.inverse.
    natural_gradient`; F the true or the empirical Fisher, option ``fisher``) and
    ``natural_gradient_norm`` ‖x‖, ``natural_gradient_inner`` ḡᵀx = ḡᵀ(F + λI)⁻¹ḡ,
    ``natural_gradient_cosine`` ḡᵀx / (‖ḡ‖ ‖x‖) (NaN at ḡ = 0), the solver's
    ``natural_gradient_num_iters``, ``natural_gradient_residual_norm``
    ‖ḡ − (F + λI)x‖ and ``natural_gradient_converged``."""
    o = ctx.options

    def direction(objective, params, batch):
        g = operators.gradient(objective, params, batch, chunk_size=ctx.chunk_size)
        sol = inverse.natural_gradient(
            objective,
            params,
            batch,
            damping=o["damping"],
            fisher=o["fisher"],
            method=o["method"],
            tol=o["tol"],
            max_iters=o["max_iters"],
            preconditioner=o["preconditioner"],
            chunk_size=ctx.chunk_size,
        )
        norm, inner = optax.tree.norm(sol.x), optax.tree.vdot(g, sol.x)
        denom = norm * optax.tree.norm(g)
        cosine = jnp.where(denom > 0, inner / jnp.where(denom > 0, denom, 1), jnp.nan)
        return norm, inner, cosine, sol.num_iters, sol.residual_norm, sol.converged

    values = ctx.jit(direction)(ctx.objective, ctx.params, ctx.batch)
    keys = ("norm", "inner", "cosine", "num_iters", "residual_norm", "converged")
    return {f"natural_gradient_{key}": value for key, value in zip(keys, values, strict=True)}


def check_full_riemannian_sharpness(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _check_solves("full_riemannian_sharpness", options)
    _count("full_riemannian_sharpness", "num_iters", options["num_iters"], 1)


def measure_full_riemannian_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """Full-network Riemannian sharpness in the damped true Fisher metric F + λI, matrix-free:
    tr((F + λI)⁻¹ H) ± SE (Hutchinson with CG solves) and λ_max((F + λI)⁻¹ H) (Lanczos in the
    (F + λI)-inner product), :func:`sharpness_jax.inverse.riemannian_trace_full` and
    :func:`sharpness_jax.inverse.riemannian_lambda_max`."""
    o = ctx.options

    def full(objective, params, batch, key):
        k_trace, k_top = jax.random.split(key)
        common = dict(damping=o["damping"], tol=o["tol"], max_iters=o["max_iters"])
        est = inverse.riemannian_trace_full(
            objective,
            params,
            batch,
            key=k_trace,
            num_probes=o["num_probes"],
            chunk_size=ctx.chunk_size,
            **common,
        )
        top = inverse.riemannian_lambda_max(
            objective,
            params,
            batch,
            key=k_top,
            num_iters=o["num_iters"],
            chunk_size=ctx.chunk_size,
            **common,
        )
        return est.value, est.stderr, top.values[0]

    value, stderr, top = ctx.jit(full)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    return {
        "riemannian_trace_full": value,
        "riemannian_trace_full_stderr": stderr,
        "riemannian_lambda_max_full": top,
    }


def _dtype(params):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))
