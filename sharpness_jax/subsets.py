"""Parameter subsets: restrict any curvature object to a layer or a group of leaves.

A subset is named by the paths of parameter leaves, written as '/'-joined keys, e.g.
``"params/Dense_0/kernel"``. A selector may be

* a string: every leaf whose path equals it or lies below it (``"params/Dense_0"`` selects
  the kernel and the bias of that layer);
* a sequence of such strings;
* a predicate ``path -> bool``.

The sub-parameters are a flat ``dict`` from path to leaf (insertion ordered as in the full
tree). Restricting the objective (:func:`restrict`) freezes the other leaves at their current
values, so the Hessian, GGN, Fisher, C and E_p[h_p²] of the restricted objective are exactly
the corresponding diagonal blocks of the full matrices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from sharpness_jax.objective import Objective

PyTree = Any
Selector = str | Sequence[str] | Callable[[str], bool]

__all__ = ["embed", "leaf_paths", "merge", "num_params", "restrict", "select"]


def _path_str(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_paths(params: PyTree) -> list[str]:
    """The '/'-joined path of every leaf of ``params``, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [_path_str(path) for path, _ in flat]


def num_params(params: PyTree) -> int:
    """Total number of scalar parameters P."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))


def _predicate(selector: Selector) -> Callable[[str], bool]:
    if callable(selector):
        return selector
    prefixes = [selector] if isinstance(selector, str) else list(selector)
    if not prefixes:
        raise ValueError("an empty list of parameter paths selects nothing")
    prefixes = [p.strip("/") for p in prefixes]
    return lambda path: any(path == p or path.startswith(p + "/") for p in prefixes)


def select(params: PyTree, selector: Selector) -> dict[str, jax.Array]:
    """The selected leaves as a ``{path: leaf}`` dict: also the template of the vectors of an
    operator built with ``subset=selector``, e.g. ``sj.lanczos_top_k(sj.hessian(objective,
    params, batch, subset="params/Dense_1"), sj.subsets.select(params, "params/Dense_1"))``.

    Raises:
      ValueError: if nothing is selected (the message lists the available paths).
    """
    pred = _predicate(selector)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    sub = {_path_str(path): leaf for path, leaf in flat if pred(_path_str(path))}
    if not sub:
        raise ValueError(
            f"the selector {selector!r} matches no parameter; paths are: {leaf_paths(params)}"
        )
    return sub


def merge(params: PyTree, sub: dict[str, jax.Array]) -> PyTree:
    """``params`` with the leaves named in ``sub`` replaced by the values of ``sub``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    unknown = set(sub) - {_path_str(path) for path, _ in flat}
    if unknown:
        raise ValueError(f"unknown parameter paths {sorted(unknown)}")
    leaves = [sub.get(_path_str(path), leaf) for path, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def embed(sub: dict[str, jax.Array], params: PyTree) -> PyTree:
    """A full-size vector that equals ``sub`` on the subset and zero elsewhere."""
    zeros = jax.tree_util.tree_map(jax.numpy.zeros_like, params)
    return merge(zeros, sub)


def restrict(objective: Objective, params: PyTree, selector: Selector) -> tuple[Objective, dict]:
    """The objective as a function of the selected leaves alone, the others frozen.

    Args:
      objective: the full objective.
      params: the full parameters (the frozen values of the unselected leaves).
      selector: which leaves stay free (see the module docstring).

    Returns:
      ``(restricted_objective, sub_params)``; every operator built on them acts on vectors
      shaped like ``sub_params`` and equals the corresponding block of the full operator.
    """
    sub = select(params, selector)

    def predict(sub_params, x):
        return objective.predict(merge(params, sub_params), x)

    return dataclasses.replace(objective, predict=predict), sub
