"""Learning-rate schedules and the optax chain of a run config (weight decay decoupled and L2,
for SGD, Adam and momentum)."""

import math

import jax.numpy as jnp
import numpy as np
import optax
from training_configs import config

from sharpness_jax import optim
from sharpness_jax.config import resolve_config


def test_learning_rate_schedules():
    c = config(
        max_steps=100,
        optimizer={
            "schedule": "cosine",
            "warmup_steps": 10,
            "end_factor": 0.1,
            "learning_rate": 2.0,
        },
    )
    assert resolve_config(c).optimizer.decay_steps == 100
    lr = optim.learning_rate_schedule(c)
    np.testing.assert_allclose(float(lr(5)), 1.0)
    np.testing.assert_allclose(float(lr(10)), 2.0)
    np.testing.assert_allclose(float(lr(55)), 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi / 2)))
    np.testing.assert_allclose(float(lr(100)), 0.2)
    linear = optim.learning_rate_schedule(config(optimizer={"schedule": "linear"}, max_steps=10))
    np.testing.assert_allclose(float(linear(5)), 0.25)
    assert optim.learning_rate_schedule(config()) == 0.5


def test_weight_decay_decoupled_and_l2():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    wd = 0.1

    def updates(name, kind, steps=2):
        c = config(
            optimizer={
                "name": name,
                "learning_rate": 0.1,
                "weight_decay": wd,
                "weight_decay_type": kind,
            }
        )
        tx = optim.make_optimizer(c)
        state = tx.init(params)
        for _ in range(steps):
            u, state = tx.update(grads, state, params)
        return u["w"]

    # SGD: both are θ ← θ − η(g + λθ).
    expected = -0.1 * (grads["w"] + wd * params["w"])
    np.testing.assert_allclose(updates("sgd", "l2"), expected)
    np.testing.assert_allclose(updates("sgd", "decoupled"), expected)
    # Adam: decoupled is AdamW; L2 passes λθ through the moments.
    adamw = optim._standard_promotion(optax.adamw(0.1, weight_decay=wd))  # optax: not strict
    state = adamw.init(params)
    for _ in range(2):
        u, state = adamw.update(grads, state, params)
    np.testing.assert_allclose(updates("adam", "decoupled"), u["w"], rtol=1e-12)
    assert not np.allclose(updates("adam", "l2"), u["w"])
    # Momentum: the L2 term accumulates in the velocity, the decoupled one does not.
    np.testing.assert_allclose(
        updates("momentum", "decoupled"), -0.1 * (1.9 * grads["w"] + wd * params["w"])
    )
    np.testing.assert_allclose(
        updates("momentum", "l2"), -0.1 * 1.9 * (grads["w"] + wd * params["w"])
    )
