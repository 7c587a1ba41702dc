"""Where a run's arrays live: one committed device, or a 1-D data-parallel mesh.

``Placement(mesh)`` takes the config's ``mesh`` field (None: the default device; "auto": a
mesh over all devices, all hosts after ``jax.distributed.initialize``; an int d: the first d
devices). Example arrays are sharded along their leading axis over the mesh's ``"data"``
axis (replicated, with a warning, when the mesh size does not divide the example count);
parameters and optimizer state are replicated. Every array is committed, so that a fresh, a
continued and a resumed run call the same compiled programs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sharpness_jax import checks

PyTree = Any

__all__ = ["Placement"]


class Placement:
    """Where arrays live: one committed device, or a 1-D mesh ("data") of devices."""

    def __init__(self, mesh_spec: Any):
        if mesh_spec is None:
            self.mesh = None
            self.device = next(iter(jnp.zeros(()).devices()))
            return
        devices = jax.devices()
        count = len(devices) if mesh_spec == "auto" else int(mesh_spec)
        self.mesh = jax.sharding.Mesh(np.array(devices[:count]), ("data",))
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.sharded = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    @property
    def size(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def params(self, tree: PyTree) -> PyTree:
        """Replicated (or on the one device)."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        return jax.tree.map(lambda a: _global_array(a, self.replicated), tree)

    def examples(self, tree: PyTree, what: str) -> PyTree:
        """Sharded along the leading example axis when the mesh size divides it."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        n = checks.num_examples(tree)
        if n % self.mesh.size:
            logging.warning(
                "%s: %d examples are not divisible by the %d devices of the mesh; "
                "replicating them instead of sharding",
                what,
                n,
                self.mesh.size,
            )
            return jax.tree.map(lambda a: _global_array(a, self.replicated), tree)
        return jax.tree.map(lambda a: _global_array(a, self.sharded), tree)


def _global_array(a, sharding) -> jax.Array:
    """A global array from a host value every process holds in full (works multi-host)."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
