"""A 5-example MLP with dense per-example references, and brute-force expectations over every
mini-batch, shared by the tests of sharpness and batch_moments."""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax.flatten_util import ravel_pytree
from problems import mlp_problem

N = 5
BATCH_SIZES = (1, 2, 3, 5)


class PerExample:
    """Dense per-example references: g_p = ∇ℓ_p (n, P) and h_p = ∇²ℓ_p (n, P, P) by
    ``jax.grad`` / ``jax.hessian`` of the flat per-example loss, and what follows from them."""

    def __init__(self, prob):
        theta, unravel = ravel_pytree(prob.params)

        def loss(t, x, y):
            return prob.objective.example_loss(unravel(t), x, y)

        xs, ys = prob.batch
        self.g = np.asarray(jax.vmap(jax.grad(loss), (None, 0, 0))(theta, xs, ys))
        self.h = np.asarray(jax.vmap(jax.hessian(loss), (None, 0, 0))(theta, xs, ys))
        self.H = self.h.mean(0)
        self.gbar = self.g.mean(0)
        d = self.g - self.gbar
        self.C = d.T @ d / len(d)


def mlp_with_reference():
    """``(problem, PerExample)`` of a tanh MLP 3-4-3 with cross-entropy on N examples."""
    prob = mlp_problem("tanh", "cross_entropy", n=N, d=3, widths=(4, 3))
    return prob, PerExample(prob)


def batches(n, b, replace):
    if replace:
        return list(itertools.product(range(n), repeat=b))
    return list(itertools.combinations(range(n), b))


def enumerate_batches(g, h, b, replace):
    """Brute-force expectations over every batch, from per-example g_p (n, P), h_p (n, P, P)."""
    H = h.mean(0)
    out = {"bhb": [], "gg": [], "ghg": [], "ratio": [], "lam": []}
    for batch in batches(g.shape[0], b, replace):
        idx = list(batch)
        gb, hb = g[idx].mean(0), h[idx].mean(0)
        out["bhb"].append(gb @ hb @ gb)
        out["gg"].append(gb @ gb)
        out["ghg"].append(gb @ H @ gb)
        out["ratio"].append(gb @ hb @ gb / (gb @ gb))
        out["lam"].append(np.linalg.eigvalsh(hb)[-1])
    return {k: float(np.mean(v)) for k, v in out.items()}
