"""What a checkpoint records per array leaf (path, shape, dtype, checksum), and the checks.

A save writes one `LeafRecord` per leaf of the state into the checkpoint's JSON
metadata. A restore compares them with the target before reading any array (so a
different model or different shapes fail with the leaf paths named) and with the
arrays it read (so a corrupted file fails instead of training on garbage).
"""

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Mixing constants of the checksum (golden-ratio and murmur3 multipliers, both odd).
_INDEX_MULTIPLIER = 0x9E3779B9
_MIX_MULTIPLIER = 0x85EBCA6B
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the state it is restored into."""


@dataclasses.dataclass(frozen=True, slots=True)
class LeafRecord:
    """One array of a saved state: where it sits in the tree, its type, its checksum.

    Attributes:
        path: the leaf's key path written with "/", e.g. "params/layers/0/w".
        shape: the global shape.
        dtype: the dtype name, e.g. "float32" or "key<fry>" (typed PRNG keys).
        checksum: `checksums` of the leaf's bytes (position-weighted, order-free).
        key_impl: for typed PRNG keys, the implementation ("threefry2x32"); stored as
            their uint32 key data.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    checksum: int
    key_impl: str | None = None

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "checksum": self.checksum,
            "key_impl": self.key_impl,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "LeafRecord":
        return cls(
            str(data["path"]),
            tuple(data["shape"]),
            str(data["dtype"]),
            int(data["checksum"]),
            data.get("key_impl"),
        )


def leaf_paths(tree) -> tuple[str, ...]:
    """The "/"-joined key path of every leaf, in flattening order.

    Example:
        >>> leaf_paths({"params": {"w": 1, "b": [2, 3]}, "step": 0})
        ('params/b/0', 'params/b/1', 'params/w', 'step')
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return tuple(jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat)


def records_of(tree) -> tuple[LeafRecord, ...]:
    """A `LeafRecord` per leaf of a tree of arrays (checksums computed on the arrays' devices).

    Example:
        >>> [r.path for r in records_of({"w": jnp.ones((2, 3)), "step": jnp.int32(4)})]
        ['step', 'w']
    """
    leaves, paths = jax.tree.leaves(tree), leaf_paths(tree)
    for path, x in zip(paths, leaves, strict=True):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(
                f"state leaf {path!r} is a {type(x).__name__} ({x!r}), not an array. Fix: keep "
                f"arrays in the state (e.g. jnp.asarray({x!r})), or save it as data_position."
            )
    sums = checksums(leaves)
    return tuple(
        LeafRecord(path, tuple(np.shape(x)), dtype_name(x), total, _key_impl(x))
        for path, x, total in zip(paths, leaves, sums, strict=True)
    )


def dtype_name(x) -> str:
    """The dtype of an array or `jax.ShapeDtypeStruct` as text ("float32", "key<fry>")."""
    return str(x.dtype)


def is_key(x) -> bool:
    """Whether `x` (an array or `jax.ShapeDtypeStruct`) holds typed PRNG keys."""
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(x) -> str | None:
    return str(jax.random.key_impl(x)) if is_key(x) else None


def checksums(leaves: Sequence[jax.Array]) -> tuple[int, ...]:
    """An order-free checksum of each array's bytes, computed shard by shard where they live.

    Each element's bits are mixed with its flat index in the whole array and summed
    modulo 2**32, so any sharding (and any reduction order) gives the same number, and
    changing any one element changes it. Each process sums the shards it holds (one
    replica of each); with several processes the partial sums are added across them.

    Example:
        >>> a, b = checksums([jnp.arange(4.0), jnp.arange(4.0)[::-1]])
        >>> a == checksums([jnp.arange(4.0)])[0], a != b
        (True, True)
    """
    arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
    per_device: dict[jax.Device, list[tuple[int, jax.Array, np.ndarray, np.ndarray]]] = {}
    for i, x in enumerate(arrays):
        tail = _bits_tail(x.dtype)
        strides = _row_major_strides(tuple(x.shape) + tail)
        for shard in x.addressable_shards:
            if shard.replica_id != 0:
                continue  # another copy of the same elements
            starts = [0 if s.start is None else s.start for s in shard.index] + [0] * len(tail)
            item = (i, shard.data, np.asarray(starts, np.uint32), strides)
            per_device.setdefault(shard.device, []).append(item)
    totals = np.zeros(len(arrays), np.uint64)
    for items in per_device.values():
        _, datas, starts, strides = zip(*items, strict=True)
        sums = jax.device_get(_checksum_shards(datas, starts, strides))
        for (i, *_), total in zip(items, sums, strict=True):
            totals[i] += np.uint64(total)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        totals = multihost_utils.process_allgather(totals % 2**32).sum(axis=0)
    return tuple(int(t) % 2**32 for t in totals)


def _bits_tail(dtype) -> tuple[int, ...]:
    """The trailing axes `_to_bits` adds for a dtype (key data, complex parts, 64-bit halves)."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        key_data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        return tuple(key_data.shape) + _bits_tail(key_data.dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return (2,) + _bits_tail(jnp.finfo(dtype).dtype)
    return (2,) if np.dtype(dtype).itemsize == 8 else ()


def _row_major_strides(shape: tuple[int, ...]) -> np.ndarray:
    strides, stride = [], 1
    for size in reversed(shape):
        strides.append(stride)
        stride = (stride * size) % 2**32
    return np.asarray(strides[::-1], np.uint32)


@jax.jit
def _checksum_shards(datas, starts, strides) -> tuple[jax.Array, ...]:
    return tuple(_checksum(*args) for args in zip(datas, starts, strides, strict=True))


def _checksum(data: jax.Array, starts: jax.Array, strides: jax.Array) -> jax.Array:
    bits = _to_bits(data)
    index = jnp.zeros(bits.shape, jnp.uint32)  # the element's flat index in the whole array
    for axis in range(bits.ndim):
        position = lax.broadcasted_iota(jnp.uint32, bits.shape, axis) + starts[axis]
        index = index + position * strides[axis]
    mixed = (bits ^ (index * jnp.uint32(_INDEX_MULTIPLIER))) * jnp.uint32(_MIX_MULTIPLIER)
    mixed = mixed ^ (mixed >> 13)
    return jnp.sum(mixed, dtype=jnp.uint32)


def _to_bits(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def check_compatible(
    saved: Sequence[LeafRecord], target_paths: Sequence[str], target_leaves: Sequence, *, where: str
) -> None:
    """Raises `CheckpointError` naming every leaf that is missing, extra, or of another type.

    Args:
        saved: the records the checkpoint holds.
        target_paths: the target's leaf paths (`leaf_paths`).
        target_leaves: the target's leaves (arrays or `jax.ShapeDtypeStruct`s).
        where: names the checkpoint in the message (directory and step).

    Example:
        >>> saved = (LeafRecord("w", (2, 3), "float32", 0),)
        >>> check_compatible(saved, ("w",), (jnp.ones((3, 3)),), where="ckpt/1")
        Traceback (most recent call last):
        ...
        jaxpp._checkpoint._leaves.CheckpointError: ... w: saved float32(2, 3), target ...
    """
    by_path = {r.path: r for r in saved}
    target = {
        path: (tuple(np.shape(x)), dtype_name(x))
        for path, x in zip(target_paths, target_leaves, strict=True)
    }
    missing = [p for p in target if p not in by_path]
    extra = [p for p in by_path if p not in target]
    differ = [
        f"{p}: saved {by_path[p].dtype}{by_path[p].shape}, target {dtype}{shape}"
        for p, (shape, dtype) in target.items()
        if p in by_path and (by_path[p].shape, by_path[p].dtype) != (shape, dtype)
    ]
    if not (missing or extra or differ):
        return
    parts = [f"checkpoint {where} does not fit the target state ({len(saved)} saved leaves, "]
    parts[0] += f"{len(target)} target leaves)."
    for title, items in (
        ("in the target but not in the checkpoint", missing),
        ("in the checkpoint but not in the target", extra),
        ("shape or dtype differs", differ),
    ):
        if items:
            parts.append(f"{len(items)} leaves {title}: {_listing(items)}")
    parts.append(
        "Fix: restore into the model and optimizer the checkpoint was saved from (same layer "
        "count, widths, optimizer chain and dtypes), or start from a new --checkpoint-dir."
    )
    raise CheckpointError("\n".join(parts))


def check_checksums(saved: Sequence[LeafRecord], paths: Sequence[str], leaves, *, where: str):
    """Raises `CheckpointError` naming the leaves whose restored bytes differ from the saved.

    Example:
        >>> saved = records_of({"w": jnp.ones(3)})
        >>> check_checksums(saved, ("w",), (jnp.ones(3),), where="ckpt/1")  # intact: no error
    """
    by_path = {r.path: r.checksum for r in saved}
    actual = checksums(leaves)
    bad = [p for p, total in zip(paths, actual, strict=True) if by_path[p] != total]
    if bad:
        raise CheckpointError(
            f"checkpoint {where} is corrupted: {len(bad)} restored leaves differ from what was "
            f"saved (checksum mismatch): {_listing(bad)}\nFix: restore an earlier step "
            f"(restore(..., step=N)) or delete this step's directory."
        )


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")
