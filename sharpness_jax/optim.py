"""The optimiser of a run config: learning-rate schedules and the optax chain.

``make_optimizer(config)`` is chain(L2 term, direction (gd/sgd: identity, momentum:
optax.trace, adam: optax.scale_by_adam), decoupled weight decay, −η_t), evaluated under
standard dtype promotion (see :func:`sharpness_jax.config.default_config` for the fields).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sharpness_jax.config import resolve_config

__all__ = ["learning_rate_schedule", "make_optimizer"]


def learning_rate_schedule(config: Any) -> optax.Schedule | float:
    """η_t of ``config.optimizer`` (a float for a constant rate without warmup).

    Linear warmup 0 → η over ``warmup_steps``, then constant, cosine or linear decay to
    ``end_factor``·η at step ``decay_steps`` (counted from step 0, warmup included).
    """
    c = resolve_config(config)
    o = c.optimizer
    lr, warm = float(o.learning_rate), int(o.warmup_steps)
    if o.schedule == "constant":
        if not warm:
            return lr
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm]
        )
    total, end = int(o.decay_steps), float(o.end_factor) * lr
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, total, end_value=end)
    decay = optax.linear_schedule(lr, end, max(total - warm, 1))
    if not warm:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """The optax transformation of ``config.optimizer``.

    chain(L2 term (``weight_decay_type="l2"``), direction (identity for gd/sgd, optax.trace
    for momentum, scale_by_adam for adam), decoupled decay (``"decoupled"``), −η_t).
    """
    c = resolve_config(config)
    o = c.optimizer
    dtype = jnp.dtype(c.dtype)
    schedule = learning_rate_schedule(c)
    if callable(schedule):
        base = schedule
        schedule = lambda count: jnp.asarray(base(count), dtype)  # keep the params' dtype
    parts = []
    if o.weight_decay and o.weight_decay_type == "l2":
        parts.append(optax.add_decayed_weights(o.weight_decay))
    if o.name == "momentum":
        parts.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))
    elif o.name == "adam":
        parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
    if o.weight_decay and o.weight_decay_type == "decoupled":
        parts.append(optax.add_decayed_weights(o.weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return _standard_promotion(optax.chain(*parts))


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` evaluated under standard dtype promotion.

    optax mixes int32 step counts with Python floats (e.g. Adam's bias correction
    1 − β^t), which ``jax_numpy_dtype_promotion="strict"`` rejects. ``optax.apply_updates``
    casts the result back to the parameters' dtype.
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)
