"""Value checks when operators are built, and plain (f, y) -> scalar losses (Λ by autodiff)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import mlp_problem, rel_err

import sharpness_jax as sj


def _huber(f, y, delta=0.5):
    r = f - y
    return jnp.sum(jnp.where(jnp.abs(r) <= delta, 0.5 * r**2, delta * (jnp.abs(r) - 0.5 * delta)))


def _regression(n=6, d=3, k=2, seed=0):
    """A tanh MLP d-4-k with real targets, spread so some residuals fall beyond the Huber kink."""
    kx, ky, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "w1": jax.random.normal(k1, (d, 4)) / np.sqrt(d),
        "b1": jnp.zeros(4),
        "w2": jax.random.normal(k2, (4, k)) / 2.0,
    }

    def predict(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    x = jax.random.normal(kx, (n, d))
    y = 1.5 * jax.random.normal(ky, (n, k))
    return predict, params, sj.Batch(x, y)


def _dense(op, params):
    flat, unravel = ravel_pytree(params)
    eye = np.eye(flat.size)
    return np.stack([ravel_pytree(op(unravel(jnp.asarray(e))))[0] for e in eye], axis=1)


def test_plain_loss_ggn_matches_dense_reference():
    """G = (1/n) Σ_p J_pᵀ Λ_p J_p with J_p from jacfwd and Λ_p from jax.hessian of the loss."""
    predict, params, batch = _regression()
    flat, unravel = ravel_pytree(params)
    ref = []
    for x, y in zip(*batch, strict=True):
        jac = jax.jacfwd(lambda w, x=x: predict(unravel(w), x))(flat)
        lam = jax.hessian(_huber)(predict(params, x), y)
        ref.append(jac.T @ lam @ jac)
    ref = np.mean(ref, axis=0)
    for loss in (_huber, sj.loss_from_function(_huber, "huber")):
        got = _dense(sj.ggn(sj.Objective(predict, loss), params, batch, chunk_size=4), params)
        assert rel_err(got, ref) < 1e-12
    # Some residuals are past the kink (Λ = 0 there), so Λ genuinely varies per example.
    residuals = jax.vmap(predict, (None, 0))(params, batch.inputs) - batch.targets
    assert 0 < np.mean(np.abs(residuals) > 0.5) < 1


def test_plain_loss_matches_the_closed_form_loss():
    """Half squared error as a plain callable: H, GGN, C and the empirical Fisher agree."""
    predict, params, batch = _regression()
    closed = sj.Objective(predict, sj.squared_error(0.5))
    plain = sj.Objective(predict, lambda f, y: 0.5 * jnp.sum((f - y) ** 2))
    for build in (sj.hessian, sj.ggn, sj.gradient_covariance, sj.empirical_fisher):
        a = _dense(build(closed, params, batch), params)
        b = _dense(build(plain, params, batch), params)
        assert rel_err(b, a) < 1e-12, build.__name__
    f, y = predict(params, batch.inputs[0]), batch.targets[0]
    np.testing.assert_allclose(plain.output_hessian(f, y), np.eye(2), atol=1e-14)


def test_fisher_of_a_plain_loss_says_how_to_supply_one():
    predict, params, batch = _regression()
    for loss in (_huber, sj.loss_from_function(_huber, "huber")):
        objective = sj.Objective(predict, loss)
        with pytest.raises(ValueError, match=r"true Fisher.*output_fisher_factor.*sj\.Loss"):
            sj.fisher(objective, params, batch)
        with pytest.raises(ValueError, match=r"Monte-Carlo Fisher.*sample_output_grad"):
            sj.fisher_monte_carlo(objective, params, batch, key=jax.random.PRNGKey(0))
        with pytest.raises(ValueError, match="huber"):
            sj.fisher_metrics.fisher_diagonal(objective, params, batch)


def test_a_loss_given_a_predictive_distribution_gets_its_fisher():
    """The remedy the message names: Λ by autodiff plus B and a sampler gives F = G for MSE."""
    predict, params, batch = _regression()
    eye = jnp.eye(2)
    loss = sj.Loss(
        "half_mse",
        lambda f, y: 0.5 * jnp.sum((f - y) ** 2),
        output_fisher_factor=lambda f: eye,
        sample_output_grad=lambda key, f: -jax.random.normal(key, f.shape),
    )
    objective = sj.Objective(predict, loss)
    g = _dense(sj.ggn(objective, params, batch), params)
    assert rel_err(_dense(sj.fisher(objective, params, batch), params), g) < 1e-12


@pytest.fixture(scope="module")
def classifier():
    prob = mlp_problem(n=5)
    return prob.objective, prob.params, prob.batch


def test_non_finite_inputs_params_and_targets_are_refused(classifier):
    objective, params, batch = classifier
    bad_inputs = sj.Batch(batch.inputs.at[1, 2].set(jnp.nan), batch.targets)
    with pytest.raises(ValueError, match=r"inputs holds 1 non-finite value\(s\).*validation"):
        sj.hessian(objective, params, bad_inputs)
    bad_params = jax.tree_util.tree_map(lambda a: a.at[..., 0].set(jnp.inf), params)
    with pytest.raises(ValueError, match=r"params\[.*non-finite"):
        sj.ggn(objective, bad_params, batch)
    predict, rparams, rbatch = _regression()
    bad_targets = sj.Batch(rbatch.inputs, rbatch.targets.at[0, 1].set(jnp.nan))
    with pytest.raises(ValueError, match="targets holds 1 non-finite"):
        sj.gradient_covariance(sj.Objective(predict, _huber), rparams, bad_targets)
    with pytest.raises(ValueError, match="non-finite"):
        sj.hessian_top_k(objective, bad_params, batch, k=1)


@pytest.mark.parametrize("label", [3, -1])
def test_labels_outside_the_classes_are_refused(classifier, label):
    objective, params, batch = classifier  # K = 3 outputs
    bad = sj.Batch(batch.inputs, batch.targets.at[2].set(label))
    with pytest.raises(ValueError, match=rf"1 class label\(s\) outside \[0, 3\), e\.g\. {label}"):
        sj.ggn(objective, params, bad)
    with pytest.raises(ValueError, match="outside"):
        sj.loss_value(objective, params, bad)
    # A plain callable does not declare its integer targets as class labels: not checked.
    plain = sj.Objective(objective.predict, objective.loss.value)
    sj.ggn(plain, params, bad)


def test_validation_opt_out(classifier):
    objective, params, batch = classifier
    bad = sj.Batch(batch.inputs.at[0, 0].set(jnp.nan), batch.targets.at[1].set(3))
    with sj.checks.validation(False):
        assert not sj.checks.validation_enabled()
        value = sj.loss_value(objective, params, bad)
        op = sj.hessian(objective, params, bad)
    assert sj.checks.validation_enabled()
    assert np.isnan(value)
    assert np.isnan(ravel_pytree(op(params))[0]).any()
    with pytest.raises(ValueError):
        sj.hessian(objective, params, bad)


def test_operators_built_inside_jit(classifier):
    """Traced arrays are not checked (no error at trace time); the numbers are unchanged."""
    objective, params, batch = classifier
    eager = sj.hessian(objective, params, batch)(params)

    @jax.jit
    def hvp(p, inputs, targets):
        return sj.hessian(objective, p, sj.Batch(inputs, targets))(p)

    got = hvp(params, *batch)
    assert rel_err(ravel_pytree(got)[0], ravel_pytree(eager)[0]) < 1e-12
    # A non-finite traced input is not an error inside jit: it propagates as NaN.
    out = hvp(params, batch.inputs.at[0, 0].set(jnp.nan), batch.targets)
    assert np.isnan(ravel_pytree(out)[0]).any()
    # Arrays closed over by the traced function are concrete, so they are still checked.
    bad = sj.Batch(batch.inputs.at[0, 0].set(jnp.inf), batch.targets)
    with pytest.raises(ValueError, match="non-finite"):
        jax.jit(lambda p: sj.hessian(objective, p, bad)(p))(params)
