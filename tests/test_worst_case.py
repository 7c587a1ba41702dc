"""Perturbation sharpness against exact answers: the trust-region maximum of a quadratic loss,
σ²tr(H)/2 for Gaussian noise, a dense relative flatness; invariance of the adaptive form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharpness_jax as sj
from sharpness_jax import worst_case
from tests import problems


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)


class _ReLUNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = jax.nn.relu(nn.Dense(5, use_bias=False, name="hidden")(x))
        return nn.Dense(3, use_bias=False, name="out")(hidden)


def _float64(params):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)


@pytest.fixture(scope="module")
def quadratic():
    """Squared error of a linear model: L(θ + ε) − L(θ) = gᵀε + ½ εᵀHε exactly."""
    model = _Linear()
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (12, 2))
    params = _float64(model.init(jax.random.PRNGKey(2), x[0].astype(jnp.float32)))
    objective = sj.Objective(model.apply, sj.get_loss("squared_error_half"))
    return objective, params, sj.Batch(x, y)


def _trust_region_max(g, h, rho):
    """max_{‖ε‖ ≤ ρ} gᵀε + ½εᵀHε: ε = (λI − H)⁻¹g with λ > λ_max(H) and ‖ε‖ = ρ."""
    vals, vecs = np.linalg.eigh(h)
    c = vecs.T @ g

    def norm(lam):
        return np.linalg.norm(c / (lam - vals))

    lo, hi = vals[-1] + 1e-12, vals[-1] + np.linalg.norm(g) / rho + abs(vals).max() + 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    eps = vecs @ (c / (hi - vals))
    return g @ eps + 0.5 * eps @ h @ eps


def test_ascent_reaches_the_trust_region_maximum(quadratic):
    objective, params, batch = quadratic
    g = jax.flatten_util.ravel_pytree(sj.gradient(objective, params, batch))[0]
    h = sj.linalg.dense(sj.hessian(objective, params, batch), params)
    for rho in (0.05, 0.5):
        exact = _trust_region_max(np.asarray(g), np.asarray(h), rho)
        result = worst_case.worst_case_sharpness(objective, params, batch, rho=rho, num_steps=60)
        np.testing.assert_allclose(result.sharpness, exact, rtol=1e-4)
        assert float(result.perturbation_norm) <= rho * (1 + 1e-12)
        sam = worst_case.worst_case_sharpness(objective, params, batch, rho=rho, num_steps=0)
        assert float(sam.sharpness) <= float(result.sharpness) + 1e-15


def test_attained_value_is_the_loss_at_the_reported_perturbation():
    p = problems.mlp_problem(n=8)
    result = worst_case.worst_case_sharpness(p.objective, p.params, p.batch, rho=0.3, num_steps=5)
    moved = jax.tree_util.tree_map(lambda a, e: a + e, p.params, result.perturbation)
    explicit = sj.loss_value(p.objective, moved, p.batch) - sj.loss_value(
        p.objective, p.params, p.batch
    )
    np.testing.assert_allclose(result.sharpness, explicit, rtol=1e-12)
    assert result.num_steps == 5


def _relu_problem():
    model = _ReLUNet()
    x = jax.random.normal(jax.random.PRNGKey(3), (10, 4))
    y = jax.random.randint(jax.random.PRNGKey(4), (10,), 0, 3)
    params = _float64(model.init(jax.random.PRNGKey(5), x[0].astype(jnp.float32)))
    objective = sj.Objective(model.apply, sj.get_loss("cross_entropy"))
    c = 4.0
    p = params["params"]
    rescaled = {
        "params": {
            "hidden": {"kernel": p["hidden"]["kernel"] * c},
            "out": {"kernel": p["out"]["kernel"] / c},
        }
    }
    return objective, params, rescaled, sj.Batch(x, y)


def test_adaptive_sharpness_is_invariant_to_layer_rescaling():
    """Kwon et al. 2021 / Andriushchenko et al. 2023: adaptive sharpness (ξ = 0) is invariant
    to the rescaling that leaves a ReLU network's function unchanged; S_ρ is not."""
    objective, params, rescaled, batch = _relu_problem()

    def sharp(theta, adaptive):
        return float(
            worst_case.worst_case_sharpness(
                objective, theta, batch, rho=0.1, num_steps=8, adaptive=adaptive
            ).sharpness
        )

    np.testing.assert_allclose(sharp(params, True), sharp(rescaled, True), rtol=1e-9)
    assert not np.isclose(sharp(params, False), sharp(rescaled, False), rtol=1e-3)
    avg = [
        worst_case.average_sharpness(
            objective, t, batch, sigma=0.05, key=jax.random.PRNGKey(0), adaptive=True
        ).value
        for t in (params, rescaled)
    ]
    np.testing.assert_allclose(avg[0], avg[1], rtol=1e-9)


def test_m_sharpness_averages_the_batches(quadratic):
    objective, params, batch = quadratic
    whole = worst_case.worst_case_sharpness(objective, params, batch, rho=0.2, num_steps=4)
    np.testing.assert_allclose(
        worst_case.m_sharpness(objective, params, batch, m=12, rho=0.2, num_steps=4),
        whole.sharpness,
        rtol=1e-10,
    )
    parts = [
        worst_case.worst_case_sharpness(
            objective,
            params,
            jax.tree_util.tree_map(lambda a, i=i: a[4 * i : 4 * i + 4], batch),
            rho=0.2,
            num_steps=4,
        ).sharpness
        for i in range(3)
    ]
    np.testing.assert_allclose(
        worst_case.m_sharpness(objective, params, batch, m=4, rho=0.2, num_steps=4),
        np.mean(parts),
        rtol=1e-10,
    )
    with pytest.raises(ValueError, match="divide"):
        worst_case.m_sharpness(objective, params, batch, m=5, rho=0.2)


def test_average_sharpness_of_a_quadratic_is_half_sigma_squared_trace(quadratic):
    objective, params, batch = quadratic
    sigma = 0.1
    exact = (
        0.5 * sigma**2 * float(sj.linalg.trace_exact(sj.hessian(objective, params, batch), params))
    )
    est = worst_case.average_sharpness(
        objective, params, batch, sigma=sigma, key=jax.random.PRNGKey(1), num_samples=400
    )
    assert float(est.stderr) > 0 and est.num_probes == 400
    assert abs(float(est.value) - exact) < 4 * float(est.stderr)


def test_relative_flatness_matches_the_dense_definition():
    p = problems.mlp_problem(n=8)
    path = "params/Dense_0/kernel"
    w = p.params["params"]["Dense_0"]["kernel"]

    def loss_of_kernel(k):
        params = jax.tree_util.tree_map(lambda a: a, p.params)
        params["params"]["Dense_0"]["kernel"] = k
        return sj.loss_value(p.objective, params, p.batch)

    h = jax.hessian(loss_of_kernel)(w)  # (in, out, in, out)
    d_out = w.shape[1]
    expected = sum(
        float(w[:, s] @ w[:, t]) * float(sum(h[i, s, i, t] for i in range(w.shape[0])))
        for s in range(d_out)
        for t in range(d_out)
    )
    value = worst_case.relative_flatness(p.objective, p.params, p.batch, kernel=path)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    with pytest.raises(ValueError, match="2-D kernel"):
        worst_case.relative_flatness(p.objective, p.params, p.batch, kernel="params/Dense_0/bias")


def test_bad_settings_are_refused(quadratic):
    objective, params, batch = quadratic
    with pytest.raises(ValueError, match="rho"):
        worst_case.worst_case_sharpness(objective, params, batch, rho=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        worst_case.worst_case_sharpness(objective, params, batch, rho=0.1, num_steps=-1)
    with pytest.raises(ValueError, match="sigma"):
        worst_case.average_sharpness(
            objective, params, batch, sigma=0.0, key=jax.random.PRNGKey(0), num_samples=4
        )
    with pytest.raises(ValueError, match="num_samples"):
        worst_case.average_sharpness(
            objective, params, batch, sigma=0.1, key=jax.random.PRNGKey(0), num_samples=1
        )
