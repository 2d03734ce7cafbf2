"""The LocalExecutor's cheap cross-rank copy: used only when the layout is the same."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.runtime import _local


def _sharding(devices, spec):
    return NamedSharding(Mesh(np.array(devices), ("data",)), spec)


@pytest.fixture
def devices():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (the suite runs with 8 virtual CPU devices)")
    return devices[:4]


def test_same_layout_on_other_devices_is_copied_shard_for_shard(devices):
    x = jax.device_put(
        np.random.default_rng(0).normal(size=(8, 3)), _sharding(devices[:2], P("data"))
    )
    target = _sharding(devices[2:], P("data"))
    assert _local._same_layout_elsewhere(x, target)
    y = _local._copy_shards(x, target)
    assert y.sharding == target
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    for shard, source in zip(y.addressable_shards, x.addressable_shards, strict=True):
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(source.data))


@pytest.mark.parametrize(
    "target_spec, target_devices",
    [(P(), slice(2, 4)), (P("data"), slice(2, 3))],
    ids=["other-spec", "other-mesh-shape"],
)
def test_other_layouts_are_left_to_device_put(devices, target_spec, target_devices):
    x = jax.device_put(np.arange(8.0), _sharding(devices[:2], P("data")))
    target = _sharding(devices[target_devices], target_spec)
    assert not _local._same_layout_elsewhere(x, target)
    assert not _local._same_layout_elsewhere(np.arange(8.0), target)  # host values too
