"""Tiny float64 problems and dense references shared by the tests.

References are built the slow, obvious way: ``jax.hessian`` / ``jax.jacfwd`` of flat
functions and explicit Python loops over examples.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import sharpness_jax as sj

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu}


class _MLP(nn.Module):
    widths: tuple[int, ...]
    activation: str

    @nn.compact
    def __call__(self, x):
        for w in self.widths[:-1]:
            x = ACTIVATIONS[self.activation](nn.Dense(w)(x))
        return nn.Dense(self.widths[-1])(x)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # one example (H, W, C)
        x = jax.nn.relu(nn.Conv(3, (3, 3))(x[None]))
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
        return nn.Dense(3)(x.reshape(-1))


@dataclasses.dataclass
class Problem:
    name: str
    objective: sj.Objective
    params: dict
    batch: sj.Batch

    @property
    def n(self):
        return self.batch.targets.shape[0]


def mlp_problem(activation="tanh", loss="cross_entropy", n=7, d=4, widths=(5, 3), seed=0):
    key = jax.random.PRNGKey(seed)
    kx, ky, kp = jax.random.split(key, 3)
    module = _MLP(widths, activation)
    x = jax.random.normal(kx, (n, d), jnp.float64)
    y = jax.random.randint(ky, (n,), 0, widths[-1])
    params = module.init(kp, x[0].astype(jnp.float32))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    obj = sj.Objective(module.apply, sj.get_loss(loss))
    return Problem(f"mlp-{activation}-{loss}", obj, params, sj.Batch(x, y))


def cnn_problem(loss="cross_entropy", n=5, seed=1):
    key = jax.random.PRNGKey(seed)
    kx, ky, kp = jax.random.split(key, 3)
    module = _CNN()
    x = jax.random.normal(kx, (n, 4, 4, 1), jnp.float64)
    y = jax.random.randint(ky, (n,), 0, 3)
    params = module.init(kp, x[0].astype(jnp.float32))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    obj = sj.Objective(module.apply, sj.get_loss(loss))
    return Problem(f"cnn-{loss}", obj, params, sj.Batch(x, y))


def all_problems():
    probs = [
        mlp_problem(act, loss)
        for act in ("tanh", "relu", "gelu")
        for loss in ("cross_entropy", "squared_error_half")
    ]
    probs.append(mlp_problem("tanh", "squared_error_sum"))
    probs.append(cnn_problem("cross_entropy"))
    probs.append(cnn_problem("squared_error_half"))
    return probs


class Dense:
    """Dense references for one problem, by explicit Python loops over examples.

    Each per-example quantity comes from one jitted function of (flat params, x, y) called
    once per example, so the reference shares no code path with the library.
    """

    def __init__(self, prob: Problem):
        self.prob = prob
        flat, unravel = ravel_pytree(prob.params)
        self.flat, self.unravel = flat, unravel
        obj = prob.objective
        xs, ys = prob.batch
        n = prob.n

        def loss(f, x, y):
            return obj.example_loss(unravel(f), x, y)

        def predict(f, x):
            return obj.predict(unravel(f), x)

        grad_fn = jax.jit(jax.grad(loss))
        hess_fn = jax.jit(jax.hessian(loss))
        jac_fn = jax.jit(jax.jacfwd(predict))
        out_hess_fn = jax.jit(jax.hessian(lambda f, y: obj.loss(f, y)))
        loss_fn = jax.jit(loss)
        self.losses = [(lambda f, x=xs[p], y=ys[p]: loss_fn(f, x, y)) for p in range(n)]
        self.g = np.stack([np.asarray(grad_fn(flat, xs[p], ys[p])) for p in range(n)])
        self.h = np.stack([np.asarray(hess_fn(flat, xs[p], ys[p])) for p in range(n)])
        self.J = np.stack([np.asarray(jac_fn(flat, xs[p])) for p in range(n)])
        self.lam = np.stack(
            [np.asarray(out_hess_fn(predict(flat, xs[p]), ys[p])) for p in range(n)]
        )
        self.H = self.h.mean(0)
        self.H_direct = np.asarray(
            jax.hessian(lambda f: jnp.mean(jax.vmap(loss, (None, 0, 0))(f, xs, ys)))(flat)
        )
        self.G = np.mean([Jp.T @ Lp @ Jp for Jp, Lp in zip(self.J, self.lam, strict=True)], axis=0)
        self.gbar = self.g.mean(0)
        self.Femp = np.mean([np.outer(gp, gp) for gp in self.g], axis=0)
        self.C = np.mean([np.outer(gp - self.gbar, gp - self.gbar) for gp in self.g], axis=0)
        self.H2 = np.mean([hp @ hp for hp in self.h], axis=0)

    def random_vector(self, seed=0):
        v = np.random.default_rng(seed).standard_normal(self.flat.shape)
        return self.unravel(jnp.asarray(v)), v


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
