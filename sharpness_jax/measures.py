"""The studies' measurements, registered for the training loop's measurement schedule.

Importing :mod:`sharpness_jax` registers these beside the core ones of
:mod:`sharpness_jax.training` (loss, accuracy, lambda_max, trace_hessian,
trace_gradient_covariance, gradient_norm). Each runs on the run's measurement batch (a fixed
subset of at most ``measure_subset`` training examples) unless it says otherwise.

======================== ==========================================================================
name                     row keys and quantity
======================== ==========================================================================
batch_sharpness          ``batch_sharpness`` (± ``_stderr``, ``_draws``): E_B[g_Bᵀ H_B g_B/‖g_B‖²],
                         batches of the training batch size drawn like the training sampler,
                         whole partitions of the data when 10 fit in ``max_draws`` (option
                         ``sampling``, see ``sharpness``)
batch_lambda_max         ``batch_lambda_max`` (± ``_stderr``, ``_draws``): E_B[λ_max(H_B)],
                         independent batches by default
gni                      ``gni`` (± ``gni_stderr`` for Hutchinson): E_B[g_Bᵀ H g_B]/‖ḡ‖²
                         = (ḡᵀHḡ + κ·tr(HC))/‖ḡ‖², κ = 1/b (with replacement) or
                         (n−b)/(b(n−1)) (without)
gradient_rayleigh        ``gradient_rayleigh``: ḡᵀHḡ/‖ḡ‖², batch sharpness of the full batch
jacobian_norms           ``jacobian_frobenius_mean/max``, ``jacobian_spectral_mean/max``:
                         ‖∂f(x_p)/∂x‖ over the measurement batch (logits or softmax outputs)
riemannian_sharpness     ``riemannian_sharpness`` (± ``_stderr``), ``riemannian_damping``,
                         ``riemannian_excluded``: Σ_i H_ii/(F_ii + ε), F the diagonal empirical
                         Fisher (exact diagonal for small P, Hutchinson otherwise)
======================== ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import optax

from sharpness_jax import (
    batch_moments,
    fisher_geometry,
    jacobian,
    linalg,
    minibatch,
    operators,
    sharpness,
)
from sharpness_jax.training import MeasureContext, RunInfo, register_measurement

__all__: list[str] = []


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _batch_options(ctx: MeasureContext) -> tuple[int, bool]:
    """The batch size and sampling of the run, unless the options override them."""
    b = ctx.options["batch_size"] or ctx.info.batch_size
    replace = ctx.options["replace"]
    if replace is None:
        replace = bool(ctx.config.replace)
    return min(int(b), ctx.info.num_measure), replace


def _check_batch_options(name: str, options: Mapping[str, Any], info: RunInfo) -> None:
    b = options["batch_size"]
    _require(
        b is None or (isinstance(b, int) and 1 <= b <= info.num_measure),
        f"{name}: batch_size must be None (the training batch size) or an int in "
        f"[1, {info.num_measure}] (the measurement batch), got {b!r}",
    )
    _require(
        options["replace"] in (None, True, False),
        f"{name}: replace must be None (as in training), True or False",
    )
    _require(
        0 < options["rel_stderr"] < 1 and 1 <= options["min_draws"] <= options["max_draws"],
        f"{name}: need 0 < rel_stderr < 1 and 1 <= min_draws <= max_draws",
    )
    _require(
        options["sampling"] in ("auto", "partition", "independent"),
        f"{name}: sampling must be 'auto', 'partition' or 'independent', "
        f"got {options['sampling']!r}",
    )


_MC_DEFAULTS = {
    "batch_size": None,
    "replace": None,
    "sampling": "auto",
    "rel_stderr": 0.01,
    "min_draws": 20,
    "max_draws": 500,
}


def _batch_monte_carlo(
    ctx: MeasureContext, name: str, estimator: Callable, option_names: tuple[str, ...]
) -> dict[str, Any]:
    """Runs a keyed Monte-Carlo estimator over training-like batches; value, SE and draws."""
    b, replace = _batch_options(ctx)
    names = ("sampling", "rel_stderr", "min_draws", "max_draws", *option_names)
    opts = {k: ctx.options[k] for k in names}

    def estimate(params, batch, key):
        return estimator(
            ctx.objective,
            params,
            batch,
            batch_size=b,
            key=key,
            replace=replace,
            chunk_size=ctx.chunk_size,
            **opts,
        )

    est = ctx.jit(estimate)(ctx.params, ctx.batch, ctx.key)
    return {name: est.value, f"{name}_stderr": est.stderr, f"{name}_draws": est.num_draws}


@register_measurement(
    "batch_sharpness",
    defaults={**_MC_DEFAULTS, "draws_per_step": 10},
    check=lambda o, i: _check_batch_options("batch_sharpness", o, i),
)
def _batch_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """E_B[g_Bᵀ H_B g_B / ‖g_B‖²] by Monte-Carlo to a relative standard error target."""
    return _batch_monte_carlo(
        ctx, "batch_sharpness", sharpness.batch_sharpness, ("draws_per_step",)
    )


@register_measurement(
    "batch_lambda_max",
    defaults={
        **_MC_DEFAULTS,
        "sampling": "independent",
        "rel_stderr": 0.02,
        "max_draws": 100,
        "draws_per_step": 4,
        "num_iters": 30,
    },
    check=lambda o, i: _check_batch_options("batch_lambda_max", o, i),
)
def _batch_lambda_max(ctx: MeasureContext) -> dict[str, Any]:
    """E_B[λ_max(H_B)] by Monte-Carlo (Lanczos per batch)."""
    return _batch_monte_carlo(
        ctx,
        "batch_lambda_max",
        sharpness.expected_batch_lambda_max,
        ("draws_per_step", "num_iters"),
    )


def _check_gni(options: Mapping[str, Any], info: RunInfo) -> None:
    _require(
        options["method"] in ("exact", "hutchinson"),
        f"gni: method must be 'exact' or 'hutchinson', got {options['method']!r}",
    )
    _check_batch_options("gni", {**_MC_DEFAULTS, **options}, info)
    if options["method"] == "exact":
        _require(
            info.num_measure <= options["exact_max_examples"],
            f"gni: method='exact' costs n={info.num_measure:,} full-batch Hessian-vector "
            f"products (O(n²)); above exact_max_examples={options['exact_max_examples']:,} "
            "use method='hutchinson'",
        )


@register_measurement(
    "gni",
    defaults={
        "method": "hutchinson",
        "num_probes": 20,
        "batch_size": None,
        "replace": None,
        "exact_max_examples": 512,
    },
    check=_check_gni,
)
def _gni(ctx: MeasureContext) -> dict[str, Any]:
    """GNI = E_B[g_Bᵀ H g_B]/‖ḡ‖² = (ḡᵀHḡ + κ tr(HC))/‖ḡ‖².

    ``method="exact"``: tr(HC) from n Hessian-vector products of centred per-example
    gradients. ``"hutchinson"``: tr(HC) = E_z[zᵀ H C z] with Rademacher z (one C and one H
    product per probe); the standard error of GNI is κ·SE(tr HC)/‖ḡ‖².
    """
    b, replace = _batch_options(ctx)
    opts = ctx.options
    n = ctx.info.num_measure
    kappa = minibatch.minibatch_noise_scale(n, b, replacement=replace)

    def estimate(params, batch, key):
        if opts["method"] == "exact":
            value = batch_moments.gradient_noise_interaction(
                ctx.objective,
                params,
                batch,
                batch_size=b,
                replace=replace,
                chunk_size=ctx.chunk_size,
            )
            return value, jnp.zeros_like(value)
        g = operators.gradient(ctx.objective, params, batch, chunk_size=ctx.chunk_size)
        hvp = operators.hessian(ctx.objective, params, batch, chunk_size=ctx.chunk_size)
        cov = operators.gradient_covariance(
            ctx.objective, params, batch, chunk_size=ctx.chunk_size, mean_gradient=g
        )
        g_sq = optax.tree.vdot(g, g)
        est = linalg.hutchinson_trace(
            lambda v: hvp(cov(v)), params, key=key, num_probes=opts["num_probes"]
        )
        value = (optax.tree.vdot(g, hvp(g)) + kappa * est.value) / g_sq
        return value, kappa * est.stderr / g_sq

    value, stderr = ctx.jit(estimate)(ctx.params, ctx.batch, ctx.key)
    out = {"gni": value}
    if opts["method"] == "hutchinson":
        out["gni_stderr"] = stderr
    return out


@register_measurement("gradient_rayleigh")
def _gradient_rayleigh(ctx: MeasureContext) -> dict[str, Any]:
    """ḡᵀHḡ/‖ḡ‖² (NaN at ḡ = 0)."""

    def rayleigh(params, batch):
        return sharpness.gradient_rayleigh_quotient(
            ctx.objective, params, batch, chunk_size=ctx.chunk_size
        )

    return {"gradient_rayleigh": ctx.jit(rayleigh)(ctx.params, ctx.batch)}


def _check_jacobian(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _require(
        options["output"] in jacobian.OUTPUTS,
        f"jacobian_norms: output must be one of {jacobian.OUTPUTS}, got {options['output']!r}",
    )
    _require(
        options["spectral"] in ("svd", "power", None),
        "jacobian_norms: spectral must be 'svd', 'power' or None (skip the spectral norm)",
    )


@register_measurement(
    "jacobian_norms",
    defaults={"output": "logits", "spectral": "svd"},
    check=_check_jacobian,
)
def _jacobian_norms(ctx: MeasureContext) -> dict[str, Any]:
    """Input–output Jacobian norms ‖∂f(x_p)/∂x‖_F and ‖·‖₂, mean and max over the batch."""
    opts = ctx.options
    predict = ctx.objective.predict

    def norms(params, batch, key):
        out = {}
        fro = jacobian.jacobian_frobenius_norm(
            predict, params, batch.inputs, output=opts["output"], chunk_size=ctx.chunk_size
        )
        out["jacobian_frobenius_mean"], out["jacobian_frobenius_max"] = fro.mean, fro.max
        if opts["spectral"] is not None:
            spec = jacobian.jacobian_spectral_norm(
                predict,
                params,
                batch.inputs,
                output=opts["output"],
                method=opts["spectral"],
                key=key,
                chunk_size=ctx.chunk_size,
            )
            out["jacobian_spectral_mean"], out["jacobian_spectral_max"] = spec.mean, spec.max
        return out

    return ctx.jit(norms)(ctx.params, ctx.batch, ctx.key)


def _check_riemannian(options: Mapping[str, Any], info: RunInfo) -> None:
    _require(options["damping"] >= 0, "riemannian_sharpness: damping must be >= 0")
    _require(
        options["fisher"] in ("empirical", "true"),
        "riemannian_sharpness: fisher must be 'empirical' or 'true'",
    )
    probes = options["num_probes"]
    if probes is None:
        _require(
            info.num_params <= info.exact_param_limit,
            f"riemannian_sharpness: the exact Hessian diagonal needs P={info.num_params:,} "
            f"Hessian-vector products, above measure.exact_param_limit="
            f"{info.exact_param_limit:,}; set num_probes (Hutchinson, with a standard error)",
        )
    else:
        _require(isinstance(probes, int) and probes >= 2, "riemannian_sharpness: num_probes >= 2")


@register_measurement(
    "riemannian_sharpness",
    defaults={"damping": 0.0, "fisher": "empirical", "num_probes": None, "probe_chunk": 10},
    check=_check_riemannian,
)
def _riemannian_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """Σ_i H_ii/(F_ii + ε) with the diagonal empirical Fisher (see fisher_geometry)."""
    opts = ctx.options

    def estimate(params, batch, key):
        use_key = None if opts["num_probes"] is None else key
        return fisher_geometry.diagonal_riemannian_sharpness(
            ctx.objective,
            params,
            batch,
            damping=opts["damping"],
            fisher=opts["fisher"],
            key=use_key,
            num_probes=opts["num_probes"],
            chunk_size=ctx.chunk_size,
            probe_chunk=opts["probe_chunk"],
        )

    res = ctx.jit(estimate)(ctx.params, ctx.batch, ctx.key)
    out = {
        "riemannian_sharpness": res.value,
        "riemannian_damping": jnp.asarray(res.damping),
        "riemannian_excluded": res.num_excluded,
    }
    if opts["num_probes"] is not None:
        out["riemannian_sharpness_stderr"] = res.stderr
    return out
