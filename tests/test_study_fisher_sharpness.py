"""The Fisher-sharpness study: the smoke preset end to end (records, resume, summary), the
per-net measurements against dense references, and the pure helpers on known answers."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import mlp_problem, rel_err
from study_runs import run_twice

from experiments.configs import fisher_sharpness as study_config
from experiments.studies import fisher_sharpness as study
from sharpness_jax import pac_bayes, records
from sharpness_jax.config import validate_config


def _expected_claims():
    m = study.MEASURES
    claims = [f"{m[k]} is invariant under function-preserving rescaling" for k in study.INVARIANT]
    claims.append("the rescaled nets compute the same function")
    claims += [f"{m[k]} changes under rescaling by a large factor" for k in study.EUCLIDEAN]
    for k in ("riemannian_sharpness", "riemannian_sharpness_damped"):
        claims += [
            f"{m[k]} rises with the temperature η/B",
            f"{m[k]} tracks the loss gap better than λ_max(H) and tr(H)",
        ]
    return claims


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study run twice in the same workdir, the second time with analyses forbidden."""
    workdir = tmp_path_factory.mktemp("fisher_sharpness")
    config = study_config.get_config("smoke")
    r = run_twice(study, config, workdir, forbid=[(study._Setup, "analyse")])
    return r.workdir, r.config, r.first, r.second, r.metrics, r.analyses, r.calls


def test_smoke_summary(smoke):
    workdir, config, first, second, _, _, _ = smoke
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["study"] == study.NAME and summary["preset"] == "smoke"
    assert [c["claim"] for c in summary["checks"]] == _expected_claims()
    for c in summary["checks"]:
        assert isinstance(c["value"], float) and math.isfinite(c["value"]), c
        assert c["passed"] in (True, False), c
    result = summary["results"]["mnist5k"]
    runs = result["runs"]
    assert len(runs) == len(study.grid(config)) == 4
    for name, row in runs.items():
        for key in (*study.MEASURES, "gap_loss", "gap_error", "pac_bayes_bound"):
            assert math.isfinite(row[key]), (name, key)
            assert math.isfinite(row.get(f"{key}_rescaled", 0.0)), (name, key)
        assert row["damping"] == config.damping
        assert row["riemannian_sharpness_stderr"] >= 0
    assert set(result["rank_correlations"]) >= set(study.MEASURES)
    assert len(summary["figures"]) == 4
    for fig in summary["figures"]:
        assert (workdir / fig).stat().st_size > 10_000
    assert (second["checks"], second["results"]) == (first["checks"], first["results"])
    assert (summary["checks"], summary["results"]) == (first["checks"], first["results"])


def test_smoke_exact_claims_hold(smoke):
    """Invariance and function preservation are identities: they hold at smoke scale."""
    checks = {c["claim"]: c for c in smoke[2]["checks"]}
    claims = _expected_claims()
    for claim in claims[:3]:
        assert checks[claim]["value"] < 1e-8, claims
    assert checks[claims[3]]["value"] < 1e-12


def test_smoke_rerun_trains_and_analyses_nothing(smoke):
    workdir, config, _, _, metrics, analyses, calls = smoke
    assert len(calls) == len(study.grid(config))
    assert all(result.resumed_from == result.step for result in calls)
    assert {
        p.parent.name: p.read_bytes() for p in sorted((workdir / "runs").glob("*/metrics.jsonl"))
    } == metrics
    assert {p.name: p.read_bytes() for p in sorted((workdir / "analysis").glob("*"))} == analyses


def test_smoke_runs_record_the_final_evaluation(smoke):
    workdir, config, _, _, _, _, _ = smoke
    names = [study.run_name("mnist5k", run) for run in study.grid(config)]
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == sorted(names)
    for name in names:
        cols = records.metric_columns(records.read_metrics(workdir / "runs" / name))
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            assert np.all(np.isfinite(cols[key])), (name, key)


def test_paper_config_builds():
    config = study_config.get_config("paper")
    assert set(config.setups) == {"mnist", "cifar10"}
    assert len(study.grid(config)) == 4 * 3 + 2 * 3
    for name in config.setups:
        setup = study._Setup(config, name)
        assert setup.run_base.model.activation == "relu"
        for run in study.grid(config):  # validates without the data
            validate_config(setup.run_config(run))
    with pytest.raises(ValueError, match="unknown preset"):
        study_config.get_config("huge")


# ------------------------------------------------------------------ measurements


class _Reference:
    """Dense H, diagonal of F_emp, true Fisher F = GGN, computed the slow obvious way."""

    def __init__(self, prob):
        flat, unravel = ravel_pytree(prob.params)
        xs, ys = prob.batch

        def losses(f):
            return jax.vmap(prob.objective.example_loss, (None, 0, 0))(unravel(f), xs, ys)

        def outputs(f):
            return jax.vmap(prob.objective.predict, (None, 0))(unravel(f), xs)

        self.flat = np.asarray(flat)
        self.loss = float(jnp.mean(losses(flat)))
        self.H = np.asarray(jax.jit(jax.hessian(lambda f: jnp.mean(losses(f))))(flat))
        g = np.asarray(jax.jit(jax.jacrev(losses))(flat))  # (n, P) per-example gradients
        self.Femp = g.T @ g / g.shape[0]
        jac = np.asarray(jax.jit(jax.jacfwd(outputs))(flat))  # (n, K, P)
        p = np.asarray(jax.nn.softmax(outputs(flat)))
        lam = np.stack([np.diag(q) - np.outer(q, q) for q in p])
        self.G = np.einsum("nkp,nkl,nlq->pq", jac, lam, jac) / g.shape[0]


@pytest.fixture(scope="module")
def relu_problem():
    prob = mlp_problem("relu", "cross_entropy", n=7, d=4, widths=(5, 3))
    return prob, _Reference(prob)


@pytest.fixture(scope="module")
def measured(relu_problem):
    """measure_net (XTrace) of the problem's net and of a rescaled copy, with the same key."""
    prob, _ = relu_problem
    fn = jax.jit(
        lambda p, b, k: study.measure_net(
            prob.objective,
            p,
            b,
            k,
            damping=1e-3,
            estimator="xtrace",
            num_probes=20,
            probe_chunk=None,
            lanczos_iters=43,
            lanczos_tol=None,
            full_fisher_subset="params/Dense_1",
        )
    )
    rescaled = study.rescale(
        jax.random.PRNGKey(7), prob.params, layer_log_std=1.0, unit_log_std=1.0
    )
    key = jax.random.PRNGKey(0)
    out = [
        {k: np.asarray(v) for k, v in fn(p, prob.batch, key).items()}
        for p in (prob.params, rescaled)
    ]
    return rescaled, out[0], out[1]


def test_measure_net_matches_dense_references(relu_problem, measured):
    prob, ref = relu_problem
    _, out, _ = measured
    d = np.diag(ref.Femp)
    keep = d > 0
    h = np.diag(ref.H)
    exact = {
        "riemannian_sharpness": np.sum(h[keep] / d[keep]),
        "riemannian_sharpness_damped": np.sum(h / (d + 1e-3)),
        "trace_hessian": np.trace(ref.H),
    }
    for name, value in exact.items():  # XTrace: within 5 standard errors
        assert 0 <= out[f"{name}_stderr"] < 0.2 * abs(value), name
        assert abs(out[name] - value) <= 5 * out[f"{name}_stderr"] + 1e-10 * abs(value), name
    assert out["num_excluded"] == np.sum(~keep)
    np.testing.assert_allclose(out["fisher_diagonal"], d, rtol=1e-12, atol=1e-300)
    assert rel_err(out["lambda_max"], np.linalg.eigvalsh(ref.H)[-1]) < 1e-8
    s = np.where(keep, 1 / np.sqrt(np.where(keep, d, 1)), 0)
    whitened = s[:, None] * ref.H * s[None, :]
    assert rel_err(out["riemannian_lambda_max"], np.linalg.eigvalsh(whitened)[-1]) < 1e-8
    # tr(F⁺H) on the output layer's block, F the true Fisher (= GGN for cross-entropy).
    marks = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.full(a.shape, "Dense_1" in jax.tree_util.keystr(path), bool),
        prob.params,
    )
    block = np.asarray(ravel_pytree(marks)[0])
    hb, fb = ref.H[np.ix_(block, block)], ref.G[np.ix_(block, block)]
    mu, u = np.linalg.eigh(fb)
    kept = mu > block.sum() * np.finfo(float).eps * mu.max()
    w = u[:, kept] / np.sqrt(mu[kept])
    assert rel_err(out["full_fisher_sharpness"], np.trace(w.T @ hb @ w)) < 1e-8
    assert out["full_fisher_rank"] == kept.sum() < block.sum()  # singular: softmax shift
    assert rel_err(out["analysis_loss"], ref.loss) < 1e-12


def test_measure_net_is_invariant_under_rescaling(relu_problem, measured):
    """With the same key the Riemannian estimates of a rescaled net are the same numbers,
    while λ_max(H), tr(H) and the damped Ŝ_R,ε move."""
    prob, _ = relu_problem
    rescaled, out, after = measured
    xs = prob.batch.inputs
    f0 = jax.vmap(prob.objective.predict, (None, 0))(prob.params, xs)
    f1 = jax.vmap(prob.objective.predict, (None, 0))(rescaled, xs)
    np.testing.assert_allclose(f1, f0, rtol=1e-12, atol=1e-12)
    for name in study.INVARIANT:
        assert study.relative_change(out[name], after[name]) < 1e-9, name
    damped = "riemannian_sharpness_damped"
    assert study.relative_change(out[damped], after[damped]) > 1e-6
    for name in study.EUCLIDEAN:
        assert study.change_factor(out[name], after[name]) > 1.05, name


def test_trace_estimators():
    a = np.random.default_rng(0).standard_normal((6, 6))
    a = a @ a.T + np.diag(np.arange(1.0, 7.0) ** 2)
    template = {"x": jnp.zeros(6)}

    def matvec(v):
        return {"x": jnp.asarray(a) @ v["x"]}

    exact = study._trace(
        matvec, template, estimator="exact", key=None, num_probes=None, probe_chunk=None
    )
    assert float(exact.value) == pytest.approx(np.trace(a), rel=1e-12)
    assert float(exact.stderr) == 0 and exact.num_probes == 0
    for estimator in ("xtrace", "hutchinson"):
        estimate = jax.jit(
            lambda k, e=estimator: study._trace(
                matvec, template, estimator=e, key=k, num_probes=5, probe_chunk=None
            )
        )
        est = estimate(jax.random.PRNGKey(1))
        assert abs(float(est.value) - np.trace(a)) <= 5 * float(est.stderr) + 1e-9, estimator
    with pytest.raises(ValueError, match="estimator"):
        study._trace(
            matvec, template, estimator="lanczos", key=None, num_probes=1, probe_chunk=None
        )


def test_pac_bayes_terms_take_the_best_grid_point(relu_problem):
    prob, ref = relu_problem
    d = jnp.asarray(np.diag(ref.Femp))
    rhos, variances = (1e-4, 1e-2), (0.1, 1.0)
    kwargs = dict(train_loss=0.7, sharpness=50.0, damping=1e-3, n=7, delta=0.1)
    terms = study.pac_bayes_terms(prob.params, d, rhos=rhos, prior_variances=variances, **kwargs)
    bounds = []
    for rho in rhos:
        for var in variances:
            kl = pac_bayes.fisher_posterior_kl(
                prob.params, d, rho=rho, prior_variance=var, damping=1e-3
            )
            bound = pac_bayes.pac_bayes_bound(
                0.7, 50.0, kl, rho=rho, n=7, delta=0.1 / 4, damping=1e-3
            )
            bounds.append((float(bound.bound), rho, var, bound))
    best = min(bounds, key=lambda b: b[0])
    assert terms["bound"] == pytest.approx(best[0], rel=1e-12)
    assert (terms["rho"], terms["prior_variance"]) == (best[1], best[2])
    assert terms["kl"] == pytest.approx(float(best[3].kl), rel=1e-12)
    assert terms["delta_per_grid_point"] == pytest.approx(0.1 / 4)
    assert terms["curvature_term"] == pytest.approx(best[1] / 2 * 50.0)


# ------------------------------------------------------------------ pure helpers


def test_helpers_on_known_answers():
    assert study.temperature(0.1, 32) == pytest.approx(0.1 / 32)
    with pytest.raises(ValueError):
        study.temperature(0.1, 0)
    assert study.relative_change(2.0, 3.0) == 0.5
    assert study.relative_change(0.0, 0.0) == 0.0
    assert study.relative_change(0.0, 1.0) == math.inf
    assert study.change_factor(2.0, 0.5) == 4.0 == study.change_factor(0.5, 2.0)
    assert math.isnan(study.change_factor(-1.0, 2.0))
    np.testing.assert_array_equal(
        study.significant([297.00000012, 296.99999991, 0.0, math.inf, 1234567.8], digits=6),
        [297.0, 297.0, 0.0, math.inf, 1234570.0],
    )
    row = {"train_loss": 0.01, "test_loss": 0.5, "train_accuracy": 1.0, "test_accuracy": 0.9}
    assert study.gap(row) == pytest.approx({"gap_loss": 0.49, "gap_error": 0.1})
    params = {"params": {f"Dense_{i}": {"kernel": np.zeros((2, 2))} for i in range(12)}}
    assert study.output_layer(params) == "params/Dense_11"


def test_grid_and_correlations():
    config = study_config.get_config("smoke")
    runs = study.grid(config)
    assert [r["optimizer"] for r in runs] == ["sgd"] * 3 + ["adam"]
    assert study.run_name("mnist5k", runs[0]) == "mnist5k_sgd_lr0.1_b16"
    rows = []
    for i, r in enumerate(runs):
        row = {**r, "temperature": r["learning_rate"] / r["batch_size"], "gap_loss": float(i)}
        row["gap_error"] = -float(i)
        for m in study.MEASURES:
            row[m] = row[f"{m}_rescaled"] = float(i) if m != "lambda_max" else -float(i)
        row["pac_bayes_bound"] = 1.0
        rows.append(row)
    corr = study.correlations(rows)
    assert corr["riemannian_sharpness"]["gap_loss"] == pytest.approx(1.0)
    assert corr["riemannian_sharpness"]["gap_error"] == pytest.approx(-1.0)
    assert corr["lambda_max"]["gap_loss"] == pytest.approx(-1.0)
    assert corr["riemannian_sharpness"]["temperature"] == pytest.approx(1.0)  # SGD rows only
    assert math.isnan(corr["pac_bayes_bound"]["gap_loss"])  # constant
