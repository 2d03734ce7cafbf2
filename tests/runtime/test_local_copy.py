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


def _spy_host_copies(monkeypatch) -> list:
    """Counts fetches of whole arrays to the host (jax.Array._value)."""
    from jax._src import array as array_lib

    fetched = []
    value = array_lib.ArrayImpl._value

    def spy(self):
        fetched.append(self.shape)
        return value.fget(self)

    monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(spy))
    return fetched


def _mesh2(devices, spec):
    return NamedSharding(Mesh(np.array(devices).reshape(2, -1), ("data", "model")), spec)


@pytest.mark.parametrize(
    "source, target",
    [
        # a model initialized sharded over all devices, placed on one rank
        (lambda d: _sharding(d, P("data")), lambda d: _sharding(d[3:], P())),
        # onto a rank of two devices, sharded along the other dimension
        (lambda d: _sharding(d[:2], P("data")), lambda d: _sharding(d[2:], P(None, "data"))),
        # the same devices, another spec (two dimensions sharded, then one)
        (lambda d: _mesh2(d, P("data", "model")), lambda d: _mesh2(d, P("model"))),
        # 3-way onto 2-way: pieces straddle shard boundaries
        (lambda d: _sharding(d[:3], P("data")), lambda d: _sharding(d[2:], P("data"))),
        # replicated onto a partly overlapping rank: the local copy is preferred
        (lambda d: _sharding(d[:2], P()), lambda d: _sharding(d[1:3], P("data"))),
    ],
    ids=["fsdp-to-one", "rows-to-cols", "same-devices", "3-to-2", "replicated"],
)
def test_reshards_device_to_device_without_a_host_copy(devices, monkeypatch, source, target):
    x = jax.device_put(np.random.default_rng(1).normal(size=(12, 6)), source(devices))
    fetched = _spy_host_copies(monkeypatch)
    y = _local._move_pieces(x, target(devices))
    assert fetched == []
    assert y.sharding == target(devices)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    for shard in y.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(x)[shard.index])


def test_place_uses_pieces_only_where_device_put_would_go_through_the_host(devices):
    x = jax.device_put(np.arange(8.0), _sharding(devices, P("data")))
    assert _local._needs_pieces(x, _sharding(devices[:1], P()))
    # every wanted shard is already a whole shard of x: jax copies it device to device
    assert not _local._needs_pieces(x, _sharding(devices[::-1], P("data")))
    scalar = jax.device_put(np.float32(1), devices[0])
    assert not _local._needs_pieces(scalar, _sharding(devices[1:2], P()))
    assert not _local._needs_pieces(np.arange(8.0), _sharding(devices[:1], P()))


def test_device_put_still_copies_through_the_host_in_this_jax(devices, monkeypatch):
    """Why `_move_pieces` exists; when a jax release fixes this, `_move_pieces` can go."""
    x = jax.device_put(np.arange(8.0), _sharding(devices, P("data")))
    fetched = _spy_host_copies(monkeypatch)
    jax.device_put(x, _sharding(devices[:1], P()))
    assert fetched == [(8,)]
