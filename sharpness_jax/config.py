"""The run config of the training loop: its defaults, resolved once, and validated.

:func:`default_config` gives every field below; :func:`resolve_config` fills in the defaults and
the values derived from ``max_steps``, so that the stored config says what a run did;
:func:`validate_config` checks everything that can be checked without the data, before
anything loads or compiles. ``RESUMABLE_FIELDS`` are the fields a resumed run may change.

The fields:

``dataset``: ``name`` (one of ``data.DATASETS``, "mnist5k") plus any keyword option of
  ``data.load_dataset`` (``num_train``, ``num_test``, ``standardize``, ``seed`` (the
  data split's seed), ``flatten``, ...). ``dtype`` is set from the top-level ``dtype``.
  ``data_dir`` (None: ``$TFDS_DATA_DIR``, else TFDS's default) is the root of the prepared TFDS
  data, e.g. ``--config.dataset.data_dir=/data/tfds``; it changes no result, so a resumed run
  may change it.
``model``: ``name`` (one of ``models.MODELS``, "mlp", or "resnet18") plus any option of
  ``models.build_model`` (``widths``, ``activation``, ``init``, ...). ``param_dtype`` is
  set from the top-level ``dtype``. ``factory`` ("": the zoo model ``name``): a model from
  the user's code, ``"pkg.module:fn"``, called as ``fn(*, input_shape, num_outputs,
  param_dtype, **options)`` with the section's other fields as options (see
  :mod:`sharpness_jax.model_factory`); ``name`` is then only a label.
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
  ``sam_rho``: ρ ≥ 0 of sharpness-aware minimisation (0.0: off). ρ > 0: the optimizer is
    fed ∇L_B(θ + ρ g/‖g‖), g = ∇L_B(θ), both on the step's batch B (Foret et al. 2021).
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

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from sharpness_jax import checks, data, models
from sharpness_jax.checks import is_int as _is_int
from sharpness_jax.checks import is_number as _is_number
from sharpness_jax.checks import require as _require
from sharpness_jax.measurements import MEASUREMENTS
from sharpness_jax.model_factory import load_factory
from sharpness_jax.objective import LOSSES, get_loss

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "RESUMABLE_FIELDS",
    "SCHEDULES",
    "WEIGHT_DECAY_TYPES",
    "default_config",
    "measurement_options",
    "measurement_schedule",
    "measurement_steps",
    "resolve_config",
    "validate_config",
    "validate_sizes",
]

OPTIMIZERS = ("gd", "sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "linear")
WEIGHT_DECAY_TYPES = ("decoupled", "l2")
DTYPES = ("float32", "float64")

# Fields that only say where a run stops, how often it checkpoints or how it reports: they may
# change when a run is resumed. Every other field changes results and must match.
RESUMABLE_FIELDS = (
    "max_steps",
    "dataset.data_dir",
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


def default_config() -> ml_collections.ConfigDict:
    """The default config; every field is documented in the module docstring."""
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict(
        {"name": "mnist5k", "data_dir": config_dict.placeholder(str)}
    )
    c.model = ml_collections.ConfigDict({"name": "mlp", "factory": ""})
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
            "sam_rho": 0.0,
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
            if section == "dataset":  # where the data lie is no option of one dataset
                base[section]["data_dir"] = None
            else:  # nor is the factory an option of one zoo model
                base[section]["factory"] = ""
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


def validate_config(config: Any) -> ml_collections.ConfigDict:
    """Checks everything that can be checked without the data; returns the resolved config.

    Sizes that need the data or the model (batch size vs n: :func:`validate_sizes`;
    parameter counts for exact methods: the measurements' checks) are checked by
    ``training.train`` after loading the data and before compiling.

    Raises:
      ValueError: naming the offending field.
    """
    c = resolve_config(config)
    _validate_problem(c)
    _require(
        c.mesh in (None, "auto") or (_is_int(c.mesh) and 1 <= c.mesh <= jax.device_count()),
        f"mesh must be None, 'auto' or a device count in [1, {jax.device_count()}], got {c.mesh!r}",
    )
    _validate_optimizer(c.optimizer)
    _validate_run(c)
    _validate_measure(c.measure)
    return c


def validate_sizes(config: Any, *, num_train: int, integer_labels: bool) -> int:
    """The checks of the config against its data: the batch size against the n training
    examples (full batch for "gd") and the accuracy goal against the labels.

    Returns:
      The training batch size B (n for the full batch).

    Raises:
      ValueError: naming the offending field.
    """
    c = config
    batch_size = num_train if c.batch_size is None else int(c.batch_size)
    _require(
        batch_size <= num_train,
        f"batch_size={batch_size} exceeds the {num_train} training examples",
    )
    if c.optimizer.name == "gd":
        _require(
            batch_size == num_train,
            f"optimizer 'gd' is full-batch gradient descent, but batch_size={batch_size} < "
            f"n={num_train}; use optimizer 'sgd' for mini-batches",
        )
    _require(
        c.train_accuracy_goal is None or integer_labels,
        "train_accuracy_goal needs integer class labels; this dataset has real targets",
    )
    return batch_size


def _validate_problem(c: ml_collections.ConfigDict) -> None:
    """Dataset, model, loss and dtype."""
    _require(
        c.dataset.name in data.DATASETS,
        f"unknown dataset {c.dataset.name!r}; choose one of {data.DATASETS}",
    )
    if c.model.factory:
        load_factory(c.model.factory)  # imports it: a bad string or module fails here
        _require(isinstance(c.model.name, str), f"model.name must be a str, got {c.model.name!r}")
    else:
        zoo = models.MODELS + models.STATEFUL_MODELS
        _require(
            c.model.name in zoo,
            f"unknown model {c.model.name!r}; choose one of {zoo} (or give "
            "model.factory='pkg.module:fn' for a model of your own)",
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


def _validate_optimizer(o: ml_collections.ConfigDict) -> None:
    """The ``optimizer`` section."""
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
        _is_number(o.sam_rho) and o.sam_rho >= 0,
        f"optimizer.sam_rho must be >= 0 (0: no SAM), got {o.sam_rho!r}",
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


def _validate_run(c: ml_collections.ConfigDict) -> None:
    """Batches, seed, stop rules, checkpoints, logging and chunking."""
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


def _validate_measure(m: ml_collections.ConfigDict) -> None:
    """The ``measure`` section: the schedule, the names and their options."""
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
        measurement_options(name, m.options.get(name, {}))


def measurement_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of measurement ``name``: its registered defaults updated by ``given``.

    Raises:
      ValueError: for an option the measurement does not take.
    """
    spec = MEASUREMENTS[name]
    given = dict(given.to_dict() if hasattr(given, "to_dict") else given)
    unknown = sorted(set(given) - set(spec.defaults))
    _require(
        not unknown,
        f"measurement {name!r} takes no option(s) {unknown}; its options and defaults: "
        f"{dict(spec.defaults)}",
    )
    return {**spec.defaults, **given}


def measurement_steps(config: Any, *, up_to: int | None = None) -> list[int]:
    """The scheduled measurement steps ≤ ``up_to`` (default ``max_steps``), final step aside."""
    c = resolve_config(config)
    up_to = c.max_steps if up_to is None else up_to
    is_scheduled = measurement_schedule(c)
    return [s for s in range(up_to + 1) if is_scheduled(s)]


def measurement_schedule(config: Any) -> Callable[[int], bool]:
    """``step -> bool``: whether ``step`` is a scheduled measurement step of ``config``
    (a multiple of ``measure.every``, one of ``measure.steps`` or of the log-spaced steps;
    the final step of a run aside)."""
    c = resolve_config(config)
    every, fixed = c.measure.every, _fixed_steps(c)
    return lambda step: _scheduled(step, every, fixed)


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
