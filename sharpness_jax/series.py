"""A run's measured series: where it first reaches a level, its late phase, their summaries.

A run measures a quantity at every measurement step, so a quantity is a series, one value per
measurement (a column of ``records.metric_columns``; NaN where it was not measured). Claims
about where a quantity *settles* (λ_max at 2/η, batch sharpness at 2/η, ...) are made on the
*late phase* of the series: either its last ``fraction`` of the measurements, or the
measurements from a start index on, e.g. from the first one that reached a level
(:func:`first_reached`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["first_reached", "late_median", "late_phase"]


def first_reached(values: Sequence[float], level: float) -> int | None:
    """The index of the first value ``>= level``; None when no value reaches it (NaN never does)."""
    reached = np.flatnonzero(np.asarray(values) >= level)
    return int(reached[0]) if reached.size else None


def late_phase(
    values: Sequence[float], *, fraction: float | None = None, start: int | None = None
) -> np.ndarray:
    """The late phase of a series: its last ``fraction``, or its values from index ``start`` on.

    With m values and a fraction, the late phase is ``values[floor(m·(1 − fraction)):]``, at
    least the last value. Non-finite values (NaN where a quantity was not measured, inf after a
    divergence) are kept; :func:`late_median` leaves them out.

    Args:
      values: the series, one value per measurement.
      fraction: the late share of the measurements, 0 < fraction ≤ 1.
      start: the index of the first late measurement. Give exactly one of the two.

    Returns:
      The late values as a float array (empty for an empty series).

    Raises:
      ValueError: unless exactly one of ``fraction`` and ``start`` is given, or for a fraction
        outside (0, 1].
    """
    if (fraction is None) == (start is None):
        raise ValueError(f"give exactly one of fraction and start, got {fraction=}, {start=}")
    values = np.asarray(values, float)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        start = max(min(math.floor(values.size * (1 - fraction)), values.size - 1), 0)
    return values[start:]


def late_median(
    values: Sequence[float], *, fraction: float | None = None, start: int | None = None
) -> float:
    """The median of the finite values of :func:`late_phase` (NaN when there are none)."""
    late = late_phase(values, fraction=fraction, start=start)
    late = late[np.isfinite(late)]
    return float(np.median(late)) if late.size else math.nan
