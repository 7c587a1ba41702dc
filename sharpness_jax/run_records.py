"""A training run's records in its workdir: the stored config, resume from the latest
checkpoint, metrics rows and arrays, checkpoints with the measurements' warm-start states, and
``status.json`` ("running" with the last checkpoint's step at every checkpoint; "interrupted" or
"failed" when the loop stops on Ctrl-C or an error; the final status), and the mini-batch loss
L_B(θ_t) of every training step t in ``train_loss.npz`` (:func:`read_train_losses`; held in
memory and written before every checkpoint and at the end). Without a workdir the rows are
held in memory.

What a rerun may change (``force`` aside): the ``RESUMABLE_FIELDS``, with ``max_steps`` not
lowered below the checkpoint the run resumes from (a finished run is extended by raising it);
the measurement schedule (``measure.every``, ``steps``, ``num_log_steps``, ``log_max_step``)
when the old and the new one agree on every step up to that checkpoint, e.g. a new window
after it; and anything while the workdir holds no checkpoint yet (a run that failed before its
first one, e.g. on a missing dataset, is no record to protect). Rows stay in step order and
equal those of an uninterrupted run with the new config.

Used by :func:`sharpness_jax.training.train`; the file formats and the resume protocol are
:mod:`sharpness_jax.records`'.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from sharpness_jax import records
from sharpness_jax.config import (
    RESUMABLE_FIELDS,
    default_config,
    measurement_schedule,
    resolve_config,
)

PyTree = Any

__all__ = [
    "SCHEDULE_FIELDS",
    "TRAIN_LOSS_FILE",
    "RunRecords",
    "TrainingInterrupted",
    "no_checkpoint_message",
    "read_train_losses",
    "resumable_fields",
]

TRAIN_LOSS_FILE = "train_loss.npz"
# The fields of the measurement schedule; see ``resumable_fields``.
SCHEDULE_FIELDS = (
    "measure.every",
    "measure.steps",
    "measure.num_log_steps",
    "measure.log_max_step",
)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train` with a workdir, after ``status.json`` recorded it.

    Attributes:
      step: the step the run was at.
      checkpoint_step: the step of its last complete checkpoint (None: none yet), where a
        rerun resumes.
    """

    def __init__(self, step: int, checkpoint_step: int | None):
        self.step, self.checkpoint_step = step, checkpoint_step
        last = f"last checkpoint at step {checkpoint_step}"
        if checkpoint_step is None:
            last = "no checkpoint yet"
        super().__init__(f"interrupted at step {step}; {last}; rerun the same command to resume")


def no_checkpoint_message(workdir: str, shown: int = 6) -> str:
    """The message for a workdir without a complete checkpoint, naming the runs inside it (at
    most three levels down, e.g. ``runs/<name>`` of a study) that hold checkpoints."""
    root = pathlib.Path(workdir)
    inside = sorted(
        str(path.parent.relative_to(root))
        for depth in (1, 2, 3)
        for path in root.glob("/".join(["*"] * depth + [records.CHECKPOINT_DIR]))
        if path.is_dir() and any(p.name.isdigit() for p in path.iterdir())
    )
    message = f"{workdir} holds no complete checkpoint"
    if inside:
        more = f", ... ({len(inside)} in all)" if len(inside) > shown else ""
        message += f"; the runs inside it that do: {', '.join(inside[:shown])}{more}"
    return message


def read_train_losses(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)``: the mini-batch loss L_B(θ_t) of every training step t a run took
    (as of its last checkpoint or its end), in step order; empty arrays if none is stored."""
    path = pathlib.Path(workdir) / TRAIN_LOSS_FILE
    if not path.exists():
        return np.zeros(0, np.int64), np.zeros(0)
    with np.load(path) as f:
        return f["step"], f["batch_loss"]


def resumable_fields(stored: Any, new: Any, step: int) -> tuple[str, ...]:
    """The fields in which ``new`` may differ from a run's ``stored`` config when it resumes
    from its checkpoint at ``step`` (see the module docstring)."""
    old, c = resolve_config(stored), resolve_config(new)
    fields = list(RESUMABLE_FIELDS)
    if c.max_steps < step:
        fields.remove("max_steps")
    was, will = measurement_schedule(old), measurement_schedule(c)
    if all(was(t) == will(t) for t in range(step + 1)):
        fields += SCHEDULE_FIELDS
    return tuple(fields)


def added_at_default(stored: Any, new: Any, defaults: Any = None, prefix: str = "") -> list[str]:
    """Dotted paths that ``stored`` lacks and ``new`` holds at their value in ``defaults``.

    A field added to the config schema after a run was written defaults to the behaviour the
    run had (the schema's rule for new fields), so a resumed run is not refused for it.
    ``defaults`` is the training config's :func:`default_config` unless given; ``prefix``
    locates it inside ``new`` (``"base."`` for a study's base run).
    """
    old = records.flatten_config(records.config_to_dict(stored))
    cur = records.flatten_config(records.config_to_dict(new))
    base = records.flatten_config(records.config_to_dict(defaults or default_config()))
    missing = object()
    return sorted(
        path
        for path, value in cur.items()
        if path not in old
        and path.startswith(prefix)
        and base.get(path[len(prefix) :], missing) == value
    )


class RunRecords:
    """A run's records: rows and arrays (in the workdir or in memory), checkpoints and the
    measurements' warm-start states."""

    def __init__(self, st: Any, workdir: str | None, measure_row: Callable[..., tuple]):
        # ``st``: the training loop's setup (config, placement); ``measure_row(states, step,
        # params, opt_state) -> (row, arrays)`` measures one row.
        self.st, self.workdir, self.measure_row = st, workdir, measure_row
        self.manager = None
        self.states: dict[str, dict[str, Any]] = {name: {} for name in st.config.measure.names}
        self.rows: list[dict[str, Any]] = []
        self.arrays: dict[int, dict[str, np.ndarray]] = {}
        self.last_row: dict[str, Any] = {}
        self.step = 0  # the step the loop is at
        self.checkpoint_step: int | None = None  # the last complete checkpoint
        self.loss_steps: list[int] = []  # every training step's mini-batch loss
        self.losses: list[float] = []

    def resume(self, params: PyTree, opt_state: PyTree, force: bool):
        """Stores or checks the config; ``(step, params, opt_state, meta)`` of the latest
        checkpoint (``(0, params, opt_state, None)`` for a fresh run)."""
        st, workdir = self.st, self.workdir
        if workdir is None:
            return 0, params, opt_state, None
        records.init_workdir(workdir)
        self.manager = records.checkpoint_manager(workdir, max_to_keep=st.config.keep_checkpoints)
        latest, stored = records.latest_checkpoint_step(self.manager), records.read_config(workdir)
        ignore = RESUMABLE_FIELDS
        if latest is not None and stored is not None:
            ignore = resumable_fields(stored, st.config, latest)
        if stored is not None:
            ignore = (*ignore, *added_at_default(stored, st.config))
        records.write_config(workdir, st.config, ignore=ignore, force=force or latest is None)
        ckpt = records.restore_checkpoint(self.manager, self._state(params, opt_state))
        step, meta = 0, None
        if ckpt is not None:
            step, meta = ckpt.step, ckpt.meta
            params = st.placement.params(ckpt.state["params"])
            opt_state = st.placement.params(ckpt.state["opt_state"])
            if "model_state" in ckpt.state:
                st.runtime.model_state = st.placement.params(ckpt.state["model_state"])
            for name, state in ckpt.extra.items():
                if name in self.states:
                    self.states[name] = st.placement.params(dict(state))
            logging.info("resuming %s from the checkpoint at step %d", workdir, step)
        records.truncate_metrics(workdir, max_step=None if ckpt is None else step)
        steps, losses = read_train_losses(workdir)
        self.loss_steps, self.losses = steps[steps < step].tolist(), losses[steps < step].tolist()
        self.step, self.checkpoint_step = step, None if ckpt is None else step
        records.write_status(workdir, "running", step, **self._checkpoint_field())
        previous = records.read_metrics(workdir)
        self.last_row = previous[-1] if previous else {}
        return step, params, opt_state, meta

    def measure(self, step: int, params: PyTree, opt_state: PyTree) -> None:
        """Measures at θ_s and appends the row (its arrays beside it)."""
        row, arrays = self.measure_row(self.states, step, params, opt_state)
        if arrays:
            if self.workdir is not None:
                row["arrays"] = records.save_arrays(self.workdir, step, arrays)
            else:
                self.arrays[step] = arrays
        if self.workdir is not None:
            records.append_metrics(self.workdir, row)
        else:
            self.rows.append(row)
        self.last_row = row

    def record_loss(self, step: int, loss: float) -> None:
        """Holds the mini-batch loss of training step ``step``."""
        self.loss_steps.append(step)
        self.losses.append(loss)

    def _write_losses(self) -> None:
        """Writes the losses held (a rerun drops those past the checkpoint it resumes from)."""
        steps = np.asarray(self.loss_steps, np.int64)
        losses = np.asarray(self.losses, np.float64)
        records.write_npz(
            pathlib.Path(self.workdir) / TRAIN_LOSS_FILE, {"step": steps, "batch_loss": losses}
        )

    def checkpoint(self, step, params, opt_state, evaluation) -> None:
        if self.manager is None:
            return
        self._write_losses()  # first: a checkpoint never lacks the losses before it
        records.save_checkpoint(
            self.manager,
            step,
            self._state(params, opt_state),
            extra=self.states,
            meta={"seed": self.st.config.seed, "train_evaluation": evaluation},
        )
        self.checkpoint_step = step
        records.write_status(self.workdir, "running", step, checkpoint_step=step)

    def _state(self, params: PyTree, opt_state: PyTree) -> dict[str, PyTree]:
        """The checkpointed trees; with the model state (batch norm) of a stateful model."""
        state = {"params": params, "opt_state": opt_state}
        if self.st.runtime.model_state is not None:
            state["model_state"] = self.st.runtime.model_state
        return state

    def _checkpoint_field(self) -> dict[str, int]:
        return {} if self.checkpoint_step is None else {"checkpoint_step": self.checkpoint_step}

    def abort(self, error: BaseException) -> None:
        """Records in ``status.json`` that the run stopped on ``error`` at :attr:`step`
        (``"interrupted"`` for Ctrl-C, ``"failed"`` otherwise) and where it would resume."""
        if self.workdir is None:
            return
        extra = self._checkpoint_field()
        if isinstance(error, KeyboardInterrupt):
            records.write_status(self.workdir, "interrupted", self.step, **extra)
        else:
            error_text = f"{type(error).__name__}: {error}"
            records.write_status(self.workdir, "failed", self.step, error=error_text, **extra)

    def finish(self, status: str, step: int, batch_loss: float) -> list[dict[str, Any]]:
        """Writes the final status; all rows of the run."""
        if self.workdir is None:
            return self.rows
        self._write_losses()
        extra = {"batch_loss": batch_loss} if status == "diverged" else {}
        records.write_status(self.workdir, status, step, **extra)
        return records.read_metrics(self.workdir)
