"""Tests of a run's measured series: first arrival at a level, late phase, late median."""

import math

import numpy as np
import pytest

from sharpness_jax import series

VALUES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, np.nan, 8.0, 9.0, 10.0]


def test_late_phase_by_fraction_and_by_start():
    np.testing.assert_array_equal(series.late_phase(VALUES, fraction=0.5), VALUES[5:])
    np.testing.assert_array_equal(series.late_phase(VALUES, fraction=1.0), VALUES)
    np.testing.assert_array_equal(series.late_phase(VALUES, fraction=0.01), [10.0])  # never empty
    np.testing.assert_array_equal(series.late_phase(VALUES, start=7), [8.0, 9.0, 10.0])
    assert series.late_phase([], fraction=0.5).size == 0
    assert series.late_phase(VALUES, start=10).size == 0
    assert series.late_phase(np.arange(3), start=0).dtype == np.float64


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.3, 0.5, 0.75, 1.0])
def test_late_phase_is_the_slice_the_studies_and_notebooks_take(fraction):
    for m in range(1, 40):
        x = np.arange(m, dtype=float)
        late = series.late_phase(x, fraction=fraction)
        np.testing.assert_array_equal(late, x[int(m * (1 - fraction)) :])
        if fraction == 0.5:
            np.testing.assert_array_equal(late, x[m // 2 :])


def test_late_phase_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        series.late_phase(VALUES, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        series.late_phase(VALUES, fraction=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        series.late_phase(VALUES)
    with pytest.raises(ValueError, match="exactly one"):
        series.late_phase(VALUES, fraction=0.5, start=2)


def test_late_median_leaves_out_non_finite_values():
    assert series.late_median(VALUES, fraction=0.5) == pytest.approx(8.5)
    assert series.late_median([3.0, 1.0, 2.0], fraction=1.0) == 2.0
    assert series.late_median([1.0, math.inf, 3.0, 5.0], start=1) == 4.0
    assert math.isnan(series.late_median([1.0, np.nan], fraction=0.5))
    assert math.isnan(series.late_median([], fraction=0.5))


def test_first_reached():
    assert series.first_reached([0.5, np.nan, 0.95, 0.8, 1.2], 0.9) == 2
    assert series.first_reached([0.5, 0.8], 0.9) is None
    assert series.first_reached([], 0.9) is None
    assert series.first_reached(np.asarray([0.9]), 0.9) == 0


def test_final_value_is_the_mean_of_the_last_finite_values():
    assert series.final_value([1.0, 2.0, np.nan, 4.0, 6.0], 2) == 5.0
    assert series.final_value([1.0, 2.0, 4.0, np.inf], 2) == 3.0
    assert series.final_value([3.0], 5) == 3.0
    assert math.isnan(series.final_value([np.nan], 1))
    assert math.isnan(series.final_value([], 1))
    with pytest.raises(ValueError, match="window"):
        series.final_value([1.0], 0)


def test_sharpening_phase_runs_up_to_the_first_peak():
    np.testing.assert_array_equal(series.sharpening_phase([1.0, 3.0, 2.0, 5.0, 4.0]), [0, 1, 2, 3])
    np.testing.assert_array_equal(series.sharpening_phase([np.nan, 2.0, 1.0]), [0, 1])
    np.testing.assert_array_equal(series.sharpening_phase([1.0, 4.0, 2.0, 4.0]), [0, 1])
    assert series.sharpening_phase([np.nan]).size == 0
    assert series.sharpening_phase([]).size == 0
