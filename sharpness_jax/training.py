"""One optax training loop for every study, with a measurement schedule and resumable records.

``train(config, workdir)`` trains a model from the zoo (:mod:`sharpness_jax.models`) or from
the user's code (``model.factory``, :mod:`sharpness_jax.model_factory`) on a dataset
(:mod:`sharpness_jax.data`) with full-batch GD, SGD (with or without replacement), SGD with
heavy-ball momentum or Adam, measures curvature along the way, and returns a
:class:`TrainResult`. With a ``workdir`` everything is recorded there (see
:mod:`sharpness_jax.records`) and a rerun with the same workdir resumes exactly; without one
the run is held in memory (for notebooks). The config (:mod:`sharpness_jax.config`) becomes a
problem (:mod:`sharpness_jax.problem`), an optimiser (:mod:`sharpness_jax.optim`), compiled
programs (:mod:`sharpness_jax.programs`, in the caller's ``cache``), data placed on a device
or mesh (:mod:`sharpness_jax.placement`) and measurements (:mod:`sharpness_jax.measurements`).

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
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import zlib
from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sharpness_jax import checks, data, minibatch, models, records
from sharpness_jax.config import (
    RESUMABLE_FIELDS,
    measurement_options,
    measurement_schedule,
    resolve_config,
    validate_config,
    validate_sizes,
)
from sharpness_jax.measurements import MEASUREMENTS, MeasureContext, RunInfo
from sharpness_jax.objective import Batch
from sharpness_jax.placement import Placement
from sharpness_jax.problem import problem_from_config
from sharpness_jax.programs import CompileCache, Programs, Runtime
from sharpness_jax.progress import Progress
from sharpness_jax.resnet18 import StatefulModel
from sharpness_jax.run_records import RunRecords, TrainingInterrupted, no_checkpoint_message

PyTree = Any

__all__ = ["TrainResult", "TrainingInterrupted", "load_checkpoint", "measure", "train"]

# Tags folded into the seed's key so that the random streams for different purposes differ.
_TAG_INIT, _TAG_MEASURE = 1, 2
_SUBSET_SEED = 0  # the measurement subset is fixed across seeds


# ============================================================================= setup


class _Setup(NamedTuple):
    """Everything a run (or a one-off measurement) needs before its parameters exist."""

    config: ml_collections.ConfigDict
    programs: Programs
    runtime: Runtime
    placement: Placement
    info: RunInfo
    options: dict[str, dict[str, Any]]
    train: Batch
    test: Batch
    measure_batch: Batch
    sampler: minibatch.Sampler | None
    init_key: jax.Array
    measure_key: jax.Array
    frozen: ml_collections.FrozenConfigDict


def _setup(config: Any, cache: CompileCache | None) -> _Setup:
    """Validates the config against the data and model, loads and places the data."""
    c = validate_config(config)
    problem = problem_from_config(c)
    dataset = problem.dataset
    integer_labels = bool(np.issubdtype(np.asarray(dataset.train.targets).dtype, np.integer))
    programs = (CompileCache() if cache is None else cache).programs(c, problem, integer_labels)
    base_key = jax.random.PRNGKey(c.seed)
    init_key = jax.random.fold_in(base_key, _TAG_INIT)
    info = _run_info(c, dataset, programs.model, init_key, integer_labels)
    options = {
        name: measurement_options(name, c.measure.options.get(name, {})) for name in c.measure.names
    }
    for name in c.measure.names:
        if MEASUREMENTS[name].check is not None:
            MEASUREMENTS[name].check(options[name], info)
    checks.check_finite(dataset.train, dataset.test, names=("train data", "test data"))

    # Every array the jitted functions see is committed to the device or mesh, so that a
    # fresh, a continued and a resumed run call the same compiled programs. Measurement
    # programs are shared by runs whose configs differ only in the seed or where they stop.
    placement = Placement(c.mesh)
    scope = {k: v for k, v in c.to_dict().items() if k not in ("seed", *RESUMABLE_FIELDS)}
    scope_key = json.dumps(records.encode_value(scope), sort_keys=True)
    n, b = info.num_train, info.batch_size
    return _Setup(
        config=c,
        programs=programs,
        runtime=Runtime(programs, scope_key, c),
        placement=placement,
        info=info,
        options=options,
        train=placement.examples(Batch(*dataset.train), "training data"),
        test=placement.examples(Batch(*dataset.test), "test data"),
        measure_batch=placement.examples(
            _measure_subset(Batch(*dataset.train), info.num_measure), "measurement batch"
        ),
        sampler=None if b == n else minibatch.Sampler(n, b, replace=c.replace, seed=c.seed),
        init_key=init_key,
        measure_key=jax.random.fold_in(base_key, _TAG_MEASURE),
        frozen=ml_collections.FrozenConfigDict(c),
    )


def _run_info(c, dataset: data.Dataset, model: models.Model, init_key, integer_labels) -> RunInfo:
    """The run's sizes, once the config is checked against the data."""
    n_train = checks.num_examples(dataset.train)
    return RunInfo(
        num_params=_num_params(model, init_key),
        num_train=n_train,
        num_test=checks.num_examples(dataset.test),
        num_measure=n_train if c.measure_subset is None else min(c.measure_subset, n_train),
        num_outputs=dataset.num_classes,
        batch_size=validate_sizes(c, num_train=n_train, integer_labels=integer_labels),
        integer_labels=integer_labels,
        exact_param_limit=int(c.measure.exact_param_limit),
        chunk_size=c.chunk_size,
    )


def _num_params(model: models.Model, key: jax.Array) -> int:
    shapes = jax.eval_shape(_init_params(model), key)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def _init_params(model) -> Any:
    """``key -> params`` (a stateful model's ``init`` also returns its state)."""
    return (lambda key: model.init(key)[0]) if isinstance(model, StatefulModel) else model.init


def _init(st: _Setup) -> PyTree:
    """The initial params; a stateful model's initial state goes into ``st.runtime``."""
    model = st.programs.model
    if not isinstance(model, StatefulModel):
        return model.init(st.init_key)
    params, state = model.init(st.init_key)
    st.runtime.model_state = st.placement.params(state)
    return params


def _measure_subset(train: Batch, size: int) -> Batch:
    """A fixed subset of ``size`` training examples (sorted indices; all when size = n)."""
    n = checks.num_examples(train)
    if size >= n:
        return train
    perm = np.random.default_rng(_SUBSET_SEED).permutation(n)
    idx = np.sort(perm[:size])
    return jax.tree.map(lambda a: a[idx], train)


def _batch_indices(sampler: minibatch.Sampler | None, step: int) -> np.ndarray | None:
    """The training batch of ``step`` (None: the full batch)."""
    return None if sampler is None else sampler.indices(step)


# ============================================================================= measuring


def _measure_row(
    st: _Setup, states: dict[str, dict[str, Any]], step: int, params: PyTree, opt_state: PyTree
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One metrics row (scalars) and its arrays: every measurement of the config at θ."""
    row: dict[str, Any] = {"step": step}
    arrays: dict[str, np.ndarray] = {}
    key = jax.random.fold_in(st.measure_key, step)
    indices = None if st.sampler is None else st.sampler.indices(step)
    for name in st.config.measure.names:
        ctx = MeasureContext(
            name=name,
            step=step,
            objective=st.runtime.objective,
            params=params,
            batch=st.measure_batch,
            train=st.train,
            test=st.test,
            key=jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF),
            opt_state=opt_state,
            batch_indices=indices,
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
    config: Any,
    params: PyTree | None = None,
    *,
    step: int = 0,
    cache: CompileCache | None = None,
    model_state: PyTree = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Runs the config's measurements once, as the training loop would at ``step``.

    For measuring a trained model (e.g. the params of a checkpoint) with any registered
    measurement: the data, measurement batch, keys and options are those of a training run
    with this config; the optimizer state (for ``MeasureContext.update``) is a fresh one.

    Args:
      config: a training config (see :func:`sharpness_jax.config.default_config`);
        ``measure.names`` and ``measure.options`` choose the measurements.
      params: the parameters (None: the config's initialisation). They must have the
        structure, shapes and dtypes of the config's model.
      step: the step whose measurement keys (and training batch) to use.
      cache: the compile cache (None: a fresh one).
      model_state: a stateful model's state at ``params`` (batch-norm running statistics;
        required with ``params`` for ``resnet18``, measured in eval mode at it).

    Returns:
      ``(row, arrays)``: the scalars and the arrays the measurements returned.

    Raises:
      ValueError: for params of a stateful model without their ``model_state``.
    """
    st = _setup(config, cache)
    init = _init(st)
    if params is None:
        params = init
    else:
        checks.check_vector(params, init, name="params")
    if st.programs.stateful and params is not init:
        if model_state is None:
            raise ValueError(
                f"model {st.config.model.name!r} has batch-norm state: pass the model_state "
                "that goes with these params (a checkpoint's 'model_state')"
            )
        checks.check_vector(model_state, st.runtime.model_state, name="model_state")
        st.runtime.model_state = st.placement.params(model_state)
    params = st.placement.params(params)
    checks.check_finite(params, names=("params",))
    opt_state = st.placement.params(st.programs.optimizer(st.config)[1].init(params))
    states: dict[str, dict[str, Any]] = {name: {} for name in st.config.measure.names}
    return _measure_row(st, states, step, params, opt_state)


def load_checkpoint(workdir: str, *, step: int | None = None) -> tuple:
    """The stored config and the parameters (and model state) of a run's checkpoint.

    Args:
      workdir: a training run's workdir (``config.json`` and ``checkpoints/``).
      step: which checkpoint (None: the latest complete one).

    Returns:
      ``(config, params, step)`` for a model without state (as for every model of
      ``models.MODELS``); ``(config, params, step, model_state)`` for a stateful model
      (``models.STATEFUL_MODELS``: ``resnet18``, whose ``model_state`` is the batch-norm
      running statistics at ``params``, to measure it in eval mode with
      ``measure(config, params, model_state=model_state)`` or
      ``Objective(resnet18.with_state(model, model_state).predict, loss)``).

    Raises:
      FileNotFoundError: if the workdir holds no config or no complete checkpoint (the message
        names the runs inside it that hold one, e.g. those of a study's workdir).
    """
    stored = records.read_config(workdir)
    if stored is None:
        raise FileNotFoundError(f"{workdir} holds no config.json: not a training run's workdir")
    if not (pathlib.Path(workdir) / records.CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(no_checkpoint_message(workdir))
    config = resolve_config(stored)
    st = _setup(config, None)
    _, tx = st.programs.optimizer(st.config)
    params = _init(st)
    manager = records.checkpoint_manager(workdir, max_to_keep=st.config.keep_checkpoints)
    template = {"params": params, "opt_state": tx.init(params)}
    if st.runtime.model_state is not None:
        template["model_state"] = st.runtime.model_state
    ckpt = records.restore_checkpoint(manager, template, step=step)
    if ckpt is None:
        raise FileNotFoundError(no_checkpoint_message(workdir))
    if st.programs.stateful:
        return st.config, ckpt.state["params"], ckpt.step, ckpt.state["model_state"]
    return st.config, ckpt.state["params"], ckpt.step


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
      model_state: the final model state of a stateful model (``resnet18``: the batch-norm
        running statistics); None otherwise.
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
    model_state: PyTree = None


def _stop(c: ml_collections.ConfigDict, step: int, evaluation: Mapping[str, float] | None):
    """The status the run stops with at ``step`` (None: it goes on)."""
    if evaluation:
        if (c.train_loss_goal is not None and evaluation["loss"] <= c.train_loss_goal) or (
            c.train_accuracy_goal is not None and evaluation["accuracy"] >= c.train_accuracy_goal
        ):
            return "goal_reached"
    return "completed" if step >= c.max_steps else None


def _diverged(c: ml_collections.ConfigDict, loss: float) -> bool:
    return not math.isfinite(loss) or (c.loss_limit is not None and loss > c.loss_limit)


def _visit(st: _Setup, rec: RunRecords, scheduled: bool, step, params, opt_state):
    """Goals, measurements and checkpoint of ``step``; the status the run stops with."""
    c = st.config
    evaluation = None
    goals = c.train_loss_goal is not None or c.train_accuracy_goal is not None
    if goals and (scheduled or (c.goal_every and step % c.goal_every == 0)):
        evaluation = st.runtime.evaluate(params, st.train, step, "train")
    status = _stop(c, step, evaluation)
    if scheduled or (status and c.measure.final):
        rec.measure(step, params, opt_state)
    if status or (c.checkpoint_every and step % c.checkpoint_every == 0):
        rec.checkpoint(step, params, opt_state, evaluation)
    return status


def _loop(st: _Setup, rec: RunRecords, step: int, params, opt_state, restored_meta):
    """Steps until the run stops; ``(status, step, params, opt_state, batch_loss)``."""
    c = st.config
    limit = jnp.asarray(math.inf if c.loss_limit is None else c.loss_limit, c.dtype)
    step_fn = st.programs.train_step(c)
    is_scheduled = measurement_schedule(c)
    progress = Progress(step, c.max_steps, c.log_every, c.progress_bar)
    batch_loss = math.nan
    resumed = restored_meta is not None
    while True:
        rec.step = step
        if resumed:  # goals, measurements and the checkpoint of this step are done
            resumed = False
            status = _stop(c, step, restored_meta.get("train_evaluation"))
        else:
            status = _visit(st, rec, is_scheduled(step), step, params, opt_state)
        if status:
            break
        idx = _batch_indices(st.sampler, step)
        if st.programs.stateful:  # the model state is carried by the run's runtime
            params, opt_state, model_state, loss = step_fn(
                params, opt_state, st.runtime.model_state, st.train, idx, limit
            )
            st.runtime.model_state = model_state
        else:
            params, opt_state, loss = step_fn(params, opt_state, st.train, idx, limit)
        batch_loss = float(loss)
        rec.record_loss(step, batch_loss)
        if _diverged(c, batch_loss):
            status = "diverged"
            logging.warning("diverged at step %d: mini-batch loss %s", step, batch_loss)
            break
        step += 1
        progress.update(step, batch_loss, rec.last_row)
    progress.close()
    return status, step, params, opt_state, batch_loss


def train(
    config: Any,
    workdir: str | None = None,
    *,
    force: bool = False,
    cache: CompileCache | None = None,
) -> TrainResult:
    """Trains ``config``'s model on its dataset, measuring along the way.

    Everything in the config is validated before anything compiles (see
    :func:`sharpness_jax.config.validate_config`; then the batch size against n, the exact
    methods against the parameter count P = Σ sizes of ``jax.eval_shape(model.init)``), and
    the initial parameters and the data are checked to be finite.

    With a ``workdir``, the config is stored in ``config.json`` (a rerun refuses a config that
    differs in a field outside ``RESUMABLE_FIELDS``, unless ``force``; a larger ``max_steps``
    and a measurement window after the checkpoint extend a run, and a workdir without a
    checkpoint takes any config: :mod:`sharpness_jax.run_records`), rows are appended to
    ``metrics.jsonl``, every step's mini-batch loss kept in ``train_loss.npz``
    (``run_records.read_train_losses``), checkpoints written every ``checkpoint_every`` steps
    and at the end, and ``status.json`` updated. Rerunning resumes from the latest complete
    checkpoint: the rows (and losses) after it are dropped, and the batches (a function of
    (seed, step)), measurement keys and warm-start states are those of an uninterrupted run,
    so the rows come out identical.

    Args:
      config: a ConfigDict or nested mapping (missing fields: ``config.default_config``).
      workdir: the run directory; None keeps the run in memory (no checkpoints).
      force: continue a run in ``workdir`` even though its stored config differs.
      cache: the compile cache (:class:`sharpness_jax.programs.CompileCache`); runs that share
        one and a setup compile nothing again. None: a fresh one for this run.

    Returns:
      :class:`TrainResult`.

    Raises:
      ValueError: for an invalid config (before any compilation) or non-finite data or
        initial parameters; ``records.ConfigMismatchError`` for a conflicting stored config.
      TrainingInterrupted: for Ctrl-C with a workdir (``status.json`` says ``"interrupted"``;
        an exception leaves ``"failed"`` there and propagates).
    """
    st = _setup(config, cache)
    programs = st.programs
    _, tx = programs.optimizer(st.config)
    params = st.placement.params(_init(st))
    checks.check_finite(params, names=("initial params",))
    opt_state = st.placement.params(tx.init(params))
    traces_before = Counter(programs.traces)
    rec = RunRecords(st, workdir, functools.partial(_measure_row, st))
    step, params, opt_state, meta = rec.resume(params, opt_state, force)
    resumed_from = None if meta is None else step
    try:
        status, step, params, opt_state, batch_loss = _loop(st, rec, step, params, opt_state, meta)
    except BaseException as e:
        rec.abort(e)
        if isinstance(e, KeyboardInterrupt) and workdir is not None:
            raise TrainingInterrupted(rec.step, rec.checkpoint_step) from e
        raise
    rows = rec.finish(status, step, batch_loss)
    logging.info("run %s at step %d", status, step)
    return TrainResult(
        params=params,
        opt_state=opt_state,
        step=step,
        status=status,
        metrics=dict(rows[-1]) if rows else {},
        rows=rows,
        arrays=rec.arrays,
        resumed_from=resumed_from,
        traces=dict(Counter(programs.traces) - traces_before),
        workdir=None if workdir is None else str(workdir),
        model_state=st.runtime.model_state,
    )
