"""The noise–curvature study: the smoke preset end to end (records, resume, summary) and its
per-layer analysis against dense references and the library's own fits."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import mlp_problem, rel_err
from study_runs import run_twice

from experiments.configs import noise_curvature as study_config
from experiments.studies import common
from experiments.studies import noise_curvature as study
from sharpness_jax import comparisons, linalg, power_law, records, subsets
from sharpness_jax.config import validate_config

_LAYERS = ("params/Dense_1/kernel", "params/Dense_2/kernel")


def _expected_claims():
    claims = []
    for label in ("CE", "MSE"):
        for layer in _LAYERS:
            claims += [
                f"1 ≤ γ ≤ 2 in the Hessian eigenbasis ({label}, {layer})",
                f"C and H nearly commute ({label}, {layer}): commutator / random-rotation baseline",
                f"C ∝ E_p[h_p²] ({label}, {layer}): γ predicted from E_p[h_p²] minus measured γ",
            ]
    claims += [f"γ(CE) > γ(MSE) in the Hessian eigenbasis ({layer})" for layer in _LAYERS]
    return claims


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study run twice in the same workdir, the second time with the training loop
    counted and the analyses forbidden."""
    workdir = tmp_path_factory.mktemp("noise_curvature")
    config = study_config.get_config("smoke")
    r = run_twice(study, config, workdir, forbid=[(study, "_analyse")])
    return r.workdir, r.config, r.first, r.second, r.metrics, r.calls


def test_smoke_summary(smoke):
    workdir, config, first, second, _, _ = smoke
    assert tuple(config.layers) == _LAYERS
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["study"] == study.NAME and summary["preset"] == "smoke"
    assert [c["claim"] for c in summary["checks"]] == _expected_claims()
    for c in summary["checks"]:
        assert isinstance(c["value"], float) and math.isfinite(c["value"]), c
        assert c["passed"] in (True, False), c
    for loss in config.losses:
        entry = summary["results"][loss]
        assert entry["status"] == "completed"
        assert set(entry["layers"]) == set(_LAYERS)
        for res in entry["layers"].values():
            assert res["num_examples"] == config.analysis_examples
            assert res["num_eigen"] == study.num_eigen(res["num_params"], config.eigen_fraction)
            for fit in res["fits"].values():
                assert math.isfinite(fit["gamma"]) and 0 <= fit["r2"] <= 1 + 1e-6
                assert fit["ci_low"] <= fit["gamma"] <= fit["ci_high"]
            assert 0 < res["relative_commutator"] and 0 < res["baseline_mean"]
    assert len(summary["figures"]) == 5
    for fig in summary["figures"]:
        assert (workdir / fig).stat().st_size > 0
    for name in ("checks", "results", "figures", "passed"):
        assert second[name] == first[name] == summary[name]


def test_smoke_runs_and_analyses_recorded(smoke):
    workdir, config, _, _, metrics, _ = smoke
    assert sorted(metrics) == sorted(config.losses)
    for loss in config.losses:
        rows = records.read_metrics(workdir / "runs" / loss)
        assert [r["step"] for r in rows] == [0, 20, 40]
        assert all(math.isfinite(r["train_loss"]) and "train_accuracy" in r for r in rows)
        for layer in config.layers:
            stored = json.loads(
                (workdir / "analysis" / f"{loss}__{layer.replace('/', '_')}.json").read_text()
            )
            assert stored["num_params"] in (8 * 8, 8 * 10)


def test_smoke_rerun_retrains_nothing(smoke):
    workdir, config, _, _, metrics, calls = smoke
    assert len(calls) == len(config.losses)
    for result in calls:
        assert result.status == "completed" and result.resumed_from == config.base.max_steps
        assert result.traces.get("train_step", 0) == 0
    after = {p.parent.name: p.read_bytes() for p in (workdir / "runs").glob("*/metrics.jsonl")}
    assert after == metrics


# ----------------------------------------------------------------- the per-layer analysis


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
        lambda p, b: study.layer_quantities(
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
    fits = study._power_law_fits(*study.fit_pairs(q, num_eigen=num), key=key, num_resamples=50)
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
    ours = study.commutation(jnp.asarray(q["c"]), jnp.asarray(q["h"]), key=key, num_rotations=3)
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
    xs, ys = study.fit_pairs(q, num_eigen=4, length=20)  # the shapes of the layer problem
    assert xs.shape == ys.shape == (len(study.FITS), 20)
    assert np.all(np.isnan(xs[:3, 4:])) and np.all(np.isnan(xs[3:, 12:]))
    fits = study._power_law_fits(xs, ys, key=jax.random.PRNGKey(0), num_resamples=50)
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
        study.fit_pairs(q, num_eigen=4, length=5)


def test_num_eigen():
    assert study.num_eigen(2500, 0.4) == 1000
    assert study.num_eigen(500, 0.4) == 200
    assert study.num_eigen(3, 0.1) == 2
    assert study.num_eigen(5, 1.0) == 5
    with pytest.raises(ValueError, match="eigen_fraction"):
        study.num_eigen(10, 0.0)


def test_loss_comparison_needs_disjoint_intervals():
    config = study_config.get_config("smoke")

    def results(ce, mse):
        def fit(g, lo, hi):
            return {
                "layers": {
                    _LAYERS[0]: {"fits": {"eigen": {"gamma": g, "ci_low": lo, "ci_high": hi}}}
                }
            }

        return {"cross_entropy": fit(*ce), "squared_error_half": fit(*mse)}

    config.layers = _LAYERS[:1]
    (above,) = study._loss_comparison_checks(config, results((1.4, 1.3, 1.5), (1.0, 0.9, 1.1)))
    (overlap,) = study._loss_comparison_checks(config, results((1.2, 1.05, 1.3), (1.0, 0.9, 1.1)))
    (below,) = study._loss_comparison_checks(config, results((1.0, 0.9, 1.1), (1.4, 1.3, 1.5)))
    assert above.passed is True and abs(above.value - 0.4) < 1e-12
    assert overlap.passed is False and below.passed is False


def test_configs_build():
    for preset in ("smoke", "quick", "paper"):
        config = study_config.get_config(preset)
        assert config.preset == preset and tuple(config.layers) == _LAYERS
        for loss in config.losses:
            run_cfg = common.run_config(config.base, **{"loss.name": loss})
            assert validate_config(run_cfg).loss.name == loss  # needs no data
    with pytest.raises(ValueError, match="preset"):
        study_config.get_config("huge")
