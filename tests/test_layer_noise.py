"""One layer's noise and curvature (``layer_noise``): the batched quantities against dense
references on a tiny float64 MLP, the fits against the library's own power laws, the
commutator against ``comparisons.noise_curvature_commutation``, the padding of the fit pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import mlp_problem, rel_err

from sharpness_jax import comparisons, layer_noise, linalg, power_law, subsets

_power_law_fits = jax.jit(layer_noise.power_law_fits, static_argnames=("num_resamples",))


@pytest.fixture(scope="module")
def layer_problem():
    """A tiny ReLU MLP, one analysed layer, the study's quantities and dense references."""
    prob = mlp_problem("relu", "cross_entropy", n=9, d=4, widths=(5, 4, 3), seed=3)
    layer = "params/Dense_1/kernel"
    mask = ravel_pytree(
        subsets.merge(
            jax.tree_util.tree_map(jnp.zeros_like, prob.params),
            {layer: jnp.ones_like(subsets.select(prob.params, layer)[layer])},
        )
    )[0]
    s = np.flatnonzero(np.asarray(mask))
    # Dense references: per-example gradients and Hessians of the flat per-example loss.
    flat, unravel = ravel_pytree(prob.params)

    def loss(f, x, y):
        return prob.objective.example_loss(unravel(f), x, y)

    g, hp = jax.jit(
        jax.vmap(lambda x, y: (jax.grad(loss)(flat, x, y), jax.hessian(loss)(flat, x, y)))
    )(*prob.batch)
    g, hp = np.asarray(g)[:, s], np.asarray(hp)[:, s][:, :, s]  # g_p,S and (h_p)_SS
    centred = g - g.mean(0)
    ref = {"h": hp.mean(0), "c": centred.T @ centred / prob.n, "hp": hp}
    num = 8
    q = jax.jit(
        lambda p, b: layer_noise.layer_quantities(
            prob.objective, p, b, layer=layer, num_eigen=num, chunk_size=4, basis_chunk_size=6
        )
    )(prob.params, prob.batch)
    return prob, layer, num, ref, {k: np.asarray(v) for k, v in q.items()}


def test_layer_quantities_match_dense_references(layer_problem):
    _, _, num, ref, q = layer_problem
    h, c, hp = ref["h"], ref["c"], ref["hp"]
    assert rel_err(q["h"], h) < 1e-10 and rel_err(q["c"], c) < 1e-10
    values, vectors = np.linalg.eigh(h)
    values, vectors = values[::-1], vectors[:, ::-1]
    assert rel_err(q["eigenvalues"], values) < 1e-10
    assert rel_err(q["c_eigen"], np.einsum("pi,pq,qi->i", vectors, c, vectors)) < 1e-9
    e_dense = np.mean([m @ m for m in hp], axis=0)  # E_p[(h_p)_SS²]
    assert rel_err(q["e_eigen"], np.einsum("pi,pq,qi->i", vectors, e_dense, vectors)[:num]) < 1e-9
    assert rel_err(q["h_diag"], np.diag(h)) < 1e-10
    assert rel_err(q["c_diag"], np.diag(c)) < 1e-10
    assert rel_err(q["e_diag"], np.diag(e_dense)) < 1e-10
    assert q["e_eigen"].shape == (num,) and q["eigenvalues"].shape == (20,)


def test_fits_are_the_library_power_laws(layer_problem):
    prob, layer, num, ref, q = layer_problem
    key = jax.random.PRNGKey(0)
    fits = _power_law_fits(*layer_noise.fit_pairs(q, num_eigen=num), key=key, num_resamples=50)
    values, vectors = np.linalg.eigh(ref["h"])
    top = vectors[:, ::-1][:, :num].T
    eigen = linalg.Eigen(
        jnp.asarray(values[::-1][:num]),
        {layer: jnp.asarray(top.reshape(num, 5, 4))},
        jnp.zeros(num),
        jnp.int32(0),
    )

    @jax.jit
    def library_fits(params, batch, eigen):
        kwargs = dict(key=key, num_resamples=50, subset=layer)
        obj = prob.objective
        return {
            "eigen": power_law.eigenbasis_power_law(obj, params, batch, eigen=eigen, **kwargs),
            "eigen_second_moment": power_law.eigenbasis_power_law(
                obj, params, batch, eigen=eigen, against="second_moment", **kwargs
            ),
            "coordinate": power_law.diagonal_power_law(obj, params, batch, **kwargs),
            "coordinate_second_moment": power_law.diagonal_power_law(
                obj, params, batch, against="second_moment", **kwargs
            ),
        }

    library = library_fits(prob.params, prob.batch, eigen)
    for name, fit in library.items():
        assert int(fits[f"{name}/num_used"]) == int(fit.num_used) >= 2, name
        for field in ("gamma", "intercept", "r2"):
            assert abs(float(fits[f"{name}/{field}"]) - float(getattr(fit, field))) < 1e-8, name
        assert fits[f"{name}/ci_low"] <= fits[f"{name}/gamma"] <= fits[f"{name}/ci_high"]


def test_commutation_is_the_library_commutation(layer_problem):
    prob, layer, _, _, q = layer_problem
    key = jax.random.PRNGKey(1)
    ours = layer_noise.commutation(
        jnp.asarray(q["c"]), jnp.asarray(q["h"]), key=key, num_rotations=3
    )
    lib = jax.jit(
        lambda p, b: comparisons.noise_curvature_commutation(
            prob.objective, p, b, key=key, num_rotations=3, subset=layer
        )
    )(prob.params, prob.batch)
    assert abs(float(ours["relative_commutator"]) - float(lib.relative)) < 1e-10
    assert rel_err(ours["baseline_values"], lib.baseline.values) < 1e-10
    assert float(ours["relative_commutator"]) > 0


def test_fit_pairs_pad_and_fit_known_power_laws():
    x = np.geomspace(0.01, 10.0, 12)
    q = {
        "eigenvalues": x,
        "c_eigen": 3.0 * x**1.5,
        "e_eigen": 2.0 * x[:4] ** 1.25,
        "h_diag": x,
        "c_diag": 0.5 * x**1.75,
        "e_diag": x**1.25,
    }
    xs, ys = layer_noise.fit_pairs(q, num_eigen=4, length=20)  # the shapes of the layer problem
    assert xs.shape == ys.shape == (len(layer_noise.FITS), 20)
    assert np.all(np.isnan(xs[:3, 4:])) and np.all(np.isnan(xs[3:, 12:]))
    fits = _power_law_fits(xs, ys, key=jax.random.PRNGKey(0), num_resamples=50)
    expected = {
        "eigen": (1.5, 4),
        "eigen_second_moment": (1.25, 4),
        "eigen_c_vs_second_moment": (1.5 / 1.25, 4),
        "coordinate": (1.75, 12),
        "coordinate_second_moment": (1.25, 12),
        "coordinate_c_vs_second_moment": (1.75 / 1.25, 12),
    }
    for name, (gamma, used) in expected.items():
        assert abs(float(fits[f"{name}/gamma"]) - gamma) < 1e-10, name
        assert int(fits[f"{name}/num_used"]) == used
        assert abs(float(fits[f"{name}/r2"]) - 1.0) < 1e-10
    with pytest.raises(ValueError, match="length"):
        layer_noise.fit_pairs(q, num_eigen=4, length=5)


def test_num_eigen():
    assert layer_noise.num_eigen(2500, 0.4) == 1000
    assert layer_noise.num_eigen(500, 0.4) == 200
    assert layer_noise.num_eigen(3, 0.1) == 2
    assert layer_noise.num_eigen(5, 1.0) == 5
    with pytest.raises(ValueError, match="eigen_fraction"):
        layer_noise.num_eigen(10, 0.0)
