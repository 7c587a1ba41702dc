"""SAM as a training option (``optimizer.sam_rho``): one step against a hand-computed SAM step
in float64, ρ = 0 is the plain step bit for bit, and a negative ρ is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_configs import config, train

from sharpness_jax.config import validate_config
from sharpness_jax.problem import problem_from_config


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def _full_loss(c):
    problem = problem_from_config(c)
    train_split = problem.dataset.train
    return lambda p: jnp.mean(problem.objective.batch_losses(p, train_split))


def test_sam_step_matches_a_hand_computed_step():
    rho, lr = 0.3, 0.5
    c = config(max_steps=1, optimizer={"name": "gd", "learning_rate": lr, "sam_rho": rho})
    theta0 = train(config(max_steps=0)).params
    loss = _full_loss(c)
    g = jax.grad(loss)(theta0)
    norm = jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(g)))
    ascent = jax.tree.map(lambda p, gi: p + rho * gi / norm, theta0, g)
    g_sam = jax.grad(loss)(ascent)
    want = jax.tree.map(lambda p, gi: p - lr * gi, theta0, g_sam)
    got = train(c).params
    plain = train(config(max_steps=1, optimizer={"name": "gd", "learning_rate": lr})).params
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(got))
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(_flat(got) - _flat(plain))) > 1e-6  # SAM moved θ elsewhere


def test_sam_rho_zero_is_plain_sgd_bit_for_bit():
    sgd = {"name": "sgd", "learning_rate": 0.1}
    off = train(config(max_steps=4, batch_size=16, optimizer={**sgd, "sam_rho": 0.0}))
    plain = train(config(max_steps=4, batch_size=16, optimizer=sgd))
    on = train(config(max_steps=4, batch_size=16, optimizer={**sgd, "sam_rho": 0.05}))
    np.testing.assert_array_equal(_flat(off.params), _flat(plain.params))
    assert not np.array_equal(_flat(off.params), _flat(on.params))
    assert off.rows == plain.rows


def test_negative_sam_rho_is_refused():
    with pytest.raises(ValueError, match="sam_rho must be >= 0"):
        validate_config(config(optimizer={"sam_rho": -0.1}))
