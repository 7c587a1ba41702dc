"""One optax training loop for every study, with a measurement schedule and resumable records.

``train(config, workdir)`` trains a model from the zoo (:mod:`sharpness_jax.models`) on a
dataset (:mod:`sharpness_jax.data`) with full-batch GD, SGD (with or without replacement),
SGD with heavy-ball momentum or Adam, measures curvature along the way, and returns a
:class:`TrainResult`. With a ``workdir`` everything is recorded there (see
:mod:`sharpness_jax.records`) and a rerun with the same workdir resumes exactly; without one
the run is held in memory (for notebooks).

The loop, for step s = 0, 1, … with parameters θ_s:

1. goals: every ``goal_every`` steps and at every measurement step, the full training loss
   L(θ_s) and accuracy are evaluated; the run stops with status ``"goal_reached"`` when
   ``train_loss <= train_loss_goal`` or ``train_accuracy >= train_accuracy_goal``;
2. measurements: at the steps of the ``measure`` schedule (and at the final step) every
   measurement named in ``measure.names`` runs and one row ``{"step": s, ...}`` is appended;
3. checkpoint: every ``checkpoint_every`` steps and at the final step;
4. stop with ``"completed"`` at s = ``max_steps``;
5. update: the batch B_s = sampler.indices(s) (a pure function of (seed, s)), the mini-batch
   loss L_B(θ_s) = (1/|B|) Σ_{p∈B} ℓ_p(θ_s) and its gradient, θ_{s+1} = θ_s + optax update.
   If L_B(θ_s) is not finite, exceeds ``loss_limit``, or θ_{s+1} is not finite, the run stops
   with status ``"diverged"`` at step s and keeps θ_s — never an exception.

Measurements are functions registered by name (:func:`register_measurement`, the
``MEASUREMENTS`` registry). Each gets a :class:`MeasureContext` and returns a dict of scalars
(stored in the row) and arrays (stored in ``arrays/step_*.npz`` beside the metrics). Core ones:

========================== =================================================================
``loss``                   ``train_loss``, ``test_loss``: L(θ) = (1/n) Σ_p ℓ_p(θ) on the full
                           splits (the training objective: label smoothing included, weight
                           decay not)
``accuracy``               ``train_accuracy``, ``test_accuracy``: fraction with
                           argmax_k f_k(x_p) = y_p (integer labels only)
``lambda_max``             λ_max(H) of H = ∇²L on the measurement batch by Lanczos
                           (``linalg.lanczos_top_k`` on ``operators.hessian``), warm-started
                           from the previous measurement's eigenvectors
``trace_hessian``          tr(H) on the measurement batch: Hutchinson or XTrace with standard
                           error, or exact (P Hessian-vector products, small P only)
``trace_gradient_covariance`` tr(C) = (1/n) Σ_p ‖g_p − ḡ‖² on the measurement batch, exactly
                           from chunked per-example gradients, or by Hutchinson on
                           ``operators.gradient_covariance``
``gradient_norm``          ‖∇L(θ)‖ on the measurement batch
========================== =================================================================

The measurement batch is a fixed subset of at most ``measure_subset`` training examples
(drawn once with ``numpy.random.default_rng(0)``, the same for every seed; all of them when n
is smaller).

Registering a measurement (a function of a :class:`MeasureContext` returning a dict)::

    def top_eigenvalue_of_ggn(ctx):
        def top(params, batch, key):
            ggn = sj.ggn(ctx.objective, params, batch, chunk_size=ctx.chunk_size)
            return sj.lanczos_top_k(ggn, params, k=1, key=key,
                                    num_iters=ctx.options["num_iters"]).values[0]

        return {"ggn_lambda_max": ctx.jit(top)(ctx.params, ctx.batch, ctx.key)}

    register_measurement("ggn_lambda_max", top_eigenvalue_of_ggn, defaults={"num_iters": 30})

then ``config.measure.names = ("loss", "ggn_lambda_max")`` and, optionally,
``config.measure.options.ggn_lambda_max.num_iters = 50``. ``ctx.jit`` compiles once and the
compiled function is reused at every step and by later runs whose configs differ only in the
seed or the stop rules, so it may close over ``ctx.objective``, ``ctx.options`` and the config,
but everything that changes between steps or seeds (params, batch, key, warm-start state from
``ctx.state``) must be an argument. Results with a leading axis are saved beside the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from ml_collections import config_dict

from sharpness_jax import checks, data, linalg, minibatch, models, operators, records
from sharpness_jax.objective import LOSSES, Batch, Objective, get_loss
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any

__all__ = [
    "MEASUREMENTS",
    "OPTIMIZERS",
    "RESUMABLE_FIELDS",
    "SCHEDULES",
    "MeasureContext",
    "Measurement",
    "RunInfo",
    "TrainResult",
    "default_config",
    "learning_rate_schedule",
    "load_checkpoint",
    "make_optimizer",
    "measure",
    "measurement_steps",
    "register_measurement",
    "resolve_config",
    "train",
    "validate_config",
]

OPTIMIZERS = ("gd", "sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "linear")
WEIGHT_DECAY_TYPES = ("decoupled", "l2")
DTYPES = ("float32", "float64")

# Fields that only say where a run stops, how often it checkpoints or how it reports: they may
# change when a run is resumed. Every other field changes results and must match.
RESUMABLE_FIELDS = (
    "max_steps",
    "train_accuracy_goal",
    "train_loss_goal",
    "goal_every",
    "loss_limit",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "progress_bar",
    "mesh",
)

# Tags folded into the seed's key so that the random streams for different purposes differ.
_TAG_INIT, _TAG_MEASURE = 1, 2
_SUBSET_SEED = 0  # the measurement subset is fixed across seeds


# ============================================================================= config


def default_config() -> ml_collections.ConfigDict:
    """The default config; every field documented.

    ``dataset``: ``name`` (one of ``data.DATASETS``, "mnist5k") plus any keyword option of
      ``data.load_dataset`` (``num_train``, ``num_test``, ``standardize``, ``seed`` (the
      data split's seed), ``flatten``, ...). ``dtype`` is set from the top-level ``dtype``.
    ``model``: ``name`` (one of ``models.MODELS``, "mlp") plus any option of
      ``models.build_model`` (``widths``, ``activation``, ``init``, ...). ``param_dtype`` is
      set from the top-level ``dtype``.
    ``loss``: ``name`` ("cross_entropy" | "squared_error_half" | "squared_error_sum" |
      "softmax_squared_error", see
      ``objective.LOSSES``) and ``label_smoothing`` (0.0; cross-entropy only).
    ``optimizer``:
      ``name``: "gd" (full batch) | "sgd" | "momentum" (heavy ball, v ← g + μv, θ ← θ − ηv,
        optax.trace; ``nesterov`` option) | "adam" (optax.scale_by_adam).
      ``learning_rate``: η > 0 (0.01).
      ``momentum``: μ in [0, 1) for "momentum" (0.9). ``nesterov``: False.
      ``b1``, ``b2``, ``eps``: Adam's (0.9, 0.999, 1e-8).
      ``weight_decay``: λ ≥ 0 (0.0). ``weight_decay_type``: "decoupled" (θ ← θ − η_t(u + λθ)
        with u the optimizer's direction: AdamW for Adam) or "l2" (λθ added to the gradient
        before the optimizer, the gradient of (λ/2)‖θ‖²).
      ``schedule``: "constant" | "cosine" (to ``end_factor``·η at ``decay_steps``) | "linear"
        (likewise, linear); each after a linear warmup from 0 over ``warmup_steps`` (0).
      ``decay_steps``: None → ``max_steps`` for a decaying schedule (resolved and stored;
        unused by "constant"). ``end_factor``: 0.0.
    ``batch_size``: None (full batch) or B in [1, n].
    ``replace``: False: batches without replacement (epoch-wise permutations); True: i.i.d.
      uniform indices. See ``minibatch.Sampler``.
    ``seed``: seeds the initialisation, the batches and the measurements' keys (0).
    ``max_steps``: number of updates (1000). ``0`` only measures the initial parameters.
    ``train_accuracy_goal``: stop once the full training accuracy is ≥ this (None).
    ``train_loss_goal``: stop once the full training loss is ≤ this (None).
    ``goal_every``: evaluate the goals every this many steps (0: at measurement steps only).
    ``loss_limit``: divergence when the mini-batch loss exceeds this (None: non-finite only).
    ``measure``:
      ``names``: measurement names from ``MEASUREMENTS`` ("loss", "accuracy").
      ``options``: per-name options, e.g. ``options.lambda_max.k = 2`` (defaults from the
        registry).
      ``every``: measure at multiples of this step (100; 0: off).
      ``steps``: extra explicit steps (()).
      ``num_log_steps``: extra log-spaced steps, round(geomspace(1, log_max_step, count)) and
        step 0 (0: off). ``log_max_step``: None → ``max_steps`` when ``num_log_steps`` > 0
        (resolved and stored).
      ``final``: also measure at the step where the run stops (True).
      ``exact_param_limit``: refuse exact O(P)-matvec methods (exact traces, dense matrices)
        above this many parameters (10_000).
    ``measure_subset``: at most this many training examples for the measurements on the
      measurement batch (4096; None: all).
    ``checkpoint_every``: checkpoint every this many steps (1000; 0: only the final step).
      ``keep_checkpoints``: the last few kept (3).
    ``chunk_size``: examples per chunk in every sum over examples, training included (None:
      all at once); bounds memory.
    ``dtype``: "float32" | "float64" for data and parameters ("float32"; float64 needs
      ``jax_enable_x64``).
    ``log_every``: a progress line every this many steps (100; 0: off).
    ``progress_bar``: draw a progress bar when stderr is a terminal (True).
    ``mesh``: where the data lives. None: one device (the default device). "auto": a 1-D
      mesh over all devices (all hosts after ``jax.distributed.initialize``); an int d: the
      first d devices. Every example array is sharded along its example axis over the mesh
      (arrays whose example count the mesh size does not divide are replicated, with a
      warning), parameters and optimizer state are replicated, and the jitted step and
      measurements run data-parallel (XLA's SPMD partitioner). Results equal the one-device
      results up to the order of floating-point sums; a run may resume on another mesh.
    """
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict({"name": "mnist5k"})
    c.model = ml_collections.ConfigDict({"name": "mlp"})
    c.loss = ml_collections.ConfigDict({"name": "cross_entropy", "label_smoothing": 0.0})
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.01,
            "momentum": 0.9,
            "nesterov": False,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "weight_decay_type": "decoupled",
            "schedule": "constant",
            "warmup_steps": 0,
            "decay_steps": config_dict.placeholder(int),
            "end_factor": 0.0,
        }
    )
    c.batch_size = config_dict.placeholder(int)
    c.replace = False
    c.seed = 0
    c.max_steps = 1000
    c.train_accuracy_goal = config_dict.placeholder(float)
    c.train_loss_goal = config_dict.placeholder(float)
    c.goal_every = 0
    c.loss_limit = config_dict.placeholder(float)
    c.measure = ml_collections.ConfigDict(
        {
            "names": ("loss", "accuracy"),
            "options": ml_collections.ConfigDict(),
            "every": 100,
            "steps": (),
            "num_log_steps": 0,
            "log_max_step": config_dict.placeholder(int),
            "final": True,
            "exact_param_limit": 10_000,
        }
    )
    c.measure_subset = 4096
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.chunk_size = config_dict.placeholder(int)
    c.dtype = "float32"
    c.log_every = 100
    c.progress_bar = True
    c.mesh = config_dict.placeholder(object)
    return c


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    raise TypeError(f"config must be a ConfigDict or a mapping, got {type(config).__name__}")


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config(config: Any) -> ml_collections.ConfigDict:
    """The full config: defaults filled in, and values derived from ``max_steps`` resolved.

    ``optimizer.decay_steps`` (of a decaying schedule) and ``measure.log_max_step`` (with
    log-spaced measurements) default to ``max_steps``; they are resolved here so that the
    stored config says what the run did. A run may then be resumed with a larger
    ``max_steps`` exactly when its schedules do not depend on it.

    Args:
      config: a (partial) ConfigDict or nested mapping; missing fields take the defaults of
        :func:`default_config`. Dataset, model and measurement options are taken as given.

    Returns:
      An unlocked ConfigDict.
    """
    base = default_config().to_dict()
    given = _as_dict(config)
    for section in ("dataset", "model"):  # options of one name do not carry to another
        if section in given and "name" in given[section]:
            base[section] = {"name": given[section]["name"]}
    merged = _merge(base, given)
    opt, meas = merged["optimizer"], merged["measure"]
    if opt.get("decay_steps") is None and opt.get("schedule") != "constant":
        opt["decay_steps"] = merged["max_steps"]
    if meas.get("log_max_step") is None and meas.get("num_log_steps"):
        meas["log_max_step"] = merged["max_steps"]
    for key in ("names", "steps"):
        if isinstance(meas.get(key), str):
            meas[key] = (meas[key],)
        meas[key] = tuple(meas.get(key) or ())
    return ml_collections.ConfigDict(merged)


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_config(config: Any) -> ml_collections.ConfigDict:
    """Checks everything that can be checked without the data; returns the resolved config.

    Sizes that need the data or the model (batch size vs n, parameter counts for exact
    methods) are checked by :func:`train` after loading the data and before compiling.

    Raises:
      ValueError: naming the offending field.
    """
    c = resolve_config(config)
    _require(
        c.dataset.name in data.DATASETS,
        f"unknown dataset {c.dataset.name!r}; choose one of {data.DATASETS}",
    )
    _require(
        c.model.name in models.MODELS,
        f"unknown model {c.model.name!r}; choose one of {models.MODELS}",
    )
    _require(c.loss.name in LOSSES, f"unknown loss {c.loss.name!r}; choose one of {sorted(LOSSES)}")
    get_loss(c.loss.name, label_smoothing=c.loss.label_smoothing)  # checks the smoothing
    _require(c.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {c.dtype!r}")
    if c.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "dtype='float64' needs 64-bit JAX: jax.config.update('jax_enable_x64', True) "
            "before creating any array"
        )
    for section, key in (("dataset", "dtype"), ("model", "param_dtype")):
        given = c[section].get(key)
        _require(
            given is None or np.dtype(given).name == c.dtype,
            f"{section}.{key}={given!r} contradicts dtype={c.dtype!r}; set only `dtype`",
        )

    _require(
        c.mesh in (None, "auto") or (_is_int(c.mesh) and 1 <= c.mesh <= jax.device_count()),
        f"mesh must be None, 'auto' or a device count in [1, {jax.device_count()}], got {c.mesh!r}",
    )
    o = c.optimizer
    _require(o.name in OPTIMIZERS, f"unknown optimizer {o.name!r}; choose one of {OPTIMIZERS}")
    _require(
        _is_number(o.learning_rate) and o.learning_rate > 0,
        f"optimizer.learning_rate must be a positive number, got {o.learning_rate!r}",
    )
    _require(
        _is_number(o.momentum) and 0 <= o.momentum < 1,
        f"optimizer.momentum must lie in [0, 1), got {o.momentum!r}",
    )
    _require(
        _is_number(o.weight_decay) and o.weight_decay >= 0,
        f"optimizer.weight_decay must be >= 0, got {o.weight_decay!r}",
    )
    _require(
        o.weight_decay_type in WEIGHT_DECAY_TYPES,
        f"optimizer.weight_decay_type must be one of {WEIGHT_DECAY_TYPES}, got "
        f"{o.weight_decay_type!r}",
    )
    _require(
        o.schedule in SCHEDULES,
        f"unknown optimizer.schedule {o.schedule!r}; choose one of {SCHEDULES}",
    )
    _require(
        _is_int(o.warmup_steps) and o.warmup_steps >= 0,
        f"optimizer.warmup_steps must be a non-negative int, got {o.warmup_steps!r}",
    )
    _require(
        o.schedule == "constant"
        or (_is_int(o.decay_steps) and o.decay_steps >= max(o.warmup_steps, 1)),
        f"optimizer.decay_steps must be an int >= max(warmup_steps, 1), got {o.decay_steps!r}",
    )
    _require(
        _is_number(o.end_factor) and o.end_factor >= 0,
        f"optimizer.end_factor must be >= 0, got {o.end_factor!r}",
    )
    _require(
        0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps >= 0,
        "optimizer.b1 and b2 must lie in [0, 1) and eps must be >= 0",
    )

    _require(
        c.batch_size is None or (_is_int(c.batch_size) and c.batch_size > 0),
        f"batch_size must be None (full batch) or a positive int, got {c.batch_size!r}",
    )
    _require(isinstance(c.replace, bool), f"replace must be a bool, got {c.replace!r}")
    _require(_is_int(c.seed) and c.seed >= 0, f"seed must be a non-negative int, got {c.seed!r}")
    _require(
        _is_int(c.max_steps) and c.max_steps >= 0,
        f"max_steps must be a non-negative int, got {c.max_steps!r}",
    )
    _require(
        c.train_accuracy_goal is None or 0 < c.train_accuracy_goal <= 1,
        f"train_accuracy_goal must lie in (0, 1] or be None, got {c.train_accuracy_goal}",
    )
    _require(
        c.train_loss_goal is None or c.train_loss_goal >= 0,
        f"train_loss_goal must be >= 0 or None, got {c.train_loss_goal}",
    )
    _require(
        _is_int(c.goal_every) and c.goal_every >= 0,
        f"goal_every must be a non-negative int, got {c.goal_every!r}",
    )
    _require(
        c.loss_limit is None or (_is_number(c.loss_limit) and c.loss_limit > 0),
        f"loss_limit must be positive or None, got {c.loss_limit!r}",
    )
    _require(
        c.measure_subset is None or (_is_int(c.measure_subset) and c.measure_subset > 0),
        f"measure_subset must be a positive int or None, got {c.measure_subset!r}",
    )
    _require(
        _is_int(c.checkpoint_every) and c.checkpoint_every >= 0,
        f"checkpoint_every must be a non-negative int, got {c.checkpoint_every!r}",
    )
    _require(
        _is_int(c.keep_checkpoints) and c.keep_checkpoints >= 1,
        f"keep_checkpoints must be a positive int, got {c.keep_checkpoints!r}",
    )
    _require(
        _is_int(c.log_every) and c.log_every >= 0,
        f"log_every must be a non-negative int, got {c.log_every!r}",
    )
    try:
        checks.check_chunk_size(c.chunk_size)
    except TypeError as e:
        raise ValueError(f"chunk_size: {e}") from e

    m = c.measure
    _require(
        _is_int(m.every) and m.every >= 0,
        f"measure.every must be a non-negative int, got {m.every!r}",
    )
    _require(
        all(_is_int(s) and s >= 0 for s in m.steps),
        f"measure.steps must be non-negative ints, got {m.steps!r}",
    )
    _require(
        _is_int(m.num_log_steps) and m.num_log_steps >= 0,
        f"measure.num_log_steps must be a non-negative int, got {m.num_log_steps!r}",
    )
    _require(
        not m.num_log_steps or (_is_int(m.log_max_step) and m.log_max_step >= 0),
        f"measure.log_max_step must be a non-negative int, got {m.log_max_step!r}",
    )
    _require(
        _is_int(m.exact_param_limit) and m.exact_param_limit > 0,
        f"measure.exact_param_limit must be a positive int, got {m.exact_param_limit!r}",
    )
    unknown = [n for n in m.names if n not in MEASUREMENTS]
    _require(
        not unknown,
        f"unknown measurement(s) {unknown}; registered: {sorted(MEASUREMENTS)} (add one "
        "with register_measurement)",
    )
    _require(len(set(m.names)) == len(m.names), f"measure.names repeats a name: {m.names}")
    stray = sorted(set(m.options) - set(m.names))
    _require(not stray, f"measure.options given for {stray}, which are not in measure.names")
    for name in m.names:
        _measurement_options(name, m.options.get(name, {}))
    return c


def _measurement_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    spec = MEASUREMENTS[name]
    given = dict(given.to_dict() if hasattr(given, "to_dict") else given)
    unknown = sorted(set(given) - set(spec.defaults))
    _require(
        not unknown,
        f"measurement {name!r} takes no option(s) {unknown}; its options and defaults: "
        f"{dict(spec.defaults)}",
    )
    return {**spec.defaults, **given}


# ============================================================================= optimizer


def learning_rate_schedule(config: Any) -> optax.Schedule | float:
    """η_t of ``config.optimizer`` (a float for a constant rate without warmup).

    Linear warmup 0 → η over ``warmup_steps``, then constant, cosine or linear decay to
    ``end_factor``·η at step ``decay_steps`` (counted from step 0, warmup included).
    """
    c = resolve_config(config)
    o = c.optimizer
    lr, warm = float(o.learning_rate), int(o.warmup_steps)
    if o.schedule == "constant":
        if not warm:
            return lr
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm]
        )
    total, end = int(o.decay_steps), float(o.end_factor) * lr
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, total, end_value=end)
    decay = optax.linear_schedule(lr, end, max(total - warm, 1))
    if not warm:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """The optax transformation of ``config.optimizer``.

    chain(L2 term (``weight_decay_type="l2"``), direction (identity for gd/sgd, optax.trace
    for momentum, scale_by_adam for adam), decoupled decay (``"decoupled"``), −η_t).
    """
    c = resolve_config(config)
    o = c.optimizer
    dtype = jnp.dtype(c.dtype)
    schedule = learning_rate_schedule(c)
    if callable(schedule):
        base = schedule
        schedule = lambda count: jnp.asarray(base(count), dtype)  # keep the params' dtype
    parts = []
    if o.weight_decay and o.weight_decay_type == "l2":
        parts.append(optax.add_decayed_weights(o.weight_decay))
    if o.name == "momentum":
        parts.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))
    elif o.name == "adam":
        parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
    if o.weight_decay and o.weight_decay_type == "decoupled":
        parts.append(optax.add_decayed_weights(o.weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return _standard_promotion(optax.chain(*parts))


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` evaluated under standard dtype promotion.

    optax mixes int32 step counts with Python floats (e.g. Adam's bias correction
    1 − β^t), which ``jax_numpy_dtype_promotion="strict"`` rejects. ``optax.apply_updates``
    casts the result back to the parameters' dtype.
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


# ============================================================================= measurements


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
    that changes between steps (params, key, warm-start state) as an argument of ``f``.
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


class _Programs:
    """The jitted functions of one setup: model, loss, dtype, chunk size and data shapes.

    Runs that share a setup (other seeds, a resumed or repeated run, another optimizer) reuse
    them: a repeated run compiles nothing again.
    """

    def __init__(self, model, objective, chunk_size, integer_labels):
        self.model = model
        self.objective = objective
        self.chunk_size = chunk_size
        self.integer_labels = integer_labels
        self.compiled: dict[tuple[str, str, Any], Callable] = {}
        self.optimizers: dict[str, optax.GradientTransformation] = {}
        self.traces: Counter[str] = Counter()

    def jit(
        self, scope: str, name: str, fn: Callable, *, owner: Any = None, **jit_kwargs
    ) -> Callable:
        """``jax.jit(fn)`` created once per (scope, name, owner); traces counted under ``name``.

        ``owner`` is the registered measurement function, so that re-registering a name
        compiles the new function instead of reusing the old one.
        """
        key = (scope, name, owner)
        if key not in self.compiled:

            def counted(*args, **kwargs):
                self.traces[name] += 1
                return fn(*args, **kwargs)

            counted.__name__ = counted.__qualname__ = name.replace("/", "_")
            self.compiled[key] = jax.jit(counted, **jit_kwargs)
        return self.compiled[key]

    def optimizer(self, c: ml_collections.ConfigDict) -> tuple[str, optax.GradientTransformation]:
        """The optax transformation of ``c.optimizer`` and its cache key."""
        key = json.dumps(records.encode_value(c.optimizer.to_dict()), sort_keys=True)
        if key not in self.optimizers:
            self.optimizers[key] = make_optimizer(c)
        return key, self.optimizers[key]

    def train_step(self, c: ml_collections.ConfigDict) -> Callable:
        """(θ, opt_state, data, idx, limit) -> (θ', opt_state', L_B(θ)); θ' = θ if diverged."""
        key, tx = self.optimizer(c)
        objective, chunk_size = self.objective, self.chunk_size

        def train_step(params, opt_state, batch_data, idx, limit):
            batch = batch_data if idx is None else jax.tree.map(lambda a: a[idx], batch_data)
            loss, grads = _loss_and_grad(objective, params, batch, chunk_size)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            ok = jnp.isfinite(loss) & (loss <= limit) & _all_finite(new_params)
            keep = lambda new, old: jnp.where(ok, new, old)
            return (
                jax.tree.map(keep, new_params, params),
                jax.tree.map(keep, new_opt_state, opt_state),
                loss,
            )

        return self.jit(key, "train_step", train_step, donate_argnums=(0, 1))

    def evaluate(self) -> Callable:
        """(θ, batch) -> (Σ_p ℓ_p(θ), number of correct argmax predictions)."""
        objective, chunk_size, labels = self.objective, self.chunk_size, self.integer_labels

        def evaluate(params, batch):
            def chunk_fn(chunk, mask, index):
                del index
                chunk = Batch(*chunk)
                outputs = objective.batch_outputs(params, chunk.inputs)
                losses = jax.vmap(objective.loss)(outputs, chunk.targets)
                total = jnp.sum(jnp.where(mask, losses, 0))
                if not labels:
                    return total, jnp.zeros((), jnp.int32)
                predicted = jnp.argmax(outputs, axis=-1).astype(chunk.targets.dtype)
                hit = (predicted == chunk.targets) & mask
                return total, jnp.sum(hit.astype(jnp.int32))

            return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)

        return self.jit("", "evaluate", evaluate)


_PROGRAMS: dict[str, _Programs] = {}
_MAX_PROGRAMS = 4


def _programs_for(c: ml_collections.ConfigDict, input_shape, num_outputs, labels) -> _Programs:
    """The (cached) programs of the setup of config ``c`` on data of the given shape."""
    setup = {
        "model": c.model.to_dict(),
        "loss": c.loss.to_dict(),
        "dtype": c.dtype,
        "chunk_size": c.chunk_size,
        "input_shape": list(input_shape),
        "num_outputs": num_outputs,
        "integer_labels": labels,
    }
    key = json.dumps(records.encode_value(setup), sort_keys=True)
    if key not in _PROGRAMS:
        model_options = {
            k: v for k, v in setup["model"].items() if k not in ("name", "param_dtype")
        }
        model = models.build_model(
            c.model.name,
            input_shape=tuple(input_shape),
            num_outputs=num_outputs,
            param_dtype=c.dtype,
            **model_options,
        )
        loss = get_loss(c.loss.name, label_smoothing=c.loss.label_smoothing)
        programs = _Programs(model, Objective(model.predict, loss), c.chunk_size, labels)
        while len(_PROGRAMS) >= _MAX_PROGRAMS:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = programs
    return _PROGRAMS[key]


class _Runtime:
    """One run's view of its programs: the measurement scope and the evaluation memo."""

    def __init__(self, programs: _Programs, scope: str):
        self.programs = programs
        self.scope = scope
        self.memo: dict[tuple[int, str], dict[str, float]] = {}

    @property
    def chunk_size(self) -> int | None:
        return self.programs.chunk_size

    def jit(self, name: str, fn: Callable, *, owner: Any = None, **jit_kwargs) -> Callable:
        return self.programs.jit(self.scope, name, fn, owner=owner, **jit_kwargs)

    def evaluate(self, params: PyTree, batch: Batch, step: int, split: str) -> dict[str, float]:
        """Full-split mean loss and accuracy at ``step``, computed once per (step, split)."""
        memo_key = (step, split)
        if memo_key not in self.memo:
            n = checks.num_examples(batch)
            total, correct = self.programs.evaluate()(params, batch)
            if any(s != step for s, _ in self.memo):
                self.memo.clear()
            self.memo[memo_key] = {
                "loss": float(total) / n,
                "accuracy": float(correct) / n if self.programs.integer_labels else math.nan,
            }
        return self.memo[memo_key]


@dataclasses.dataclass(frozen=True)
class MeasureContext:
    """What a measurement function receives.

    Attributes:
      name: the measurement's name.
      step: the training step s (θ = θ_s).
      objective: the training objective (model and loss; the mean over a batch).
      params: θ_s.
      batch: the measurement batch (a fixed subset of ≤ ``measure_subset`` training examples).
      train, test: the full splits (device arrays).
      key: a PRNG key derived from (seed, step, name): the same on a resumed run.
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
    options: Mapping[str, Any]
    state: dict[str, Any]
    info: RunInfo
    config: ml_collections.FrozenConfigDict
    _runtime: _Runtime

    @property
    def chunk_size(self) -> int | None:
        """``config.chunk_size``: examples per chunk for sums over examples."""
        return self._runtime.chunk_size

    def jit(self, fn: Callable, *, name: str = "", **jit_kwargs) -> Callable:
        """``jax.jit(fn)``, created once per measurement (and ``name``) and reused.

        The first call's ``fn`` is kept and reused at every step and by later runs whose
        configs differ only in the seed or the stop rules: it may close over the objective,
        the options and the config, but must take everything that changes between steps or
        seeds (params, batch, key, state) as arguments. Use ``name`` for a second function.
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


def _measure_loss(ctx: MeasureContext) -> dict[str, float]:
    return {f"{s}_loss": ctx.evaluate(s)["loss"] for s in ("train", "test")}


def _measure_accuracy(ctx: MeasureContext) -> dict[str, float]:
    return {f"{s}_accuracy": ctx.evaluate(s)["accuracy"] for s in ("train", "test")}


def _check_accuracy(options: Mapping[str, Any], info: RunInfo) -> None:
    del options
    _require(
        info.integer_labels,
        "the 'accuracy' measurement needs integer class labels; this dataset has real "
        "targets (use 'loss')",
    )


def _lambda_max(ctx: MeasureContext) -> dict[str, Any]:
    """λ_1 ≥ … ≥ λ_k of H = ∇²L on the measurement batch (Lanczos, warm-started)."""
    opts = ctx.options
    k = int(opts["k"])

    def top(params, batch, key, init):
        hvp = operators.hessian(ctx.objective, params, batch, chunk_size=ctx.chunk_size)
        return linalg.lanczos_top_k(
            hvp, params, k=k, num_iters=opts["num_iters"], key=key, init=init, tol=opts["tol"]
        )

    init = ctx.state.get("vectors")
    if init is None:  # zero vectors: Lanczos then starts from the random vector alone
        init = jax.tree.map(lambda p: jnp.zeros_like(p, shape=(k, *p.shape)), ctx.params)
    eig = ctx.jit(top)(ctx.params, ctx.batch, ctx.key, init)
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


def _check_lambda_max(options: Mapping[str, Any], info: RunInfo) -> None:
    k, iters = options["k"], options["num_iters"]
    _require(
        _is_int(k) and 1 <= k <= info.num_params,
        f"lambda_max: k must be an int in [1, P={info.num_params}], got {k!r}",
    )
    _require(_is_int(iters) and iters >= k, f"lambda_max: num_iters must be >= k, got {iters!r}")
    _require(options["tol"] is None or options["tol"] > 0, "lambda_max: tol must be > 0 or None")


def _trace_hessian(ctx: MeasureContext) -> dict[str, Any]:
    """tr(H) on the measurement batch: exact, Hutchinson or XTrace (value ± standard error)."""
    opts = ctx.options
    method = opts["method"]

    def trace(params, batch, key):
        hvp = operators.hessian(ctx.objective, params, batch, chunk_size=ctx.chunk_size)
        if method == "exact":
            value = linalg.trace_exact(hvp, params, chunk_size=opts["basis_chunk"])
            return value, jnp.zeros_like(value)
        estimator = linalg.hutchinson_trace if method == "hutchinson" else linalg.xtrace
        est = estimator(hvp, params, key=key, num_probes=opts["num_probes"])
        return est.value, est.stderr

    value, stderr = ctx.jit(trace)(ctx.params, ctx.batch, ctx.key)
    if method == "exact":
        return {"trace_hessian": value}
    return {"trace_hessian": value, "trace_hessian_stderr": stderr}


def _check_trace_hessian(options: Mapping[str, Any], info: RunInfo) -> None:
    method = options["method"]
    _require(
        method in ("exact", "hutchinson", "xtrace"),
        f"trace_hessian: method must be 'exact', 'hutchinson' or 'xtrace', got {method!r}",
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
        _require(
            _is_int(options["num_probes"]) and options["num_probes"] >= 2,
            "trace_hessian: num_probes must be an int >= 2 (for a standard error)",
        )


def _trace_gradient_covariance(ctx: MeasureContext) -> dict[str, Any]:
    """tr(C), C = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ on the measurement batch."""
    opts = ctx.options
    objective, chunk_size = ctx.objective, ctx.chunk_size

    if opts["method"] == "exact":

        def trace(params, batch, key):
            del key
            n = checks.num_examples(batch)
            g_bar = operators.gradient(objective, params, batch, chunk_size=chunk_size)
            grad = jax.grad(objective.example_loss)

            def chunk_fn(chunk, mask, index):
                del index
                g = jax.vmap(grad, in_axes=(None, 0, 0))(params, *chunk)
                sq = sum(
                    jnp.sum(jnp.square(a - b[None]).reshape(a.shape[0], -1), axis=1)
                    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_bar), strict=True)
                )
                return jnp.sum(jnp.where(mask, sq, 0))

            value = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n
            return value, jnp.zeros_like(value)

    else:

        def trace(params, batch, key):
            cov = operators.gradient_covariance(objective, params, batch, chunk_size=chunk_size)
            est = linalg.hutchinson_trace(cov, params, key=key, num_probes=opts["num_probes"])
            return est.value, est.stderr

    value, stderr = ctx.jit(trace)(ctx.params, ctx.batch, ctx.key)
    if opts["method"] == "exact":
        return {"trace_gradient_covariance": value}
    return {"trace_gradient_covariance": value, "trace_gradient_covariance_stderr": stderr}


_PER_EXAMPLE_MEMORY_LIMIT = 2**28  # numbers held at once by exact per-example gradients


def _check_trace_gradient_covariance(options: Mapping[str, Any], info: RunInfo) -> None:
    method = options["method"]
    _require(
        method in ("exact", "hutchinson"),
        f"trace_gradient_covariance: method must be 'exact' or 'hutchinson', got {method!r}",
    )
    if method == "exact":
        per_chunk = min(info.chunk_size or info.num_measure, info.num_measure)
        _require(
            per_chunk * info.num_params <= _PER_EXAMPLE_MEMORY_LIMIT,
            f"trace_gradient_covariance: method='exact' holds chunk × P = {per_chunk:,} × "
            f"{info.num_params:,} per-example gradient entries at once; set chunk_size "
            f"so that chunk_size·P <= {_PER_EXAMPLE_MEMORY_LIMIT:,}, or use "
            "method='hutchinson'",
        )
    else:
        _require(
            _is_int(options["num_probes"]) and options["num_probes"] >= 2,
            "trace_gradient_covariance: num_probes must be an int >= 2",
        )


def _gradient_norm(ctx: MeasureContext) -> dict[str, Any]:
    """‖∇L(θ)‖₂ on the measurement batch."""

    def norm(params, batch):
        g = operators.gradient(ctx.objective, params, batch, chunk_size=ctx.chunk_size)
        return optax.tree.norm(g)

    return {"gradient_norm": ctx.jit(norm)(ctx.params, ctx.batch)}


register_measurement("loss", _measure_loss)
register_measurement("accuracy", _measure_accuracy, check=_check_accuracy)
register_measurement(
    "lambda_max",
    _lambda_max,
    defaults={"k": 1, "num_iters": 50, "tol": 1e-6, "warm_start": True},
    check=_check_lambda_max,
)
register_measurement(
    "trace_hessian",
    _trace_hessian,
    defaults={"method": "hutchinson", "num_probes": 100, "basis_chunk": 64},
    check=_check_trace_hessian,
)
register_measurement(
    "trace_gradient_covariance",
    _trace_gradient_covariance,
    defaults={"method": "exact", "num_probes": 100},
    check=_check_trace_gradient_covariance,
)
register_measurement("gradient_norm", _gradient_norm)


# ============================================================================= schedule


def measurement_steps(config: Any, *, up_to: int | None = None) -> list[int]:
    """The scheduled measurement steps ≤ ``up_to`` (default ``max_steps``), final step aside."""
    c = resolve_config(config)
    m = c.measure
    up_to = c.max_steps if up_to is None else up_to
    return [s for s in range(up_to + 1) if _scheduled(s, m.every, _fixed_steps(c))]


def _fixed_steps(c: ml_collections.ConfigDict) -> frozenset[int]:
    m = c.measure
    steps = set(m.steps)
    if m.num_log_steps:
        steps.add(0)
        if m.log_max_step >= 1:
            grid = np.geomspace(1, m.log_max_step, m.num_log_steps)
            steps.update(int(s) for s in np.unique(np.rint(grid)))
    return frozenset(steps)


def _scheduled(step: int, every: int, fixed: frozenset[int]) -> bool:
    return (every > 0 and step % every == 0) or step in fixed


# ============================================================================= training


class TrainResult(NamedTuple):
    """The outcome of :func:`train`.

    Attributes:
      params: the final parameters (θ at ``step``; for a diverged run the last finite θ).
      opt_state: the final optimizer state.
      step: the step the run stopped at.
      status: "completed" | "goal_reached" | "diverged".
      metrics: the last metrics row ({} if none).
      rows: all metrics rows of the run (read back from ``metrics.jsonl`` with a workdir).
      arrays: ``{step: {name: array}}`` of the measurements' arrays in memory mode (with a
        workdir use ``records.load_arrays(workdir, row)``).
      resumed_from: the checkpoint step the run resumed from (None for a fresh run).
      traces: how often each jitted function was traced (``"train_step"``, ``"evaluate"``,
        one per measurement): a run compiles each at most once per input shape.
      workdir: the workdir, or None.
    """

    params: PyTree
    opt_state: PyTree
    step: int
    status: str
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    arrays: dict[int, dict[str, np.ndarray]]
    resumed_from: int | None
    traces: dict[str, int]
    workdir: str | None


def _num_params(model: models.Model, key: jax.Array) -> int:
    shapes = jax.eval_shape(model.init, key)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def _batch_indices(sampler: minibatch.Sampler | None, step: int) -> np.ndarray | None:
    """The training batch of ``step`` (None: the full batch)."""
    return None if sampler is None else sampler.indices(step)


def _loss_and_grad(objective: Objective, params: PyTree, batch: Batch, chunk_size: int | None):
    """(L_B(θ), ∇L_B(θ)) with L_B = (1/|B|) Σ_{p∈B} ℓ_p, chunked over examples."""
    n = checks.num_examples(batch)

    def chunk_fn(chunk, mask, index):
        del index

        def total(p):
            return jnp.sum(jnp.where(mask, objective.batch_losses(p, Batch(*chunk)), 0))

        return jax.value_and_grad(total)(params)

    loss, grad = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    return loss / n, jax.tree.map(lambda g: g / n, grad)


def _all_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


class _Progress:
    """Progress lines (absl logging) and, on a terminal, a progress bar on stderr."""

    def __init__(self, start: int, max_steps: int, log_every: int, bar: bool):
        self.start, self.max_steps, self.log_every = start, max_steps, log_every
        self.bar = bar and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last_draw = 0.0

    def rate(self, step: int) -> float:
        elapsed = time.monotonic() - self.t0
        return (step - self.start) / elapsed if elapsed > 0 else math.nan

    def update(self, step: int, loss: float, row: Mapping[str, Any]) -> None:
        rate = self.rate(step)
        left = (self.max_steps - step) / rate if rate > 0 else math.nan
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
        if self.log_every and step % self.log_every == 0:
            latest = " ".join(
                f"{k}={v:.4g}" for k, v in row.items() if k != "step" and _is_number(v)
            )
            logging.info(
                "step %d/%d | %.1f steps/s | ETA %s | batch loss %.4g | row@%s %s",
                step,
                self.max_steps,
                rate,
                eta,
                loss,
                row.get("step", "-"),
                latest,
            )
        now = time.monotonic()
        if self.bar and (now - self.last_draw > 0.1 or step == self.max_steps):
            self.last_draw = now
            frac = step / self.max_steps if self.max_steps else 1.0
            filled = int(30 * frac)
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.max_steps} "
                f"{rate:.1f} it/s ETA {eta} loss {loss:.4g} "
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _goal_reached(c: ml_collections.ConfigDict, evaluation: Mapping[str, float] | None) -> bool:
    if not evaluation:
        return False
    loss_goal = c.train_loss_goal is not None and evaluation["loss"] <= c.train_loss_goal
    acc_goal = c.train_accuracy_goal is not None and evaluation["accuracy"] >= c.train_accuracy_goal
    return bool(loss_goal or acc_goal)


def _diverged(c: ml_collections.ConfigDict, loss: float) -> bool:
    return not math.isfinite(loss) or (c.loss_limit is not None and loss > c.loss_limit)


def train(config: Any, workdir: str | None = None, *, force: bool = False) -> TrainResult:
    """Trains ``config``'s model on its dataset, measuring along the way.

    Everything in the config is validated before anything compiles (see
    :func:`validate_config`; then the batch size against n, the exact methods against the
    parameter count P = Σ sizes of ``jax.eval_shape(model.init)``), and the initial
    parameters and the data are checked to be finite.

    With a ``workdir``, the config is stored in ``config.json`` (a rerun refuses a config that
    differs in a field outside ``RESUMABLE_FIELDS``, unless ``force``), rows are appended to
    ``metrics.jsonl``, checkpoints written every ``checkpoint_every`` steps and at the end, and
    ``status.json`` updated. Rerunning resumes from the latest complete checkpoint: the rows
    after it are dropped, and the batches (a function of (seed, step)), measurement keys and
    warm-start states are those of an uninterrupted run, so the rows come out identical.

    Args:
      config: a ConfigDict or nested mapping (missing fields: :func:`default_config`).
      workdir: the run directory; None keeps the run in memory (no checkpoints).
      force: continue a run in ``workdir`` even though its stored config differs.

    Returns:
      :class:`TrainResult`.

    Raises:
      ValueError: for an invalid config (before any compilation) or non-finite data or
        initial parameters; ``records.ConfigMismatchError`` for a conflicting stored config.
    """
    st = _setup(config)
    c, programs, model = st.config, st.programs, st.programs.model
    _, tx = programs.optimizer(c)
    params = st.placement.params(model.init(st.init_key))
    checks.check_finite(params, names=("initial params",))
    opt_state = st.placement.params(tx.init(params))
    traces_before = Counter(programs.traces)
    train_data = st.train
    n_train = checks.num_examples(train_data)
    sampler = (
        None
        if st.info.batch_size == n_train
        else minibatch.Sampler(n_train, st.info.batch_size, replace=c.replace, seed=c.seed)
    )
    limit = jnp.asarray(math.inf if c.loss_limit is None else c.loss_limit, c.dtype)
    step_fn = programs.train_step(c)
    fixed_steps = _fixed_steps(c)

    # ------------------------------------------------------------------ records / resume
    manager = None
    step = 0
    states: dict[str, dict[str, Any]] = {name: {} for name in c.measure.names}
    restored_meta: dict[str, Any] | None = None
    resumed_from: int | None = None
    if workdir is not None:
        records.init_workdir(workdir)
        records.write_config(workdir, c, ignore=RESUMABLE_FIELDS, force=force)
        manager = records.checkpoint_manager(workdir, max_to_keep=c.keep_checkpoints)
        ckpt = records.restore_checkpoint(manager, {"params": params, "opt_state": opt_state})
        if ckpt is not None:
            step = ckpt.step
            params = st.placement.params(ckpt.state["params"])
            opt_state = st.placement.params(ckpt.state["opt_state"])
            for name, state in ckpt.extra.items():
                if name in states:
                    states[name] = st.placement.params(dict(state))
            restored_meta = ckpt.meta
            resumed_from = ckpt.step
            logging.info("resuming %s from the checkpoint at step %d", workdir, step)
        records.truncate_metrics(workdir, max_step=None if ckpt is None else step)
        records.write_status(workdir, "running", step)
    rows_memory: list[dict[str, Any]] = []
    arrays_memory: dict[int, dict[str, np.ndarray]] = {}
    last_row: dict[str, Any] = {}
    if workdir is not None:
        previous = records.read_metrics(workdir)
        last_row = previous[-1] if previous else {}
    runtime = st.runtime

    def measure(step: int, params: PyTree) -> dict[str, Any]:
        row, arrays = _measure_row(st, states, step, params)
        if arrays:
            if workdir is not None:
                row["arrays"] = records.save_arrays(workdir, step, arrays)
            else:
                arrays_memory[step] = arrays
        return row

    def checkpoint(step, params, opt_state, evaluation):
        if manager is None:
            return
        records.save_checkpoint(
            manager,
            step,
            {"params": params, "opt_state": opt_state},
            extra=states,
            meta={"seed": c.seed, "train_evaluation": evaluation},
        )

    # ------------------------------------------------------------------ the loop
    progress = _Progress(step, c.max_steps, c.log_every, c.progress_bar)
    status = None
    batch_loss = math.nan
    resumed = restored_meta is not None
    while True:
        if resumed:  # goals, measurements and the checkpoint of this step are done
            resumed = False
            if _goal_reached(c, restored_meta.get("train_evaluation")):
                status = "goal_reached"
            elif step >= c.max_steps:
                status = "completed"
        else:
            scheduled = _scheduled(step, c.measure.every, fixed_steps)
            evaluation = None
            goals = c.train_loss_goal is not None or c.train_accuracy_goal is not None
            if goals and (scheduled or (c.goal_every and step % c.goal_every == 0)):
                evaluation = runtime.evaluate(params, train_data, step, "train")
            if _goal_reached(c, evaluation):
                status = "goal_reached"
            elif step >= c.max_steps:
                status = "completed"
            if scheduled or (status and c.measure.final):
                last_row = measure(step, params)
                if workdir is not None:
                    records.append_metrics(workdir, last_row)
                else:
                    rows_memory.append(last_row)
            if status or (c.checkpoint_every and step % c.checkpoint_every == 0):
                checkpoint(step, params, opt_state, evaluation)
        if status:
            break
        idx = _batch_indices(sampler, step)
        params, opt_state, loss = step_fn(params, opt_state, train_data, idx, limit)
        batch_loss = float(loss)
        if _diverged(c, batch_loss):
            status = "diverged"
            logging.warning("diverged at step %d: mini-batch loss %s", step, batch_loss)
            break
        step += 1
        progress.update(step, batch_loss, last_row)
    progress.close()

    extra = {"batch_loss": batch_loss} if status == "diverged" else {}
    if workdir is not None:
        records.write_status(workdir, status, step, **extra)
        rows = records.read_metrics(workdir)
    else:
        rows = rows_memory
    logging.info("run %s at step %d", status, step)
    return TrainResult(
        params=params,
        opt_state=opt_state,
        step=step,
        status=status,
        metrics=dict(rows[-1]) if rows else {},
        rows=rows,
        arrays=arrays_memory,
        resumed_from=resumed_from,
        traces=dict(Counter(programs.traces) - traces_before),
        workdir=None if workdir is None else str(workdir),
    )


class _Placement:
    """Where arrays live: one committed device, or a 1-D mesh ("data") of devices."""

    def __init__(self, mesh_spec: Any):
        if mesh_spec is None:
            self.mesh = None
            self.device = next(iter(jnp.zeros(()).devices()))
            return
        devices = jax.devices()
        count = len(devices) if mesh_spec == "auto" else int(mesh_spec)
        self.mesh = jax.sharding.Mesh(np.array(devices[:count]), ("data",))
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.sharded = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    @property
    def size(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def params(self, tree: PyTree) -> PyTree:
        """Replicated (or on the one device)."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        return jax.tree.map(lambda a: _global_array(a, self.replicated), tree)

    def examples(self, tree: PyTree, what: str) -> PyTree:
        """Sharded along the leading example axis when the mesh size divides it."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        n = checks.num_examples(tree)
        if n % self.mesh.size:
            logging.warning(
                "%s: %d examples are not divisible by the %d devices of the mesh; "
                "replicating them instead of sharding",
                what,
                n,
                self.mesh.size,
            )
            return jax.tree.map(lambda a: _global_array(a, self.replicated), tree)
        return jax.tree.map(lambda a: _global_array(a, self.sharded), tree)


def _global_array(a, sharding) -> jax.Array:
    """A global array from a host value every process holds in full (works multi-host)."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


class _Setup(NamedTuple):
    """Everything a run (or a one-off measurement) needs before its parameters exist."""

    config: ml_collections.ConfigDict
    programs: _Programs
    runtime: _Runtime
    placement: _Placement
    info: RunInfo
    options: dict[str, dict[str, Any]]
    train: Batch
    test: Batch
    measure_batch: Batch
    init_key: jax.Array
    measure_key: jax.Array
    frozen: ml_collections.FrozenConfigDict


def _setup(config: Any) -> _Setup:
    """Validates the config against the data and model, loads and places the data."""
    c = validate_config(config)
    dataset = _load(c)
    n_train = checks.num_examples(dataset.train)
    n_test = checks.num_examples(dataset.test)
    batch_size = n_train if c.batch_size is None else int(c.batch_size)
    _require(
        batch_size <= n_train, f"batch_size={batch_size} exceeds the {n_train} training examples"
    )
    if c.optimizer.name == "gd":
        _require(
            batch_size == n_train,
            f"optimizer 'gd' is full-batch gradient descent, but batch_size={batch_size} < "
            f"n={n_train}; use optimizer 'sgd' for mini-batches",
        )
    integer_labels = bool(np.issubdtype(np.asarray(dataset.train.targets).dtype, np.integer))
    _require(
        c.train_accuracy_goal is None or integer_labels,
        "train_accuracy_goal needs integer class labels; this dataset has real targets",
    )
    programs = _programs_for(
        c, np.shape(dataset.train.inputs)[1:], dataset.num_classes, integer_labels
    )
    base_key = jax.random.PRNGKey(c.seed)
    init_key = jax.random.fold_in(base_key, _TAG_INIT)
    num_measure = n_train if c.measure_subset is None else min(c.measure_subset, n_train)
    info = RunInfo(
        num_params=_num_params(programs.model, init_key),
        num_train=n_train,
        num_test=n_test,
        num_measure=num_measure,
        num_outputs=dataset.num_classes,
        batch_size=batch_size,
        integer_labels=integer_labels,
        exact_param_limit=int(c.measure.exact_param_limit),
        chunk_size=c.chunk_size,
    )
    options = {
        name: _measurement_options(name, c.measure.options.get(name, {}))
        for name in c.measure.names
    }
    for name in c.measure.names:
        if MEASUREMENTS[name].check is not None:
            MEASUREMENTS[name].check(options[name], info)
    checks.check_finite(dataset.train, dataset.test, names=("train data", "test data"))

    # Every array the jitted functions see is committed to the device or mesh, so that a
    # fresh, a continued and a resumed run call the same compiled programs. Measurement
    # programs are shared by runs whose configs differ only in the seed or where they stop.
    placement = _Placement(c.mesh)
    scope = {k: v for k, v in c.to_dict().items() if k not in ("seed", *RESUMABLE_FIELDS)}
    runtime = _Runtime(programs, json.dumps(records.encode_value(scope), sort_keys=True))
    train_data = placement.examples(Batch(*dataset.train), "training data")
    test_data = placement.examples(Batch(*dataset.test), "test data")
    measure_batch = placement.examples(
        _measure_subset(Batch(*dataset.train), num_measure), "measurement batch"
    )
    return _Setup(
        config=c,
        programs=programs,
        runtime=runtime,
        placement=placement,
        info=info,
        options=options,
        train=train_data,
        test=test_data,
        measure_batch=measure_batch,
        init_key=init_key,
        measure_key=jax.random.fold_in(base_key, _TAG_MEASURE),
        frozen=ml_collections.FrozenConfigDict(c),
    )


def _measure_row(
    st: _Setup, states: dict[str, dict[str, Any]], step: int, params: PyTree
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One metrics row (scalars) and its arrays: every measurement of the config at θ."""
    row: dict[str, Any] = {"step": step}
    arrays: dict[str, np.ndarray] = {}
    key = jax.random.fold_in(st.measure_key, step)
    for name in st.config.measure.names:
        ctx = MeasureContext(
            name=name,
            step=step,
            objective=st.programs.objective,
            params=params,
            batch=st.measure_batch,
            train=st.train,
            test=st.test,
            key=jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF),
            options=st.options[name],
            state=states[name],
            info=st.info,
            config=st.frozen,
            _runtime=st.runtime,
        )
        for k, v in dict(MEASUREMENTS[name].fn(ctx)).items():
            if k in row or k in arrays or k == "arrays":
                raise ValueError(f"measurement {name!r} returned {k!r}, which is taken")
            value = np.asarray(v)
            if value.ndim == 0:
                row[k] = value.item()
            else:
                arrays[k] = value
    return row, arrays


def measure(
    config: Any, params: PyTree | None = None, *, step: int = 0
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Runs the config's measurements once, as the training loop would at ``step``.

    For measuring a trained model (e.g. the params of a checkpoint) with any registered
    measurement: the data, measurement batch, keys and options are those of a training run
    with this config.

    Args:
      config: a training config (see :func:`default_config`); ``measure.names`` and
        ``measure.options`` choose the measurements.
      params: the parameters (None: the config's initialisation). They must have the
        structure, shapes and dtypes of the config's model.
      step: the step whose measurement keys to use.

    Returns:
      ``(row, arrays)``: the scalars and the arrays the measurements returned.
    """
    st = _setup(config)
    init = st.programs.model.init(st.init_key)
    if params is None:
        params = init
    else:
        checks.check_vector(params, init, name="params")
    params = st.placement.params(params)
    checks.check_finite(params, names=("params",))
    states: dict[str, dict[str, Any]] = {name: {} for name in st.config.measure.names}
    return _measure_row(st, states, step, params)


def load_checkpoint(
    workdir: str, *, step: int | None = None
) -> tuple[ml_collections.ConfigDict, PyTree, int]:
    """The stored config and the parameters of a run's checkpoint.

    Args:
      workdir: a training run's workdir (``config.json`` and ``checkpoints/``).
      step: which checkpoint (None: the latest complete one).

    Returns:
      ``(config, params, step)``.

    Raises:
      FileNotFoundError: if the workdir holds no config or no complete checkpoint.
    """
    stored = records.read_config(workdir)
    if stored is None:
        raise FileNotFoundError(f"{workdir} holds no config.json: not a training run's workdir")
    config = resolve_config(stored)
    st = _setup(config)
    _, tx = st.programs.optimizer(st.config)
    params = st.programs.model.init(st.init_key)
    manager = records.checkpoint_manager(workdir, max_to_keep=st.config.keep_checkpoints)
    ckpt = records.restore_checkpoint(
        manager, {"params": params, "opt_state": tx.init(params)}, step=step
    )
    if ckpt is None:
        raise FileNotFoundError(f"{workdir} holds no complete checkpoint")
    return st.config, ckpt.state["params"], ckpt.step


def _load(c: ml_collections.ConfigDict) -> data.Dataset:
    options = {k: v for k, v in c.dataset.to_dict().items() if k not in ("name", "dtype")}
    return data.load_dataset(c.dataset.name, dtype=c.dtype, **options)


def _measure_subset(train: Batch, size: int) -> Batch:
    """A fixed subset of ``size`` training examples (sorted indices; all when size = n)."""
    n = checks.num_examples(train)
    if size >= n:
        return train
    perm = np.random.default_rng(_SUBSET_SEED).permutation(n)
    idx = np.sort(perm[:size])
    return jax.tree.map(lambda a: a[idx], train)
