"""The small problem and dense references shared by the tests of noise, second_moment,
comparisons and power_law: a tanh MLP with cross-entropy, n = 7 examples, P = 43."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from problems import Dense, mlp_problem

import sharpness_jax as sj

LAYER = "params/Dense_0"


@functools.cache
def problem():
    return mlp_problem("tanh", "cross_entropy")  # n = 7, P = 43


@functools.cache
def reference():
    return Dense(problem())


def layer_indices():
    """Flat indices of LAYER in the ravel_pytree ordering of the full params."""
    params = problem().params
    paths = sj.leaf_paths(params)
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chosen = sj.select(params, LAYER)
    return np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i, path in enumerate(paths) if path in chosen]
    )


def num_examples():
    return problem().n


def operands():
    prob = problem()
    return prob.objective, prob.params, prob.batch


def run(fn, *args, **kwargs):
    """``fn(objective, params, batch, *args, **kwargs)`` on the test problem, under jit."""
    o, p, b = operands()
    return jax.jit(lambda p, b, args: fn(o, p, b, *args, **kwargs))(p, b, args)


def stack(vectors_np, template):
    _, unravel = ravel_pytree(template)
    return jax.vmap(unravel)(jnp.asarray(vectors_np))


def top_eigh(mat, k):
    vals, vecs = np.linalg.eigh(mat)
    return vals[::-1][:k], vecs[:, ::-1][:, :k].T
