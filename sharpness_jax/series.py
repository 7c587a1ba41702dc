"""A run's measured series: where it first reaches a level, its late phase, its final value
over a window, its sharpening phase (up to the first peak), their summaries.

A run measures a quantity at every measurement step, so a quantity is a series, one value per
measurement (a column of ``records.metric_columns``; NaN where it was not measured). Claims
about where a quantity *settles* (λ_max at 2/η, batch sharpness at 2/η, ...) are made on the
*late phase* of the series: either its last ``fraction`` of the measurements, or the
measurements from a start index on, e.g. from the first one that reached a level
(:func:`first_reached`). A quantity's *final value* is the mean of its last finite values
(:func:`final_value`); the *sharpening phase* of λ_max is every measurement up to its first
maximum (:func:`sharpening_phase`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["final_value", "first_reached", "late_median", "late_phase", "sharpening_phase"]


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


def final_value(values: Sequence[float], window: int) -> float:
    """Mean of the last ``window`` finite values (NaN when there are none)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(np.mean(v[-window:])) if v.size else math.nan


def sharpening_phase(lambda_max: Sequence[float]) -> np.ndarray:
    """Indices of the sharpening phase: every measurement up to the first maximum of λ_max.

    Args:
      lambda_max: λ_max at the measurement steps, in step order (NaNs ignored).

    Returns:
      ``arange(argmax + 1)`` (empty when no value is finite).
    """
    lam = np.asarray(lambda_max, float)
    if not np.isfinite(lam).any():
        return np.arange(0)
    return np.arange(int(np.nanargmax(lam)) + 1)
