"""A training run's records in its workdir: the stored config, resume from the latest
checkpoint, metrics rows and arrays, checkpoints with the measurements' warm-start states, and
``status.json`` ("running" with the last checkpoint's step at every checkpoint; "interrupted" or
"failed" when the loop stops on Ctrl-C or an error; the final status). Without a workdir the
rows are held in memory. Used by :func:`sharpness_jax.training.train`; the file formats and
the resume protocol are :mod:`sharpness_jax.records`'.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from sharpness_jax import records
from sharpness_jax.config import RESUMABLE_FIELDS

PyTree = Any

__all__ = ["RunRecords", "TrainingInterrupted", "no_checkpoint_message"]


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

    def resume(self, params: PyTree, opt_state: PyTree, force: bool):
        """Stores or checks the config; ``(step, params, opt_state, meta)`` of the latest
        checkpoint (``(0, params, opt_state, None)`` for a fresh run)."""
        st, workdir = self.st, self.workdir
        if workdir is None:
            return 0, params, opt_state, None
        records.init_workdir(workdir)
        records.write_config(workdir, st.config, ignore=RESUMABLE_FIELDS, force=force)
        self.manager = records.checkpoint_manager(workdir, max_to_keep=st.config.keep_checkpoints)
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

    def checkpoint(self, step, params, opt_state, evaluation) -> None:
        if self.manager is None:
            return
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
        extra = {"batch_loss": batch_loss} if status == "diverged" else {}
        records.write_status(self.workdir, status, step, **extra)
        return records.read_metrics(self.workdir)
