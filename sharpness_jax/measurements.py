"""The measurements of the training loop: one explicit table, the registry and MeasureContext.

A measurement is a function of a :class:`MeasureContext` returning a dict of scalars (stored in
the metrics row) and arrays (stored in ``arrays/step_*.npz`` beside the metrics), registered
by name with its options' defaults and an optional check of the options that runs before
anything compiles. ``MEASUREMENTS`` (name → :class:`Measurement`) starts as the built-in
table ``BUILTIN_MEASUREMENTS``, built once here; :func:`register_measurement` adds a user's.
Nothing registers on import. The functions are :mod:`sharpness_jax.builtin_measurements`;
each runs on the run's measurement batch (a fixed subset of at most ``measure_subset``
training examples, drawn once with ``numpy.random.default_rng(0)``, the same for every seed;
all of them when n is smaller) unless it says otherwise.

======================================== =========================================================
name                                     row keys and quantity
======================================== =========================================================
``loss``                                 ``train_loss``, ``test_loss``: L(θ) = (1/n) Σ_p ℓ_p(θ) on
                                         the full splits (the training objective: label smoothing
                                         included, weight decay not)
``accuracy``                             ``train_accuracy``, ``test_accuracy``: fraction with
                                         argmax_k f_k(x_p) = y_p (integer labels only)
``lambda_max``                           λ_max(H) of H = ∇²L by Lanczos (``linalg.lanczos_top_k``
                                         on ``operators.hessian``), warm-started from the previous
                                         measurement's eigenvectors
``trace_hessian``                        tr(H): Hutchinson or XTrace with standard error, or exact
                                         (P Hessian-vector products, small P only)
``trace_gradient_covariance``            tr(C) = (1/n) Σ_p ‖g_p − ḡ‖², exactly
                                         (``gradient_gram.covariance_trace``, from the Dense
                                         layers' factors where it applies), or by Hutchinson
                                         on ``operators.gradient_covariance``; option ``top_k``:
                                         also ``gradient_covariance_lambda_max`` (and the array
                                         ``gradient_covariance_top_eigenvalues``), exact, from
                                         the n × n Gram matrix (``covariance_spectrum``)
``gradient_norm``                        ‖∇L(θ)‖
``batch_sharpness``                      ``batch_sharpness`` (± ``_stderr``, ``_draws``):
                                         E_B[g_Bᵀ H_B g_B/‖g_B‖²], batches of the training batch
                                         size drawn like the training sampler, whole partitions
                                         of the data when 10 fit in ``max_draws`` (option
                                         ``sampling``, see ``sharpness``)
``batch_lambda_max``                     ``batch_lambda_max`` (± ``_stderr``, ``_draws``):
                                         E_B[λ_max(H_B)], independent batches by default
``gni``                                  ``gni`` (± ``gni_stderr`` for Hutchinson):
                                         E_B[g_Bᵀ H g_B]/‖ḡ‖² = (ḡᵀHḡ + κ·tr(HC))/‖ḡ‖², κ = 1/b
                                         (with replacement) or (n−b)/(b(n−1)) (without)
``gradient_rayleigh``                    ``gradient_rayleigh``: ḡᵀHḡ/‖ḡ‖², batch sharpness of the
                                         full batch
``jacobian_norms``                       ``jacobian_frobenius_mean/max``,
                                         ``jacobian_spectral_mean/max``: ‖∂f(x_p)/∂x‖ (logits or
                                         softmax outputs)
``riemannian_sharpness``                 ``riemannian_sharpness`` (± ``_stderr``),
                                         ``riemannian_damping``, ``riemannian_excluded``:
                                         Σ_i H_ii/(F_ii + ε), F the diagonal empirical Fisher
                                         (exact diagonal for small P, Hutchinson otherwise)
``progressive_sharpening_curvature``     ``output_curvature_mean/max`` (‖Λ_p‖₂, Λ_p = ∇²_f ℓ_p),
                                         ``input_gauss_newton_mean/max`` (κ_p = ‖J_pᵀ Λ_p J_p‖₂):
                                         ``jacobian.curvature_terms``
``progressive_sharpening_unsmoothed_loss`` ``unsmoothed_train_loss``, ``unsmoothed_test_loss``:
                                         the full-split loss without label smoothing
``quotient_geometry``                    spectra of H and of the reduced BᵀHB, regularity,
                                         conserved quantities and (option ``split``) the split of
                                         the step's update of a shallow network
                                         (``quotient_summary.point_summary``)
``preconditioned_sharpness``             ``preconditioned_sharpness``: λ_max(P⁻¹H), P = diag(√ν̂ + ε)
                                         of the run's Adam state, and
                                         ``adaptive_stability_threshold`` (2 + 2β₁)/((1 − β₁)η)
``worst_case_sharpness``                 ``worst_case_sharpness``, ``worst_case_perturbation_norm``:
                                         max_{‖ε ⊘ c‖ ≤ ρ} L(θ+ε) − L(θ) by projected ascent
                                         (option ``adaptive``: c = |θ| + ξ)
``average_sharpness``                    ``average_sharpness`` (± ``_stderr``): E_ε[L(θ+ε)] − L(θ),
                                         ε ∼ N(0, σ² diag c²), Monte Carlo
``m_sharpness``                          ``m_sharpness``: worst-case sharpness of each batch of m
                                         measurement examples, averaged (options ``m``, ``rho``)
``relative_flatness``                    ``relative_flatness``: Σ_{s,s'} ⟨w_s, w_s'⟩ tr(H_{s,s'}) of
                                         one layer (default the last kernel), exact
``lambda_max_gradient``                  ``lambda_max_gradient_value`` λ_max, ``_norm`` ‖∇λ_max‖,
                                         ``_cosine`` cos(∇λ_max, ḡ)
``loss_slice``                           arrays ``loss_slice_alphas``, ``loss_slice_values``:
                                         L(θ+αu) along a filter-normalised direction u
``takeuchi_information_criterion``       ``takeuchi_information_criterion`` (± ``_stderr``):
                                         tr((H + λI)⁻¹ C), Hutchinson with GMRES solves
``full_riemannian_sharpness``            ``riemannian_trace_full`` (± ``_stderr``),
                                         ``riemannian_lambda_max_full``: tr and λ_max of
                                         (F + λI)⁻¹H, F the true Fisher, through CG solves
``natural_gradient``                     ``natural_gradient_norm`` ‖x‖, ``_inner`` ḡᵀx,
                                         ``_cosine`` ḡᵀx/(‖ḡ‖‖x‖), ``_num_iters``,
                                         ``_residual_norm``, ``_converged`` of the solve
                                         x = (F + λI)⁻¹ḡ (true or empirical F; preconditioner
                                         none, ``"diagonal"`` or ``"kfac"``)
======================================== =========================================================

Registering a measurement (a function of a :class:`MeasureContext` returning a dict)::

    def top_eigenvalue_of_ggn(ctx):
        def top(objective, params, batch, key):
            ggn = sj.ggn(objective, params, batch, chunk_size=ctx.chunk_size)
            return sj.lanczos_top_k(ggn, params, k=1, key=key,
                                    num_iters=ctx.options["num_iters"]).values[0]

        return {"ggn_lambda_max": ctx.jit(top)(ctx.objective, ctx.params, ctx.batch, ctx.key)}

    register_measurement("ggn_lambda_max", top_eigenvalue_of_ggn, defaults={"num_iters": 30})

then ``config.measure.names = ("loss", "ggn_lambda_max")`` and, optionally,
``config.measure.options.ggn_lambda_max.num_iters = 50``. ``ctx.jit`` compiles once and the
compiled function is reused at every step and by later runs with the same compile cache
(``training.train(..., cache=...)``) whose configs differ only in the seed or the stop rules,
so it may close over ``ctx.options`` and the config, but everything that changes between
steps or seeds (params, batch, key, warm-start state from ``ctx.state``) must be an argument,
and so should the objective: for a model with batch-norm state (``resnet18``) the objective
is the eval-mode model at the running statistics of the step, a pytree whose leaves are those
statistics, so that a function taking it as an argument compiles once per run (one that
closes over it is compiled anew at every measured step). Results with a leading axis are
saved beside the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from sharpness_jax import builtin_measurements as builtin
from sharpness_jax import perturbation_measurements as perturbation
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "BUILTIN_MEASUREMENTS",
    "MEASUREMENTS",
    "MeasureContext",
    "Measurement",
    "RunInfo",
    "StepUpdate",
    "register_measurement",
]


class RunInfo(NamedTuple):
    """Sizes of a run, known before anything compiles (for measurement checks).

    Attributes:
      num_params: P.
      num_train, num_test: examples in the splits.
      num_measure: examples in the measurement batch.
      num_outputs: K.
      batch_size: the training batch size B.
      integer_labels: whether targets are class labels.
      exact_param_limit: ``config.measure.exact_param_limit``.
      chunk_size: ``config.chunk_size``.
    """

    num_params: int
    num_train: int
    num_test: int
    num_measure: int
    num_outputs: int
    batch_size: int
    integer_labels: bool
    exact_param_limit: int
    chunk_size: int | None


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A registered measurement.

    Attributes:
      name: its name in ``measure.names``.
      fn: ``ctx -> {key: scalar or array}``; 0-d values go into the metrics row, arrays into
        ``arrays/step_*.npz``.
      defaults: its options and their defaults (the only option names accepted).
      check: optional ``(options, info: RunInfo) -> None`` raising ValueError for settings
        the run cannot afford or does not support; runs before anything compiles.
    """

    name: str
    fn: Callable[[MeasureContext], Mapping[str, Any]]
    defaults: Mapping[str, Any]
    check: Callable[[Mapping[str, Any], RunInfo], None] | None = None


MEASUREMENTS: dict[str, Measurement] = {}


class StepUpdate(NamedTuple):
    """The update training applies at step s: θ_{s+1} = θ_s + ``update``.

    Attributes:
      loss: L_B(θ_s) = (1/|B|) Σ_{p∈B} ℓ_p(θ_s) on the step's batch B_s.
      gradient: ∇L_B(θ_s).
      update: the optimizer's update u_s (weight decay, momentum and the learning rate η_s
        included); the next parameters are θ_s + u_s unless the step diverges.
    """

    loss: jax.Array
    gradient: PyTree
    update: PyTree


@dataclasses.dataclass(frozen=True)
class MeasureContext:
    """What a measurement function receives.

    Attributes:
      name: the measurement's name.
      step: the training step s (θ = θ_s).
      objective: the training objective (model and loss; the mean over a batch); for a
        batch-norm model the eval-mode model at the running statistics of this step (a
        pytree with them as leaves: pass it to the jitted function as an argument).
      params: θ_s.
      batch: the measurement batch (a fixed subset of ≤ ``measure_subset`` training examples).
      train, test: the full splits (device arrays).
      key: a PRNG key derived from (seed, step, name): the same on a resumed run.
      opt_state: the optimizer state at θ_s.
      batch_indices: the training batch B_s of this step's update (indices into ``train``,
        as the run's sampler draws them; None: the full batch).
      options: the measurement's options (registered defaults updated by the config).
      state: a mutable dict carried from one call to the next (warm starts). Store arrays
        only (nested dicts of arrays); it is checkpointed with the run and restored on resume
        (onto the params' device). Create initial arrays from the params (e.g.
        ``jnp.zeros_like(p, shape=...)``) so that they live on the same device as later ones
        and the compiled function is not compiled twice.
      info: the run's sizes (:class:`RunInfo`).
      config: the resolved run config (read-only).
    """

    name: str
    step: int
    objective: Objective
    params: PyTree
    batch: Batch
    train: Batch
    test: Batch
    key: jax.Array
    opt_state: PyTree
    batch_indices: np.ndarray | None
    options: Mapping[str, Any]
    state: dict[str, Any]
    info: RunInfo
    config: ml_collections.FrozenConfigDict
    _runtime: Any  # programs.Runtime: the run's compiled programs

    @property
    def chunk_size(self) -> int | None:
        """``config.chunk_size``: examples per chunk for sums over examples."""
        return self._runtime.chunk_size

    def jit(self, fn: Callable, *, name: str = "", **jit_kwargs) -> Callable:
        """``jax.jit(fn)``, created once per measurement (and ``name``) and reused.

        The first call's ``fn`` is kept and reused at every step and by later runs with the
        same compile cache whose configs differ only in the seed or the stop rules: it may
        close over the options and the config, but must take everything that changes between
        steps or seeds (params, batch, key, state) as arguments, and the objective too
        (``ctx.jit(f)(ctx.objective, ctx.params, ...)``): for a batch-norm model it carries
        the running statistics of the step as pytree leaves. A function of such a model
        that takes no objective is compiled anew at every measured step. Use ``name`` for a
        second function.
        """
        label = f"{self.name}/{name}" if name else self.name
        return self._runtime.jit(label, fn, owner=MEASUREMENTS[self.name].fn, **jit_kwargs)

    def evaluate(self, split: str = "train") -> dict[str, float]:
        """``{"loss": L, "accuracy": acc}`` on the full ``"train"`` or ``"test"`` split at this
        step, shared by all measurements and the goal checks (computed once)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        batch = self.train if split == "train" else self.test
        return self._runtime.evaluate(self.params, batch, self.step, split)

    def update(self) -> StepUpdate:
        """The update training applies at this step, from θ_s, ``opt_state`` and the batch
        ``batch_indices`` (computed once per step by the compiled update of the training step,
        so θ_{s+1} = θ_s + update exactly as the loop takes it)."""
        loss, gradient, update = self._runtime.step_update(
            self.params, self.opt_state, self.train, self.batch_indices, self.step
        )
        return StepUpdate(loss, gradient, update)


def _mc(**overrides: Any) -> dict[str, Any]:
    return {**builtin.MONTE_CARLO_DEFAULTS, **overrides}


#: Every built-in measurement, in one table (see the module docstring).
BUILTIN_MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("loss", builtin.measure_loss, {}),
    Measurement("accuracy", builtin.measure_accuracy, {}, builtin.check_accuracy),
    Measurement(
        "lambda_max",
        builtin.measure_lambda_max,
        {"k": 1, "num_iters": 50, "tol": 1e-6, "warm_start": True},
        builtin.check_lambda_max,
    ),
    Measurement(
        "trace_hessian",
        builtin.measure_trace_hessian,
        {"method": "hutchinson", "num_probes": 100, "basis_chunk": 64},
        builtin.check_trace_hessian,
    ),
    Measurement(
        "trace_gradient_covariance",
        builtin.measure_trace_gradient_covariance,
        {"method": "exact", "num_probes": 100, "top_k": 0},
        builtin.check_trace_gradient_covariance,
    ),
    Measurement("gradient_norm", builtin.measure_gradient_norm, {}),
    Measurement(
        "batch_sharpness",
        builtin.measure_batch_sharpness,
        _mc(draws_per_step=10),
        builtin.check_batch_sharpness,
    ),
    Measurement(
        "batch_lambda_max",
        builtin.measure_batch_lambda_max,
        _mc(
            sampling="independent",
            rel_stderr=0.02,
            max_draws=100,
            draws_per_step=4,
            num_iters=30,
        ),
        builtin.check_batch_lambda_max,
    ),
    Measurement(
        "gni",
        builtin.measure_gni,
        {
            "method": "hutchinson",
            "num_probes": 20,
            "batch_size": None,
            "replace": None,
            "exact_max_examples": 512,
        },
        builtin.check_gni,
    ),
    Measurement("gradient_rayleigh", builtin.measure_gradient_rayleigh, {}),
    Measurement(
        "jacobian_norms",
        builtin.measure_jacobian_norms,
        {"output": "logits", "spectral": "svd"},
        builtin.check_jacobian_norms,
    ),
    Measurement(
        "riemannian_sharpness",
        builtin.measure_riemannian_sharpness,
        {"damping": 0.0, "fisher": "empirical", "num_probes": None, "probe_chunk": 10},
        builtin.check_riemannian_sharpness,
    ),
    Measurement(
        "progressive_sharpening_curvature", builtin.measure_progressive_sharpening_curvature, {}
    ),
    Measurement(
        "progressive_sharpening_unsmoothed_loss",
        builtin.measure_progressive_sharpening_unsmoothed_loss,
        {},
    ),
    Measurement(
        "quotient_geometry",
        builtin.measure_quotient_geometry,
        {"generalised": False, "split": False, "zero_rtol": 1e-6},
        builtin.check_quotient_geometry,
    ),
    Measurement(
        "preconditioned_sharpness",
        perturbation.measure_preconditioned_sharpness,
        {"num_iters": 50, "tol": 1e-6},
        perturbation.check_preconditioned_sharpness,
    ),
    Measurement(
        "worst_case_sharpness",
        perturbation.measure_worst_case_sharpness,
        {"rho": 0.05, "num_steps": 10, "adaptive": False, "xi": 0.0},
        perturbation.check_worst_case_sharpness,
    ),
    Measurement(
        "average_sharpness",
        perturbation.measure_average_sharpness,
        {"sigma": 0.01, "num_samples": 32, "adaptive": False},
        perturbation.check_average_sharpness,
    ),
    Measurement(
        "m_sharpness",
        perturbation.measure_m_sharpness,
        {"m": 16, "rho": 0.05, "num_steps": 10, "adaptive": False, "xi": 0.0},
        perturbation.check_m_sharpness,
    ),
    Measurement(
        "relative_flatness",
        perturbation.measure_relative_flatness,
        {"kernel": None, "max_bytes": 2.0**30},
        perturbation.check_relative_flatness,
    ),
    Measurement(
        "lambda_max_gradient",
        perturbation.measure_lambda_max_gradient,
        {"num_iters": 100, "tol": 1e-8},
        perturbation.check_lambda_max_gradient,
    ),
    Measurement(
        "loss_slice",
        perturbation.measure_loss_slice,
        {"radius": 1.0, "num_points": 21},
        perturbation.check_loss_slice,
    ),
    Measurement(
        "takeuchi_information_criterion",
        perturbation.measure_takeuchi_information_criterion,
        {
            "damping": 1e-3,
            "num_probes": 10,
            "method": "gmres",
            "tol": 1e-6,
            "max_iters": 200,
            "restart": 20,
        },
        perturbation.check_takeuchi_information_criterion,
    ),
    Measurement(
        "full_riemannian_sharpness",
        perturbation.measure_full_riemannian_sharpness,
        {"damping": 1e-3, "num_probes": 10, "num_iters": 20, "tol": 1e-6, "max_iters": 200},
        perturbation.check_full_riemannian_sharpness,
    ),
    Measurement(
        "natural_gradient",
        perturbation.measure_natural_gradient,
        {
            "damping": 1e-3,
            "fisher": "true",
            "method": "cg",
            "preconditioner": None,
            "tol": 1e-6,
            "max_iters": 200,
        },
        perturbation.check_natural_gradient,
    ),
)

#: The registry: name → :class:`Measurement`; the built-in table plus what
#: :func:`register_measurement` adds.
MEASUREMENTS: dict[str, Measurement] = {m.name: m for m in BUILTIN_MEASUREMENTS}


def register_measurement(
    name: str,
    fn: Callable[[MeasureContext], Mapping[str, Any]] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    check: Callable[[Mapping[str, Any], RunInfo], None] | None = None,
    overwrite: bool = False,
):
    """Registers ``fn`` under ``name`` in ``MEASUREMENTS`` (also usable as a decorator).

    The function receives a :class:`MeasureContext` and returns a dict of results. Keys must
    be unique across the measurements of a run (prefix them with the quantity's name). To
    keep a run free of recompilation, compile through ``ctx.jit(f)`` and pass every value
    that changes between steps (the objective, params, key, warm-start state) as an argument
    of ``f``.
    Warm-start state goes into ``ctx.state`` (a dict of arrays, checkpointed with the run).

    Args:
      name: the name used in ``config.measure.names``.
      fn: the measurement; omit to use as ``@register_measurement(name, defaults=...)``.
      defaults: accepted options with their default values.
      check: ``(options, info) -> None``, raising ValueError before compilation (e.g. an
        exact method on too many parameters; say which cheaper route to take).
      overwrite: allow replacing an existing registration.

    Returns:
      ``fn`` (so it works as a decorator).

    Raises:
      ValueError: if ``name`` is taken and ``overwrite`` is False.
    """

    def register(f):
        if name in MEASUREMENTS and not overwrite:
            raise ValueError(f"a measurement named {name!r} is already registered")
        MEASUREMENTS[name] = Measurement(name, f, dict(defaults or {}), check)
        return f

    return register if fn is None else register(fn)
