"""Placement: one committed device, or examples sharded over a 1-D mesh (replicated, with a
warning, when the mesh size does not divide them) and parameters replicated."""

import jax
import numpy as np
import pytest

from sharpness_jax.placement import Placement


def test_one_device():
    placement = Placement(None)
    assert placement.size == 1 and placement.mesh is None
    tree = {"w": np.ones((3, 2))}
    for placed in (placement.params(tree), placement.examples(tree, "x")):
        assert placed["w"].committed and placed["w"].devices() == {placement.device}


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_a_mesh_shards_examples_and_replicates_the_rest(caplog):
    placement = Placement(4)
    assert placement.size == 4
    x = np.arange(24.0).reshape(8, 3)
    sharded = placement.examples({"x": x}, "inputs")["x"]
    assert len(sharded.sharding.device_set) == 4 and not sharded.sharding.is_fully_replicated
    np.testing.assert_array_equal(sharded, x)
    odd = placement.examples({"x": x[:6]}, "six examples")["x"]
    assert odd.sharding.is_fully_replicated
    assert "not divisible" in caplog.text
    params = placement.params({"w": np.ones(5)})["w"]
    assert params.sharding.is_fully_replicated and len(params.sharding.device_set) == 4
