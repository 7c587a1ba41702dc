"""The quotient geometry at a point in one program: the split of a given update and of the
gradient step, the spectra and what is recorded with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sharpness_jax import models, operators, quotient, quotient_spectra
from sharpness_jax.objective import Batch, get_loss
from sharpness_jax.quotient_summary import point_summary, shallow_activation


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
