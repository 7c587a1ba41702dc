"""The built-in measurements: the functions behind the names of ``measurements.MEASUREMENTS``.

Each is ``fn(ctx: MeasureContext) -> {key: value}`` with an optional option check
``(options, info: RunInfo) -> None``; the registry (:mod:`sharpness_jax.measurements`) lists
them with their defaults in one table. The math lives in the library modules they call; these
functions choose the operands (measurement batch, keys, options) and compile through
``ctx.jit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from sharpness_jax import (
    batch_moments,
    gradient_gram,
    jacobian,
    linalg,
    operators,
    quotient_summary,
    riemannian,
    sharpness,
)
from sharpness_jax.checks import is_int as _is_int
from sharpness_jax.checks import require as _require
from sharpness_jax.objective import Batch, Objective, get_loss

if TYPE_CHECKING:
    from sharpness_jax.measurements import MeasureContext, RunInfo

__all__ = [
    "MONTE_CARLO_DEFAULTS",
    "check_accuracy",
    "check_batch_lambda_max",
    "check_batch_sharpness",
    "check_gni",
    "check_jacobian_norms",
    "check_lambda_max",
    "check_quotient_geometry",
    "check_riemannian_sharpness",
    "check_trace_gradient_covariance",
    "check_trace_hessian",
    "measure_accuracy",
    "measure_batch_lambda_max",
    "measure_batch_sharpness",
    "measure_gni",
    "measure_gradient_norm",
    "measure_gradient_rayleigh",
    "measure_jacobian_norms",
    "measure_lambda_max",
    "measure_loss",
    "measure_progressive_sharpening_curvature",
    "measure_progressive_sharpening_unsmoothed_loss",
    "measure_quotient_geometry",
    "measure_riemannian_sharpness",
    "measure_trace_gradient_covariance",
    "measure_trace_hessian",
]


def _require_num_probes(measurement: str, probes: Any) -> None:
    """A stochastic estimate needs an int ``num_probes`` >= 2 for its standard error."""
    _require(
        _is_int(probes) and probes >= 2,
        f"{measurement}: num_probes must be an int >= 2 (for a standard error)",
    )


# ============================================================ loss and curvature


def measure_loss(ctx: MeasureContext) -> dict[str, float]:
    return {f"{s}_loss": ctx.evaluate(s)["loss"] for s in ("train", "test")}


def measure_accuracy(ctx: MeasureContext) -> dict[str, float]:
    return {f"{s}_accuracy": ctx.evaluate(s)["accuracy"] for s in ("train", "test")}


def check_accuracy(options: Mapping[str, Any], info: RunInfo) -> None:
    del options
    _require(
        info.integer_labels,
        "the 'accuracy' measurement needs integer class labels; this dataset has real "
        "targets (use 'loss')",
    )


def measure_lambda_max(ctx: MeasureContext) -> dict[str, Any]:
    """λ_1 ≥ … ≥ λ_k of H = ∇²L on the measurement batch (Lanczos, warm-started)."""
    opts = ctx.options
    k = int(opts["k"])

    def top(objective, params, batch, key, init):
        hvp = operators.hessian(objective, params, batch, chunk_size=ctx.chunk_size)
        return linalg.lanczos_top_k(
            hvp, params, k=k, num_iters=opts["num_iters"], key=key, init=init, tol=opts["tol"]
        )

    init = ctx.state.get("vectors")
    if init is None:  # zero vectors: Lanczos then starts from the random vector alone
        init = jax.tree.map(lambda p: jnp.zeros_like(p, shape=(k, *p.shape)), ctx.params)
    eig = ctx.jit(top)(ctx.objective, ctx.params, ctx.batch, ctx.key, init)
    if opts["warm_start"]:
        ctx.state["vectors"] = eig.vectors
    out = {
        "lambda_max": eig.values[0],
        "lambda_max_residual": eig.residuals[0],
        "lambda_max_num_matvecs": eig.num_matvecs,
    }
    if k > 1:
        out["hessian_top_eigenvalues"] = eig.values
        out["hessian_top_residuals"] = eig.residuals
    return out


def check_lambda_max(options: Mapping[str, Any], info: RunInfo) -> None:
    k, iters = options["k"], options["num_iters"]
    _require(
        _is_int(k) and 1 <= k <= info.num_params,
        f"lambda_max: k must be an int in [1, P={info.num_params}], got {k!r}",
    )
    _require(_is_int(iters) and iters >= k, f"lambda_max: num_iters must be >= k, got {iters!r}")
    _require(options["tol"] is None or options["tol"] > 0, "lambda_max: tol must be > 0 or None")


def measure_trace_hessian(ctx: MeasureContext) -> dict[str, Any]:
    """tr(H) on the measurement batch: exact, Hutchinson or XTrace (value ± standard error)."""
    opts = ctx.options
    method = opts["method"]

    def trace(objective, params, batch, key):
        kw = {"num_probes": opts["num_probes"], "key": key}
        if method == "hutchinson":  # quadratic forms zᵀHz, forward over forward
            est = sharpness.hessian_trace_hutchinson(
                objective, params, batch, chunk_size=ctx.chunk_size, **kw
            )
        else:
            hvp = operators.hessian(objective, params, batch, chunk_size=ctx.chunk_size)
            est = linalg.trace(hvp, params, method=method, basis_chunk=opts["basis_chunk"], **kw)
        return est.value, est.stderr

    value, stderr = ctx.jit(trace)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    if method == "exact":
        return {"trace_hessian": value}
    return {"trace_hessian": value, "trace_hessian_stderr": stderr}


def check_trace_hessian(options: Mapping[str, Any], info: RunInfo) -> None:
    method = options["method"]
    _require(
        method in linalg.TRACE_METHODS,
        f"trace_hessian: method must be one of {linalg.TRACE_METHODS}, got {method!r}",
    )
    if method == "exact":
        _require(
            info.num_params <= info.exact_param_limit,
            f"trace_hessian: method='exact' needs P={info.num_params:,} Hessian-vector "
            f"products, above measure.exact_param_limit={info.exact_param_limit:,}; use "
            "method='hutchinson' or 'xtrace' (a standard error comes with it), or raise "
            "the limit",
        )
    else:
        _require_num_probes("trace_hessian", options["num_probes"])


def measure_trace_gradient_covariance(ctx: MeasureContext) -> dict[str, Any]:
    """tr(C), C = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ on the measurement batch (``"exact"``: by
    :func:`sharpness_jax.gradient_gram.covariance_trace`, factored where it applies).

    With ``top_k`` > 0 (exact only) also the top-k eigenvalues of C, exactly, from the centred
    n × n Gram matrix of :func:`sharpness_jax.gradient_gram.covariance_spectrum` (factored
    over the Dense layers where it applies; tr(C) then comes from the same matrix).
    """
    opts = ctx.options
    chunk_size = ctx.chunk_size
    k = int(opts["top_k"])
    if k:

        def spectrum(objective, params, batch):
            spec = gradient_gram.covariance_spectrum(
                objective, params, batch, chunk_size=chunk_size
            )
            return spec.trace, spec.eigenvalues[:k]

        value, top = ctx.jit(spectrum, name="spectrum")(ctx.objective, ctx.params, ctx.batch)
        out = {"trace_gradient_covariance": value, "gradient_covariance_lambda_max": top[0]}
        if k > 1:
            out["gradient_covariance_top_eigenvalues"] = top
        return out

    if opts["method"] == "exact":

        def trace(objective, params, batch, key):
            del key
            value, _ = gradient_gram.covariance_trace(
                objective, params, batch, chunk_size=chunk_size
            )
            return value, jnp.zeros_like(value)

    else:

        def trace(objective, params, batch, key):
            cov = operators.gradient_covariance(objective, params, batch, chunk_size=chunk_size)
            est = linalg.trace(
                cov, params, method="hutchinson", key=key, num_probes=opts["num_probes"]
            )
            return est.value, est.stderr

    value, stderr = ctx.jit(trace)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    if opts["method"] == "exact":
        return {"trace_gradient_covariance": value}
    return {"trace_gradient_covariance": value, "trace_gradient_covariance_stderr": stderr}


def check_trace_gradient_covariance(options: Mapping[str, Any], info: RunInfo) -> None:
    """The method and probes; the memory of ``"exact"`` depends on the route it takes
    (factored or per example) and is checked by ``gradient_gram.covariance_trace``."""
    method = options["method"]
    _require(
        method in ("exact", "hutchinson"),
        f"trace_gradient_covariance: method must be 'exact' or 'hutchinson', got {method!r}",
    )
    if method == "hutchinson":
        _require_num_probes("trace_gradient_covariance", options["num_probes"])
    k = options["top_k"]
    _require(
        _is_int(k) and 0 <= k <= info.num_measure and (k == 0 or method == "exact"),
        f"trace_gradient_covariance: top_k must be an int in [0, n={info.num_measure}] "
        f"(the measurement batch), with method='exact' when > 0; got {k!r}",
    )


def measure_gradient_norm(ctx: MeasureContext) -> dict[str, Any]:
    """‖∇L(θ)‖₂ on the measurement batch."""

    def norm(objective, params, batch):
        g = operators.gradient(objective, params, batch, chunk_size=ctx.chunk_size)
        return optax.tree.norm(g)

    return {"gradient_norm": ctx.jit(norm)(ctx.objective, ctx.params, ctx.batch)}


# ============================================================ SGD batches, GNI, geometry


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


MONTE_CARLO_DEFAULTS = {
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

    def estimate(objective, params, batch, key):
        return estimator(
            objective,
            params,
            batch,
            batch_size=b,
            key=key,
            replace=replace,
            chunk_size=ctx.chunk_size,
            **opts,
        )

    est = ctx.jit(estimate)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    return {name: est.value, f"{name}_stderr": est.stderr, f"{name}_draws": est.num_draws}


def measure_batch_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """E_B[g_Bᵀ H_B g_B / ‖g_B‖²] by Monte-Carlo to a relative standard error target."""
    return _batch_monte_carlo(
        ctx, "batch_sharpness", sharpness.batch_sharpness, ("draws_per_step",)
    )


def measure_batch_lambda_max(ctx: MeasureContext) -> dict[str, Any]:
    """E_B[λ_max(H_B)] by Monte-Carlo (Lanczos per batch)."""
    return _batch_monte_carlo(
        ctx,
        "batch_lambda_max",
        sharpness.expected_batch_lambda_max,
        ("draws_per_step", "num_iters"),
    )


def check_batch_sharpness(options: Mapping[str, Any], info: RunInfo) -> None:
    _check_batch_options("batch_sharpness", options, info)


def check_batch_lambda_max(options: Mapping[str, Any], info: RunInfo) -> None:
    _check_batch_options("batch_lambda_max", options, info)


def check_gni(options: Mapping[str, Any], info: RunInfo) -> None:
    _require(
        options["method"] in ("exact", "hutchinson"),
        f"gni: method must be 'exact' or 'hutchinson', got {options['method']!r}",
    )
    _check_batch_options("gni", {**MONTE_CARLO_DEFAULTS, **options}, info)
    if options["method"] == "exact":
        _require(
            info.num_measure <= options["exact_max_examples"],
            f"gni: method='exact' costs n={info.num_measure:,} full-batch Hessian-vector "
            f"products (O(n²)); above exact_max_examples={options['exact_max_examples']:,} "
            "use method='hutchinson'",
        )


def measure_gni(ctx: MeasureContext) -> dict[str, Any]:
    """GNI = E_B[g_Bᵀ H g_B]/‖ḡ‖² = (ḡᵀHḡ + κ tr(HC))/‖ḡ‖².

    ``method="exact"``: tr(HC) from n Hessian-vector products of centred per-example
    gradients. ``"hutchinson"``: tr(HC) = E_z[zᵀ H C z] with Rademacher z (one C and one H
    product per probe); the standard error of GNI is κ·SE(tr HC)/‖ḡ‖².
    """
    b, replace = _batch_options(ctx)
    opts = ctx.options

    def estimate(objective, params, batch, key):
        result = batch_moments.gradient_noise_interaction(
            objective,
            params,
            batch,
            batch_size=b,
            replace=replace,
            method=opts["method"],
            key=key,
            num_probes=opts["num_probes"],
            chunk_size=ctx.chunk_size,
        )
        if opts["method"] == "exact":
            return result, jnp.zeros_like(result)
        return result.value, result.stderr

    value, stderr = ctx.jit(estimate)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    out = {"gni": value}
    if opts["method"] == "hutchinson":
        out["gni_stderr"] = stderr
    return out


def measure_gradient_rayleigh(ctx: MeasureContext) -> dict[str, Any]:
    """ḡᵀHḡ/‖ḡ‖² (NaN at ḡ = 0)."""

    def rayleigh(objective, params, batch):
        return sharpness.gradient_rayleigh_quotient(
            objective, params, batch, chunk_size=ctx.chunk_size
        )

    return {"gradient_rayleigh": ctx.jit(rayleigh)(ctx.objective, ctx.params, ctx.batch)}


def check_jacobian_norms(options: Mapping[str, Any], info: RunInfo) -> None:
    del info
    _require(
        options["output"] in jacobian.OUTPUTS,
        f"jacobian_norms: output must be one of {jacobian.OUTPUTS}, got {options['output']!r}",
    )
    _require(
        options["spectral"] in ("svd", "power", None),
        "jacobian_norms: spectral must be 'svd', 'power' or None (skip the spectral norm)",
    )


def measure_jacobian_norms(ctx: MeasureContext) -> dict[str, Any]:
    """Input–output Jacobian norms ‖∂f(x_p)/∂x‖_F and ‖·‖₂, mean and max over the batch."""
    opts = ctx.options

    def norms(objective, params, batch, key):
        predict = objective.predict
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

    return ctx.jit(norms)(ctx.objective, ctx.params, ctx.batch, ctx.key)


def check_riemannian_sharpness(options: Mapping[str, Any], info: RunInfo) -> None:
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
        _require_num_probes("riemannian_sharpness", probes)


def measure_riemannian_sharpness(ctx: MeasureContext) -> dict[str, Any]:
    """Σ_i H_ii/(F_ii + ε) with the diagonal empirical Fisher (see riemannian)."""
    opts = ctx.options

    def estimate(objective, params, batch, key):
        use_key = None if opts["num_probes"] is None else key
        return riemannian.diagonal_riemannian_sharpness(
            objective,
            params,
            batch,
            damping=opts["damping"],
            fisher=opts["fisher"],
            key=use_key,
            num_probes=opts["num_probes"],
            chunk_size=ctx.chunk_size,
            probe_chunk=opts["probe_chunk"],
        )

    res = ctx.jit(estimate)(ctx.objective, ctx.params, ctx.batch, ctx.key)
    out = {
        "riemannian_sharpness": res.value,
        "riemannian_damping": jnp.asarray(res.damping),
        "riemannian_excluded": res.num_excluded,
    }
    if opts["num_probes"] is not None:
        out["riemannian_sharpness_stderr"] = res.stderr
    return out


# ============================================================ studies


def measure_progressive_sharpening_curvature(ctx: MeasureContext) -> dict[str, Any]:
    """Mean and max over the measurement batch of ‖Λ_p‖₂ and κ_p = ‖J_pᵀ Λ_p J_p‖₂."""

    def terms(objective, params, batch):
        t = jacobian.curvature_terms(objective, params, batch, chunk_size=ctx.chunk_size)
        return {
            "output_curvature_mean": jnp.mean(t.output_curvature),
            "output_curvature_max": jnp.max(t.output_curvature),
            "input_gauss_newton_mean": jnp.mean(t.input_gauss_newton),
            "input_gauss_newton_max": jnp.max(t.input_gauss_newton),
        }

    return ctx.jit(terms)(ctx.objective, ctx.params, ctx.batch)


def measure_progressive_sharpening_unsmoothed_loss(ctx: MeasureContext) -> dict[str, Any]:
    """Train and test loss L = (1/n) Σ_p ℓ_p of the run's loss without label smoothing."""
    if not ctx.config.loss.label_smoothing:
        return {
            "unsmoothed_train_loss": ctx.evaluate("train")["loss"],
            "unsmoothed_test_loss": ctx.evaluate("test")["loss"],
        }
    loss = get_loss(ctx.config.loss.name)

    def mean_loss(objective, params, batch):
        plain = Objective(objective.predict, loss)
        return operators.loss_value(plain, params, batch, chunk_size=ctx.chunk_size)

    fn = ctx.jit(mean_loss)
    return {
        "unsmoothed_train_loss": fn(ctx.objective, ctx.params, ctx.train),
        "unsmoothed_test_loss": fn(ctx.objective, ctx.params, ctx.test),
    }


def _check_step_rule(config) -> None:
    """The split's plain gradient step −η∇L_B takes the constant η of plain GD/SGD."""
    o = config.optimizer
    if o.name not in ("gd", "sgd") or o.schedule != "constant" or o.warmup_steps:
        raise ValueError(
            f"quotient_geometry: split=True splits the update and the plain gradient step of "
            f"plain GD/SGD with a constant learning rate; got optimizer {o.name!r}, schedule "
            f"{o.schedule!r}, warmup {o.warmup_steps}"
        )


def measure_quotient_geometry(ctx: MeasureContext) -> dict[str, Any]:
    """The ``quotient_geometry`` measurement, on the measurement batch (the training set).

    Metrics row: ``quotient_lambda_max`` (λ_max(H)), ``quotient_reduced_lambda_max``
    (λ_max(BᵀHB), Euclidean W), ``quotient_ambient_zeros`` / ``quotient_reduced_zeros``
    (#|λ| ≤ zero_rtol·max|λ(H)|), ``quotient_gradient_norm``, ``quotient_rank`` /
    ``quotient_expected_rank`` / ``quotient_regular`` / ``quotient_jacobian_condition``
    (``quotient_spectra.regularity``); with ``generalised``:
    ``quotient_generalised_lambda_max`` (top eigenvalue of BᵀHB y = λ BᵀGB y, scale-invariant
    W) and its Euclidean-W counterpart; with
    ``split`` (plain GD/SGD with a constant η only): ``split_*`` (Euclidean split of the update
    δ = −η(∇L_B + λθ) training applies at this step, ``ctx.update()``) and ``split_si_*``
    (scale-invariant split of −η∇L_B, the step's mini-batch gradient), each with
    ``step_norm``, ``horizontal_norm``, ``vertical_norm`` (‖·‖₂ of δ, δ_h, δ_v),
    ``jvp_horizontal`` / ``jvp_vertical`` (RMS of J δ_h, J δ_v over the inputs) and
    ``change_horizontal`` / ``change_vertical`` / ``change_total`` (RMS of the exact output
    changes). Arrays: ``quotient_params`` (ravelled θ), ``quotient_conserved`` (Q_i),
    ``quotient_ambient``, ``quotient_reduced`` and, with ``generalised``,
    ``quotient_generalised`` and ``quotient_generalised_euclidean`` (descending spectra). See
    :func:`sharpness_jax.quotient_summary.point_summary`.
    """
    opts, c = ctx.options, ctx.config
    activation = quotient_summary.shallow_activation(c.model)
    dtype = jax.tree.leaves(ctx.params)[0].dtype
    if opts["split"]:
        _check_step_rule(c)
        step = ctx.update()
        update, gradient, lr = step.update, step.gradient, c.optimizer.learning_rate
    else:
        update = gradient = jax.tree.map(jnp.zeros_like, ctx.params)
        lr = 0.0
    return quotient_summary.point_summary(
        ctx.params,
        Batch(*ctx.batch),
        update,
        gradient,
        jnp.asarray(lr, dtype),
        jnp.asarray(opts["zero_rtol"], dtype),
        activation=activation,
        loss_name=c.loss.name,
        generalised=bool(opts["generalised"]),
        split=bool(opts["split"]),
    )


def check_quotient_geometry(options: Mapping[str, Any], info: RunInfo) -> None:
    for key in ("generalised", "split"):
        if not isinstance(options[key], bool):
            raise ValueError(f"quotient_geometry: {key} must be a bool, got {options[key]!r}")
    if not options["zero_rtol"] > 0:
        raise ValueError(
            f"quotient_geometry: zero_rtol must be positive, got {options['zero_rtol']}"
        )
    if info.num_params > info.exact_param_limit:
        raise ValueError(
            f"quotient_geometry: builds dense P × P Hessians, P={info.num_params:,} exceeds "
            f"measure.exact_param_limit={info.exact_param_limit:,}"
        )
    if options["split"] and info.num_measure != info.num_train:
        raise ValueError(
            "quotient_geometry: split=True needs the whole training set as the measurement "
            f"batch (measure_subset=None), got {info.num_measure} of {info.num_train} examples"
        )
