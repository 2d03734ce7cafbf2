"""Checkpoint arrays as per-shard files: what each process holds, for multi-process (MPMD) runs.

Orbax's array handler assumes SPMD arrays: every process holds some shard of every
array, and no process holds all of one. A pipelined step's state breaks both: a stage's
parameters live on the devices of the process (or processes) that own its rank, so
they are fully addressable there and absent elsewhere. This orbax item instead writes,
in each process, the shards it holds (one replica of each) as one `.npy` file each,
named by leaf index and the shard's start in the global array; restore reads, for each
device a target sharding places in this process, exactly the region it needs from the
files that overlap it, whatever the saving layout was.
"""

import dataclasses
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

# One saved shard: (leaf index, start of the shard in the global array, its values).
Piece = tuple[int, tuple[int, ...], np.ndarray]


def local_pieces(leaves: Sequence[jax.Array]) -> tuple[Piece, ...]:
    """Host copies of the shards this process writes: replica 0 of each addressable shard.

    Example:
        >>> import jax.numpy as jnp
        >>> [(i, start, piece.shape) for i, start, piece in local_pieces([jnp.ones((2, 3))])]
        [(0, (0, 0), (2, 3))]
    """
    wanted = []
    for i, x in enumerate(leaves):
        for shard in x.addressable_shards:
            if shard.replica_id == 0:
                start = tuple(0 if s.start is None else s.start for s in shard.index)
                wanted.append((i, start, shard.data))
    datas = jax.device_get([data for _, _, data in wanted])
    return tuple(
        (i, start, np.asarray(data)) for (i, start, _), data in zip(wanted, datas, strict=True)
    )


def _file_name(leaf: int, start: Sequence[int]) -> str:
    return f"{leaf}." + "_".join(str(s) for s in start) + ".npy"  # a scalar: "3..npy"


def _raw(x: np.ndarray) -> np.ndarray:
    """The bits of `x` as unsigned ints (numpy cannot save every JAX dtype, e.g. bfloat16)."""
    x = np.ascontiguousarray(x).reshape(np.shape(x))  # ascontiguousarray makes scalars 1-d
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}")) if x.dtype.itemsize <= 8 else x


class ShardsHandler(ocp.AsyncCheckpointHandler):
    """Orbax handler of the "shards" item: each process writes and reads its own shards."""

    async def _write(self, directory: pathlib.Path, pieces: Sequence[Piece]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for leaf, start, data in pieces:
            np.save(directory / _file_name(leaf, start), _raw(data), allow_pickle=False)

    async def async_save(self, directory, args: "ShardsSave"):
        where = pathlib.Path(directory)
        return [
            ocp.future.CommitFutureAwaitingContractedSignals(
                self._write(where, args.pieces), name="jaxpp_shards_save"
            )
        ]

    def save(self, directory, args: "ShardsSave") -> None:
        where = pathlib.Path(directory)
        where.mkdir(parents=True, exist_ok=True)
        for leaf, start, data in args.pieces:
            np.save(where / _file_name(leaf, start), _raw(data), allow_pickle=False)

    def restore(self, directory, args: "ShardsRestore") -> list[jax.Array]:
        where = pathlib.Path(directory)
        files: dict[int, list[tuple[tuple[int, ...], pathlib.Path]]] = {}
        for path in where.glob("*.npy"):
            leaf, start = path.name[: -len(".npy")].split(".", 1)
            files.setdefault(int(leaf), []).append(
                (tuple(int(s) for s in start.split("_")) if start else (), path)
            )
        return [_restore_leaf(i, target, files.get(i, [])) for i, target in enumerate(args.targets)]


def _restore_leaf(index: int, target: jax.ShapeDtypeStruct, files) -> jax.Array:
    shape, dtype, sharding = tuple(target.shape), np.dtype(target.dtype), target.sharding
    pieces = []
    for device, region in sharding.addressable_devices_indices_map(shape).items():
        bounds = [
            (s.start or 0, size if s.stop is None else s.stop)
            for s, size in zip(region, shape, strict=True)
        ]
        out = np.empty([hi - lo for lo, hi in bounds], dtype)
        covered = 0
        for start, path in files:
            saved = np.load(path, mmap_mode="r", allow_pickle=False)
            low = [max(lo, s) for (lo, _), s in zip(bounds, start, strict=True)]
            high = [
                min(hi, s + n) for (_, hi), s, n in zip(bounds, start, saved.shape, strict=True)
            ]
            if any(lo >= hi for lo, hi in zip(low, high, strict=True)):
                continue
            src = tuple(slice(lo - s, hi - s) for lo, hi, s in zip(low, high, start, strict=True))
            dst = tuple(
                slice(lo - b, hi - b) for lo, hi, (b, _) in zip(low, high, bounds, strict=True)
            )
            part = np.asarray(saved[src])
            if part.dtype.itemsize != dtype.itemsize:
                raise ValueError(f"{path.name} holds {part.dtype}, not {dtype}")
            out[dst] = part.view(dtype)
            covered += part.size
        if covered != out.size:
            raise FileNotFoundError(
                f"leaf {index}: the shard files cover {covered} of the {out.size} elements of "
                f"region {bounds}"
            )
        pieces.append(jax.device_put(out, device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces, dtype=dtype)


@ocp.args.register_with_handler(ShardsHandler, for_save=True)
@dataclasses.dataclass
class ShardsSave(ocp.args.CheckpointArgs):
    """Save args of the "shards" item: this process's pieces (`local_pieces`)."""

    pieces: tuple[Piece, ...]


@ocp.args.register_with_handler(ShardsHandler, for_restore=True)
@dataclasses.dataclass
class ShardsRestore(ocp.args.CheckpointArgs):
    """Restore args of the "shards" item: one `jax.ShapeDtypeStruct` with sharding per leaf."""

    targets: tuple[jax.ShapeDtypeStruct, ...]
