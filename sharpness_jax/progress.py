"""Progress of a training run: lines in the absl log and, on a terminal, a bar on stderr."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

from sharpness_jax.checks import is_number as _is_number

__all__ = ["Progress"]


class Progress:
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
