"""Loss-landscape slices against explicit loss evaluations; filter normalisation's invariance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharpness_jax as sj
from sharpness_jax import landscape
from tests import problems


@pytest.fixture(scope="module")
def mlp():
    p = problems.mlp_problem(n=9)
    return p.objective, p.params, p.batch


def _loss_at(objective, params, batch, *terms):
    point = jax.tree_util.tree_map(
        lambda p, *us: p + sum(c * u for c, u in zip(terms[::2], us, strict=True)),
        params,
        *terms[1::2],
    )
    return float(jnp.mean(objective.batch_losses(point, batch)))


def test_slice_1d_equals_explicit_losses(mlp):
    objective, params, batch = mlp
    u = landscape.filter_normalised_direction(params, jax.random.PRNGKey(0))
    alphas = np.linspace(-1.0, 1.0, 7)
    result = landscape.slice_1d(objective, params, batch, u, alphas, chunk_size=4, grid_chunk=3)
    expected = [_loss_at(objective, params, batch, a, u) for a in alphas]
    np.testing.assert_allclose(result.values, expected, rtol=1e-12)
    assert result.betas is None
    np.testing.assert_allclose(result.values[3], float(sj.loss_value(objective, params, batch)))


def test_slice_2d_equals_explicit_losses(mlp):
    objective, params, batch = mlp
    u = landscape.filter_normalised_direction(params, jax.random.PRNGKey(1))
    v = landscape.filter_normalised_direction(params, jax.random.PRNGKey(2))
    alphas, betas = np.linspace(-0.5, 0.5, 3), np.linspace(-1.0, 1.0, 4)
    result = landscape.slice_2d(objective, params, batch, (u, v), alphas, betas, grid_chunk=5)
    assert result.values.shape == (3, 4)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            expected = _loss_at(objective, params, batch, a, u, b, v)
            np.testing.assert_allclose(result.values[i, j], expected, rtol=1e-12)


def test_filter_normalisation_matches_filter_norms(mlp):
    _, params, _ = mlp
    d = landscape.filter_normalised_direction(params, jax.random.PRNGKey(3))
    for p, u in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(d), strict=True):
        if p.ndim == 1:
            assert not np.any(u)
        else:
            np.testing.assert_allclose(
                np.linalg.norm(u, axis=0), np.linalg.norm(p, axis=0), rtol=1e-12
            )


class _ReLUNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = jax.nn.relu(nn.Dense(6, use_bias=False, name="hidden")(x))
        return nn.Dense(3, use_bias=False, name="out")(hidden)


def test_filter_normalised_slice_is_invariant_to_unit_rescaling():
    """Li et al. 2018 §4: a ReLU layer's weights ×c and the next layer's ×1/c leave the
    function and the filter-normalised slice unchanged; a fixed direction's slice changes."""
    model = _ReLUNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 4))
    y = jax.random.randint(jax.random.PRNGKey(1), (10,), 0, 3)
    params = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(2), x[0].astype(jnp.float32))
    )
    objective = sj.Objective(model.apply, sj.get_loss("cross_entropy"))
    batch = sj.Batch(x, y)
    c = 5.0
    p = params["params"]
    rescaled = {
        "params": {
            "hidden": {"kernel": p["hidden"]["kernel"] * c},
            "out": {"kernel": p["out"]["kernel"] / c},
        }
    }
    alphas = np.linspace(-1.0, 1.0, 5)
    key = jax.random.PRNGKey(7)

    def slice_at(theta, normalise):
        if normalise:
            u = landscape.filter_normalised_direction(theta, key)
        else:
            u = landscape.filter_normalised_direction(params, key)
        return landscape.slice_1d(objective, theta, batch, u, alphas).values

    np.testing.assert_allclose(slice_at(params, True), slice_at(rescaled, True), rtol=1e-10)
    assert not np.allclose(slice_at(params, False), slice_at(rescaled, False), rtol=1e-3)


def test_interpolation_passes_both_endpoints(mlp):
    objective, params, batch = mlp
    other = jax.tree_util.tree_map(lambda a: a + 0.3, params)
    d = landscape.interpolation_direction(params, other)
    result = landscape.slice_1d(objective, params, batch, d, [0.0, 1.0])
    np.testing.assert_allclose(result.values[0], float(sj.loss_value(objective, params, batch)))
    np.testing.assert_allclose(result.values[1], float(sj.loss_value(objective, other, batch)))


def test_eigen_directions_are_hessian_eigenvectors(mlp):
    objective, params, batch = mlp
    (u,) = landscape.eigen_directions(objective, params, batch, k=1, num_iters=40)
    h = sj.linalg.dense(sj.hessian(objective, params, batch), params)
    flat = jax.flatten_util.ravel_pytree(u)[0]
    np.testing.assert_allclose(flat @ h @ flat, np.linalg.eigvalsh(h)[-1], rtol=1e-8)


def test_save_and_plot(mlp, tmp_path):
    objective, params, batch = mlp
    u = landscape.filter_normalised_direction(params, jax.random.PRNGKey(0))
    one = landscape.slice_1d(objective, params, batch, u, np.linspace(-1, 1, 4))
    two = landscape.slice_2d(objective, params, batch, (u, u), [0.0, 1.0], [0.0, 1.0])
    path = landscape.save_slice(tmp_path / "slice", two)
    loaded = np.load(path)
    np.testing.assert_allclose(loaded["values"], two.values)
    sj.plots.save(landscape.plot_1d(one, label="u"), tmp_path / "one.png")
    sj.plots.save(landscape.plot_2d(two, levels=5), tmp_path / "two.png")
    assert (tmp_path / "one.png").stat().st_size > 0 and (tmp_path / "two.png").stat().st_size > 0
    with pytest.raises(ValueError, match="1-D slice"):
        landscape.plot_1d(two)


def test_bad_inputs_are_refused(mlp):
    objective, params, batch = mlp
    u = landscape.filter_normalised_direction(params, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="alphas"):
        landscape.slice_1d(objective, params, batch, u, [])
    wrong = {"params": {"x": jnp.zeros(3)}}
    with pytest.raises((ValueError, TypeError)):
        landscape.slice_1d(objective, params, batch, wrong, [0.0])
