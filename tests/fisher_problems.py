"""Tiny float64 problems and dense references shared by the Fisher-geometry tests
(fisher_metrics, kfac, riemannian, symmetries, pac_bayes)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from problems import mlp_problem

import sharpness_jax as sj
from sharpness_jax import riemannian


class Reference:
    """Per-example g_p, J_p and output Hessians straight from jax.grad / jax.jacfwd /
    jax.hessian of flat per-example functions (no library reduction involved)."""

    def __init__(self, objective, params, batch):
        theta, unravel = ravel_pytree(params)
        self.theta, self.unravel = np.asarray(theta), unravel

        @jax.jit
        def per_example(x, y):
            g = jax.grad(lambda t: objective.example_loss(unravel(t), x, y))(theta)
            jac = jax.jacfwd(lambda t: objective.predict(unravel(t), x))(theta)
            lam = jax.hessian(lambda f: objective.loss(f, y))(objective.predict(params, x))
            return g, jac, lam

        g, jac, lam = jax.vmap(per_example)(*batch)
        self.g, self.J, self.lam = np.asarray(g), np.asarray(jac), np.asarray(lam)
        self.G = np.mean([jp.T @ lp @ jp for jp, lp in zip(self.J, self.lam, strict=True)], 0)
        self.Femp = np.mean([np.outer(gp, gp) for gp in self.g], 0)


def critical_targets(objective, params, inputs, seed=0):
    """Real targets y_p = f_p − r_p with Σ_p J_pᵀ r_p = 0: θ is an exact critical point of
    the half squared error with a non-zero residual (so H ≠ G)."""
    theta, unravel = ravel_pytree(params)

    @jax.jit
    def outputs_and_jacobians(t):
        f = lambda t, x: objective.predict(unravel(t), x)
        return jax.vmap(f, (None, 0))(t, inputs), jax.vmap(jax.jacfwd(f), (None, 0))(t, inputs)

    outputs, js = (np.asarray(a) for a in outputs_and_jacobians(theta))
    js = js.reshape(-1, js.shape[-1])
    z = np.random.default_rng(seed).standard_normal(js.shape[0])
    r = z - js @ np.linalg.lstsq(js, z, rcond=None)[0]
    return jnp.asarray(outputs - r.reshape(outputs.shape))


_OUTPUTS = {}


def outputs(objective, params, batch):
    """(n, K) outputs, one compiled function per objective."""
    if id(objective) not in _OUTPUTS:
        _OUTPUTS[id(objective)] = (objective, jax.jit(objective.batch_outputs))
    return np.asarray(_OUTPUTS[id(objective)][1](params, batch.inputs))


def make_measure(objective, batch):
    """One jitted function: dense H, F, the pinv Riemannian spectrum, Ŝ_R (diagonal)."""

    @jax.jit
    def measure(params):
        h = sj.dense(sj.hessian(objective, params, batch), params)
        f = sj.dense(sj.fisher(objective, params, batch), params)
        full = riemannian.riemannian_sharpness_from_matrices(h, f, pinv=True)
        diag = riemannian.diagonal_riemannian_sharpness(objective, params, batch)
        return h, f, full, diag

    return measure


def num_hidden(params):
    layers = params["params"]
    return sum(layers[f"Dense_{i}"]["kernel"].shape[1] for i in range(len(layers) - 1))


def relu_critical():
    """A tiny ReLU MLP (P = 20, 3 hidden units) at an exact critical point of ½‖f − y‖²."""
    prob = mlp_problem("relu", "squared_error_half", n=16, d=3, widths=(3, 2), seed=3)
    targets = critical_targets(prob.objective, prob.params, prob.batch.inputs)
    batch = sj.Batch(prob.batch.inputs, targets)
    measure = make_measure(prob.objective, batch)
    return prob.objective, prob.params, batch, measure, measure(prob.params)


def tanh_ce():
    prob = mlp_problem("tanh", "cross_entropy", n=7, d=4, widths=(5, 3))
    return prob, Reference(prob.objective, prob.params, prob.batch)


def relu_se():
    """A tiny ReLU MLP with one-hot squared-error targets (not a critical point)."""
    return mlp_problem("relu", "squared_error_half", n=16, d=3, widths=(3, 2), seed=5)


class _Linear(nn.Module):
    """f(x) = (x W1 + b1) W2 + b2: two Dense layers, no activation."""

    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden)(x)
        return nn.Dense(self.outputs)(h)


def linear_net(seed=0, n=10, d=3, h=2, k=3):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = {
        "params": {
            "Dense_0": {
                "bias": 0.3 * jax.random.normal(keys[0], (h,), jnp.float64),
                "kernel": jax.random.normal(keys[1], (d, h), jnp.float64),
            },
            "Dense_1": {
                "bias": 0.3 * jax.random.normal(keys[2], (k,), jnp.float64),
                "kernel": jax.random.normal(keys[3], (h, k), jnp.float64),
            },
        }
    }
    x = jax.random.normal(keys[4], (n, d), jnp.float64)
    objective = sj.Objective(_Linear(h, k).apply, sj.get_loss("squared_error_half"))
    return objective, params, x
