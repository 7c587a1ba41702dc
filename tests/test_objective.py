"""Losses: values, closed-form output Hessians and Fisher factors against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharpness_jax as sj

LOSS_NAMES = ["cross_entropy", "squared_error_half", "squared_error_sum"]
# Losses whose output Fisher equals their output Hessian Λ (GGN = Fisher).
ALL_LOSS_NAMES = [*LOSS_NAMES, "softmax_squared_error"]


def _outputs_and_label():
    f = jnp.array([0.3, -1.2, 2.0, 0.1], jnp.float64)
    return f, jnp.int32(2)


@pytest.mark.parametrize("name", ALL_LOSS_NAMES)
def test_output_hessian_matches_autodiff(name):
    loss = sj.get_loss(name)
    f, y = _outputs_and_label()
    np.testing.assert_allclose(
        loss.output_hessian(f, y), jax.hessian(loss)(f, y), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_fisher_factor_squares_to_output_fisher(name):
    """B Bᵀ equals the output Fisher, which equals Λ for these losses."""
    loss = sj.get_loss(name)
    f, y = _outputs_and_label()
    b = loss.output_fisher_factor(f)
    np.testing.assert_allclose(b @ b.T, loss.output_hessian(f, y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ALL_LOSS_NAMES)
def test_sampled_output_gradients_have_fisher_second_moment(name):
    loss = sj.get_loss(name)
    f, _ = _outputs_and_label()
    keys = jax.random.split(jax.random.PRNGKey(0), 40_000)
    r = jax.vmap(loss.sample_output_grad, in_axes=(0, None))(keys, f)
    second = np.einsum("si,sj->ij", r, r) / r.shape[0]
    b = np.asarray(loss.output_fisher_factor(f))
    exact = b @ b.T
    # Each entry is a mean of 40k i.i.d. products: compare within 5 standard errors.
    prods = np.einsum("si,sj->sij", r, r)
    se = prods.std(0) / np.sqrt(r.shape[0])
    assert np.all(np.abs(second - exact) <= 5 * se + 1e-12)


def test_cross_entropy_values_and_label_smoothing():
    f, y = _outputs_and_label()
    logp = jax.nn.log_softmax(f)
    np.testing.assert_allclose(sj.get_loss("cross_entropy")(f, y), -logp[2], rtol=1e-14)
    smooth = sj.get_loss("cross_entropy", label_smoothing=0.2)
    q = 0.8 * jax.nn.one_hot(2, 4, dtype=jnp.float64) + 0.2 / 4
    np.testing.assert_allclose(smooth(f, y), -jnp.sum(q * logp), rtol=1e-14)
    # The output Hessian does not depend on the targets or the smoothing.
    np.testing.assert_allclose(smooth.output_hessian(f, y), jax.hessian(smooth)(f, y), atol=1e-14)


def test_squared_error_conventions_differ_by_two():
    f, y = _outputs_and_label()
    half = sj.get_loss("squared_error_half")(f, y)
    full = sj.get_loss("squared_error_sum")(f, y)
    onehot = jax.nn.one_hot(2, 4, dtype=jnp.float64)
    np.testing.assert_allclose(half, 0.5 * jnp.sum((f - onehot) ** 2), rtol=1e-14)
    np.testing.assert_allclose(full, 2 * half, rtol=1e-14)
    # Real-valued targets are used as they are.
    np.testing.assert_allclose(sj.squared_error(0.5)(f, onehot), half, rtol=1e-14)


def test_loss_errors():
    f, y = _outputs_and_label()
    with pytest.raises(ValueError, match="unknown loss"):
        sj.get_loss("hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        sj.get_loss("squared_error_half", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        sj.softmax_cross_entropy(1.5)
    with pytest.raises(ValueError, match="scale"):
        sj.squared_error(0.0)
    with pytest.raises(ValueError, match=r"shape \(K,\)"):
        sj.get_loss("cross_entropy")(f[None], y)
    with pytest.raises(TypeError, match="integer label"):
        sj.get_loss("cross_entropy")(f, f)
    with pytest.raises(ValueError, match="outputs' shape"):
        sj.get_loss("squared_error_half")(f, f[:2])


def test_softmax_squared_error_value_and_fisher():
    """ℓ = mean_k (softmax(f) − onehot)²; its Fisher is that of N(y; p, K/2·I) in f."""
    loss = sj.get_loss("softmax_squared_error")
    f, y = _outputs_and_label()
    p = np.asarray(jax.nn.softmax(f))
    onehot = np.eye(f.shape[0])[int(y)]
    np.testing.assert_allclose(loss(f, y), np.mean((p - onehot) ** 2), rtol=1e-14)
    np.testing.assert_allclose(loss(f, jnp.asarray(onehot)), loss(f, y), rtol=1e-14)
    # Fisher of the Gaussian likelihood: Jᵀ Σ⁻¹ J with J = ∂p/∂f and Σ = (K/2) I.
    jac = np.asarray(jax.jacfwd(jax.nn.softmax)(f))
    want = jac.T @ jac * (2.0 / f.shape[0])
    b = np.asarray(loss.output_fisher_factor(f))
    np.testing.assert_allclose(b @ b.T, want, rtol=1e-12, atol=1e-15)
    # Unlike the other losses, Λ is indefinite for a misclassified example, so GGN ≠ Fisher.
    lam = np.linalg.eigvalsh(np.asarray(loss.output_hessian(f, jnp.int32(0))))
    assert lam.min() < -1e-3


def test_autodiff_output_hessian_products_match_closed_form():
    """A plain callable's Λ t (jvp of grad, per example) equals the closed-form Λ t."""
    key = jax.random.PRNGKey(3)
    f = jax.random.normal(key, (5, 4))
    t = jax.random.normal(jax.random.fold_in(key, 1), (5, 4))
    y = jnp.array([0, 3, 1, 2, 3], jnp.int32)
    for name in ALL_LOSS_NAMES:
        loss = sj.get_loss(name)
        want = sj.Objective(None, loss).output_hessian_products(f, y, t)
        for plain in (loss.value, sj.loss_from_function(loss.value)):
            got = sj.Objective(None, plain).output_hessian_products(f, y, t)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=name)
            np.testing.assert_allclose(
                sj.Objective(None, plain).output_hessian(f[0], y[0]),
                loss.output_hessian(f[0], y[0]),
                atol=1e-14,
            )


def test_loss_from_function():
    def log_cosh(f, y):
        return jnp.sum(jnp.log(jnp.cosh(f - y)))

    loss = sj.loss_from_function(log_cosh)
    assert loss.name == "log_cosh" and not loss.class_labels
    assert loss.output_hessian is None and loss.output_fisher_factor is None
    # Without a closed-form Λ the outputs may have any shape, e.g. (T, V) per example.
    f = jnp.arange(6.0).reshape(2, 3) / 6
    np.testing.assert_allclose(loss(f, jnp.zeros((2, 3))), log_cosh(f, jnp.zeros((2, 3))))
    objective = sj.Objective(None, loss)
    with pytest.raises(ValueError, match=r"'log_cosh'.*no output_fisher_factor.*sj\.Loss"):
        objective.output_fisher_products(f[None], f[None])
    with pytest.raises(ValueError, match="no sample_output_grad"):
        objective.sampled_output_grads(jax.random.split(jax.random.PRNGKey(0), 2), f)
    # The built-in losses carry their predictive distribution.
    assert sj.Objective(None, sj.squared_error()).predictive("sample_output_grad", "x")


def test_label_classes_from_the_output_shape():
    def predict(p, x):
        return x @ p

    params = jnp.ones((3, 4))
    inputs = jnp.ones((5, 3))
    assert sj.Objective(predict, sj.softmax_cross_entropy()).label_classes(params, inputs) == 4
    assert sj.Objective(predict, sj.squared_error()).label_classes(params, inputs) == 4
    assert sj.Objective(predict, lambda f, y: jnp.sum(f)).label_classes(params, inputs) is None


def test_equal_losses_are_one_object_so_objectives_share_programs():
    assert sj.softmax_cross_entropy() is sj.get_loss("cross_entropy")
    assert sj.squared_error(0.5) is sj.squared_error(scale=0.5)
    assert sj.squared_error(1.0) is not sj.squared_error()
    assert sj.token_cross_entropy("sum") is not sj.token_cross_entropy("mean")
