"""Leaf checksums: equal to a numpy reference, the same under any sharding, sensitive to one bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp._checkpoint import _leaves


def _reference_checksum(x: np.ndarray) -> int:
    """The checksum written plainly: 32-bit words in row-major order, mixed with their index."""
    words = np.ascontiguousarray(x).view(np.uint32).reshape(-1).astype(np.uint64)
    index = np.arange(words.size, dtype=np.uint64)
    mask = np.uint64(2**32 - 1)
    mixed = ((words ^ ((index * np.uint64(0x9E3779B9)) & mask)) * np.uint64(0x85EBCA6B)) & mask
    mixed ^= mixed >> np.uint64(13)
    return int(mixed.sum() % np.uint64(2**32))


@pytest.mark.parametrize("shape", [(), (7,), (8, 6), (2, 4, 6)])
def test_checksums_match_numpy_reference(shape):
    x = np.asarray(jax.random.normal(jax.random.key(len(shape)), shape))
    complex_x = (x + 1j * np.flip(x)).astype(np.complex64)
    got = _leaves.checksums([jnp.asarray(x), jnp.asarray(complex_x)])
    assert got == (_reference_checksum(x), _reference_checksum(complex_x))


@pytest.mark.parametrize("spec", [P("a", "b"), P("a"), P(None, "b"), P(), P("b", "a")], ids=str)
def test_checksums_same_under_any_sharding(spec):
    x = jax.random.normal(jax.random.key(3), (8, 6))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    keys = jax.random.split(jax.random.key(4), 4)
    sharded_keys = jax.device_put(keys, NamedSharding(mesh, P(spec[0] if spec else None)))
    assert _leaves.checksums([sharded, sharded_keys]) == _leaves.checksums([x, keys])


def test_checksums_one_flipped_bit_changes_the_sum():
    x = np.asarray(jax.random.normal(jax.random.key(5), (16, 16)))
    rng = np.random.default_rng(0)
    base = _leaves.checksums([x])[0]
    flipped = []
    for _ in range(8):
        y = x.copy()
        i, bit = rng.integers(y.size), rng.integers(32)
        y.reshape(-1).view(np.uint32)[i] ^= np.uint32(1 << bit)
        flipped.append(y)
    assert base not in _leaves.checksums(flipped)
    # Swapping two elements (same bytes, other places) changes it too.
    swapped = x.copy()
    swapped[0, 0], swapped[3, 5] = x[3, 5], x[0, 0]
    assert _leaves.checksums([swapped])[0] != base
