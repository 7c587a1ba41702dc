"""The quotient geometry at a point in one program: the split of a given update and of the
gradient step, the spectra and what is recorded with them; the summaries along an orbit and
the helpers of the drift and the split on known answers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sharpness_jax import models, operators, quotient, quotient_spectra, symmetries
from sharpness_jax.objective import Batch, get_loss
from sharpness_jax.quotient_summary import (
    conserved_scale,
    log_slope,
    orbit_scales,
    orbit_summary,
    point_summary,
    relative_change,
    relative_drift,
    shallow_activation,
    split_ratios,
)


def test_shallow_activation():
    assert shallow_activation({"name": "quadratic"}) == "quadratic"
    assert shallow_activation({"name": "shallow"}) == "relu"
    assert shallow_activation({"name": "shallow", "activation": "leaky_relu"}) == "leaky_relu"
    with pytest.raises(ValueError, match="no continuous rescaling"):
        shallow_activation({"name": "shallow", "activation": "tanh"})
    with pytest.raises(ValueError, match="shallow or quadratic"):
        shallow_activation({"name": "mlp"})


def _shallow_point():
    model = models.build_model(
        "shallow", input_shape=(3,), num_outputs=2, width=4, param_dtype="float64"
    )
    params = model.init(jax.random.PRNGKey(0))
    kx, ky, kd = jax.random.split(jax.random.PRNGKey(1), 3)
    batch = Batch(jax.random.normal(kx, (5, 3)), jax.random.normal(ky, (5, 2)))
    flat, unravel = ravel_pytree(params)
    delta = unravel(0.01 * jax.random.normal(kd, flat.shape))
    return params, batch, delta


def test_point_summary_splits_the_update_and_the_gradient_step():
    params, batch, delta = _shallow_point()
    objective = quotient_spectra.shallow_objective(
        get_loss("squared_error_half"), activation="relu"
    )
    gradient = operators.gradient(objective, params, batch)
    eta = 0.3
    kw = {"activation": "relu", "loss_name": "squared_error_half"}
    out = point_summary(
        params, batch, delta, gradient, jnp.asarray(eta), jnp.asarray(1e-6),
        generalised=False, split=True, **kw,
    )  # fmt: skip
    norm = lambda t: float(jnp.linalg.norm(ravel_pytree(t)[0]))
    assert out["split_step_norm"] == pytest.approx(norm(delta), rel=1e-12)
    h, v = out["split_horizontal_norm"], out["split_vertical_norm"]
    assert h**2 + v**2 == pytest.approx(norm(delta) ** 2, rel=1e-10)  # Euclidean: orthogonal
    parts = quotient.decompose_update(params, delta, batch.inputs, activation="relu")
    assert h == pytest.approx(norm(parts.horizontal), rel=1e-10)
    assert out["split_si_step_norm"] == pytest.approx(eta * norm(gradient), rel=1e-12)
    assert out["quotient_gradient_norm"] == pytest.approx(norm(gradient), rel=1e-12)
    p = ravel_pytree(params)[0].size
    assert out["quotient_ambient"].shape == (p,)
    assert out["quotient_reduced"].shape == (p - 4,)
    assert not any(k.startswith("quotient_generalised") for k in out)
    plain = point_summary(
        params, batch, delta, gradient, jnp.asarray(eta), jnp.asarray(1e-6),
        generalised=True, split=False, **kw,
    )  # fmt: skip
    assert not any(k.startswith("split") for k in plain)
    assert plain["quotient_generalised"].shape == (p - 4,)
    np.testing.assert_allclose(plain["quotient_ambient"], out["quotient_ambient"], rtol=1e-12)


def test_relative_change_and_drift():
    ref = np.array([4.0, 1.0, -2.0])
    assert relative_change(ref, ref) == 0.0
    assert relative_change(ref + np.array([0.0, 0.4, 0.0]), ref) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="different sizes"):
        relative_change(ref[:2], ref)
    q = np.array([[1.0, -1.0], [1.5, -1.0], [0.5, -2.0]])
    np.testing.assert_allclose(relative_drift(q, 2.0), [0.0, 0.25, 0.5])


def test_log_slope_recovers_a_power_law():
    x = np.array([0.01, 0.02, 0.04, 0.08])
    assert log_slope(x, 3.0 * x**1.5) == pytest.approx(1.5)
    assert math.isnan(log_slope([1.0], [2.0]))
    assert log_slope([1.0, 2.0, -1.0], [1.0, 2.0, 5.0]) == pytest.approx(1.0)


def test_orbit_scales():
    grid, per_unit = orbit_scales(0.1, 10.0, 5, 3, 4, seed=0)
    np.testing.assert_allclose(grid, [0.1, 10**-0.5, 1.0, 10**0.5, 10.0])
    assert per_unit.shape == (3, 4)
    assert np.all((per_unit >= 0.1) & (per_unit <= 10.0))
    with pytest.raises(ValueError, match="orbit range"):
        orbit_scales(2.0, 10.0, 5, 3, 4, seed=0)


def test_conserved_scale_and_split_ratios():
    params = {"w": jnp.ones((2, 3)), "b": jnp.full((2,), 2.0), "a": jnp.ones((2, 1))}
    # (1/m) Σ_i (k‖a_i‖² + ‖w_i‖² + b_i²) = (2·2 + 6 + 8) / 2
    assert conserved_scale(params, 2) == pytest.approx(9.0)
    assert conserved_scale({"w": params["w"], "a": params["a"]}, 1) == 4.0
    values = {"jvp_horizontal": 2.0, "horizontal_norm": 1.0, "jvp_vertical": 1.0}
    values.update(vertical_norm=4.0, step_norm=5.0)
    columns = {
        f"{prefix}_{key}": np.array([value])
        for prefix in ("split", "split_si")
        for key, value in values.items()
    }
    out = split_ratios(columns)
    for prefix in ("split", "split_si"):
        np.testing.assert_allclose(out["ratio"][prefix], [(1.0 / 4.0) / 2.0])
        np.testing.assert_allclose(out["fraction"][prefix], [0.8])


def test_orbit_summary_follows_the_rescaling_orbit():
    """λ_max(H) at c = 1 is the reference's; the near-zero counts and spectra at a rescaled
    point are point_summary's there."""
    params, batch, _ = _shallow_point()
    grid, per_unit = np.array([0.5, 1.0, 2.0]), np.array([[0.5, 2.0, 1.0, 3.0]])
    kw = {"activation": "relu", "loss_name": "squared_error_half", "generalised": False}
    out = orbit_summary(params, batch, 1e-6, grid=grid, per_unit=per_unit, **kw)
    np.testing.assert_array_equal(out["c"], grid)
    assert out["ambient_lambda_max"].shape == (3,)
    assert out["ambient_lambda_max_all"].shape == (4,)
    assert out["ambient_lambda_max"][1] == pytest.approx(out["reference_ambient"][0], rel=1e-12)
    moved = symmetries.rescale_units(params, jnp.full(4, 2.0), activation="relu")
    zeros = jax.tree.map(jnp.zeros_like, params)
    at = point_summary(
        moved, batch, zeros, zeros, jnp.asarray(0.0), jnp.asarray(1e-6),
        activation="relu", loss_name="squared_error_half", generalised=False, split=True,
    )  # fmt: skip
    assert out["ambient_lambda_max"][2] == pytest.approx(
        float(at["quotient_lambda_max"]), rel=1e-10
    )
    assert out["ambient_zeros"][2] == int(at["quotient_ambient_zeros"])
    lam = out["ambient_lambda_max_all"]
    assert out["ambient_ratio"] == pytest.approx(lam.max() / lam.min())
    assert out["ambient_ratio"] > 1.0  # λ_max(H) moves along the orbit
    assert not any(k.startswith("generalised") for k in out)
