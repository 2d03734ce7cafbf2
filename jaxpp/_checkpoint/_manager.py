"""`CheckpointManager`: save and restore a whole pipelined train state with orbax.

A checkpoint of step N is one orbax step directory with two items: the arrays, and
"meta" (JSON, written by process 0: step, data position, RNG key, the run's config,
the storage, and per leaf its path, shape, dtype and checksum). The arrays are
"state" (orbax `StandardSave`) in a single-process run, and "shards" (`_shards`: each
process writes the shards it holds, one `.npy` file each) with several processes,
whose pipeline stages hold arrays that live on one process only. Orbax writes a step into a
temporary directory and renames it when complete, so a step is complete or absent.
"""

import dataclasses
import gc
import json
import pathlib
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from jaxpp._checkpoint import _leaves, _shards

FORMAT = "jaxpp-checkpoint v1"
_STATE, _META, _SHARDS = "state", "meta", "shards"

JsonValue = None | bool | int | float | str | list | dict


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Restored:
    """What `CheckpointManager.restore` read back.

    Attributes:
        state: the train state, its arrays placed as the target asked.
        step: the step the checkpoint was saved at.
        data_position: what `save` was given (e.g. the next batch index), or None.
        rng: the saved PRNG key (typed or raw, as it was given), or None.
        config: the run configuration saved with the checkpoint, or None.
    """

    state: object
    step: int
    data_position: JsonValue
    rng: jax.Array | None
    config: Mapping[str, JsonValue] | None


class CheckpointManager:
    """Saves train states every few steps (asynchronously) and restores them onto any layout.

    Args:
        directory: where the step directories go (created if missing).
        max_to_keep: keep the newest this many checkpoints (None keeps all).
        keep_period: also keep every checkpoint whose step is a multiple of this.
        save_every: `save` writes only at steps that are multiples of this (unless forced).
        async_save: write in a background thread; `save` returns once the arrays are
            copied off the devices, so training continues while the files are written.
        config: JSON-able description of the run (model sizes, optimizer, ...). It is
            saved with each checkpoint, and `restore` refuses a checkpoint whose config
            differs from this one.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> state = {"w": jnp.arange(3.0), "step": jnp.int32(7)}
        >>> with CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
        ...     manager.save(7, state, data_position=7)
        ...     restored = manager.restore(state)
        True
        >>> restored.step, restored.data_position, restored.state["w"].tolist()
        (7, 7, [0.0, 1.0, 2.0])
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int | None = 3,
        keep_period: int | None = None,
        save_every: int = 1,
        async_save: bool = True,
        config: Mapping[str, JsonValue] | None = None,
    ) -> None:
        for name, value in (("max_to_keep", max_to_keep), ("keep_period", keep_period)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None.")
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every={save_every!r} must be a positive int (1 saves always).")
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(
                f"checkpoint directory {self.directory} is a file. Fix: pass a directory path."
            )
        self.save_every = save_every
        self.config = None if config is None else _json_roundtrip(config, "config")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            save_interval_steps=1,  # `should_save` decides; orbax's would also save step 1
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META, _SHARDS)
        )

    # -- saving ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state,
        *,
        data_position: JsonValue = None,
        rng: jax.Array | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` as step `step` if it is a save step (or `force`); returns whether it did.

        With `async_save` the call returns once the arrays are copied to host memory; the
        files are written in the background and the step appears (atomically) when done.

        Args:
            step: the number of steps taken; names the checkpoint.
            state: a pytree of arrays (params, optimizer state, ...), on any devices.
            data_position: JSON-able position in the data (e.g. the next batch index).
            rng: a PRNG key (typed `jax.random.key` or raw uint32) to save with it.
            force: save even if `step` is not a multiple of `save_every`.

        Raises:
            CheckpointError: if step `step` is already saved (it is never overwritten).

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> manager = CheckpointManager(tempfile.mkdtemp(), save_every=2)
            >>> manager.save(1, {"w": jnp.ones(2)}), manager.save(2, {"w": jnp.ones(2)})
            (False, True)
            >>> manager.close()
        """
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            raise _leaves.CheckpointError(
                f"step {step} is already saved in {self.directory}; a checkpoint is never "
                f"overwritten. Fix: save under a new step, or delete {self.directory / str(step)}."
            )
        records = _leaves.records_of(state)  # with several processes: collective
        # Several processes: each writes the shards it holds (orbax's array handler wants
        # every process to hold part of every array, which a pipeline's stages do not).
        storage = _SHARDS if jax.process_count() > 1 else _STATE
        meta = {
            "format": FORMAT,
            "storage": storage,
            "step": int(step),
            "data_position": _json_roundtrip(data_position, "data_position"),
            "rng": _rng_to_json(rng),
            "config": self.config,
            "leaves": [r.to_json() for r in records],
        }
        stored = jax.tree.map(lambda x: jax.random.key_data(x) if _leaves.is_key(x) else x, state)
        if storage == _SHARDS:
            arrays = _shards.ShardsSave(_shards.local_pieces(jax.tree.leaves(stored)))
        else:
            arrays = ocp.args.StandardSave(stored)
        args = ocp.args.Composite(**{storage: arrays, _META: ocp.args.JsonSave(meta)})
        return self._manager.save(step, args=args, force=True)

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` writes unforced: `step` is a multiple of `save_every`."""
        return step % self.save_every == 0

    def wait_until_finished(self) -> None:
        """Blocks until the save in progress (if any) is written and committed."""
        self._manager.wait_until_finished()

    # -- restoring ------------------------------------------------------------------------

    def all_steps(self) -> tuple[int, ...]:
        """The steps with a complete checkpoint, oldest first."""
        return tuple(sorted(self._manager.all_steps()))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def restore(self, target, *, step: int | None = None) -> Restored:
        """Reads a checkpoint into the layout of `target`, checking it fits first.

        Args:
            target: a pytree shaped like the saved state. Each leaf says where its array
                goes: a `jax.Array` (onto its sharding), a `jax.ShapeDtypeStruct` with
                `sharding=` (e.g. from `input_shardings` of a pipelined step, or a
                `jax.jit` layout), or anything else with `.shape`/`.dtype` (onto the first
                local device). The layout may differ from the one that saved it.
            step: which checkpoint; the newest when None.

        Raises:
            CheckpointError: no checkpoint; the step is missing; the checkpoint's leaves
                (paths, shapes, dtypes) or config differ from the target's, naming them; a
                file is missing, truncated or corrupted (checksums are verified).

        Example:
            >>> import tempfile, jax, jax.numpy as jnp
            >>> manager = CheckpointManager(tempfile.mkdtemp())
            >>> _ = manager.save(3, {"w": jnp.ones(2)})
            >>> where = jax.sharding.SingleDeviceSharding(jax.devices()[1])
            >>> target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=where)}
            >>> manager.restore(target).state["w"].sharding == where
            True
            >>> manager.close()
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise _leaves.CheckpointError(
                    f"no checkpoint in {self.directory}. Fix: check the path, or train from "
                    f"scratch (leave out --resume)."
                )
            step = steps[-1]
        elif step not in steps:
            raise _leaves.CheckpointError(
                f"no checkpoint of step {step} in {self.directory}; it holds steps "
                f"{list(steps)}. Fix: pass one of those, or step=None for the newest."
            )
        where = str(self.directory / str(step))
        meta = self._read_meta(step, where)
        records = tuple(_leaves.LeafRecord.from_json(r) for r in meta["leaves"])
        self._check_config(meta.get("config"), where)
        paths = _leaves.leaf_paths(target)
        target_leaves, treedef = jax.tree.flatten(target)
        _leaves.check_compatible(records, paths, target_leaves, where=where)
        abstract = jax.tree.unflatten(treedef, [_stored_leaf(x) for x in target_leaves])
        failure = None
        try:
            if meta.get("storage", _STATE) == _SHARDS:
                targets = _shards.ShardsRestore(tuple(jax.tree.leaves(abstract)))
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(**{_SHARDS: targets})
                )[_SHARDS]
                restored = jax.tree.unflatten(treedef, restored)
            else:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
                )[_STATE]
        except Exception as error:  # orbax and tensorstore raise many types for bad files
            failure = error
        if failure is not None:
            message = (
                f"checkpoint {where} cannot be read: {type(failure).__name__}: "
                f"{_first_line(failure)}\nFix: the files are missing or damaged; restore "
                f"another step (available: {list(steps)}) with restore(..., step=N)."
            )
            _release_failed_reads(failure)
            raise _leaves.CheckpointError(message) from failure
        by_path = {r.path: r for r in records}
        restored = jax.tree.unflatten(
            treedef,
            [
                jax.random.wrap_key_data(x, impl=by_path[path].key_impl)
                if by_path[path].key_impl
                else x
                for path, x in zip(paths, jax.tree.leaves(restored), strict=True)
            ],
        )
        _leaves.check_checksums(records, paths, jax.tree.leaves(restored), where=where)
        return Restored(
            state=restored,
            step=int(meta["step"]),
            data_position=meta.get("data_position"),
            rng=_rng_from_json(meta.get("rng")),
            config=meta.get("config"),
        )

    def _read_meta(self, step: int, where: str) -> dict:
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as error:
            raise _leaves.CheckpointError(
                f"checkpoint {where} has no readable metadata ({_META}/): "
                f"{type(error).__name__}: {_first_line(error)}\nFix: it was not written by "
                f"jaxpp.checkpoint or is damaged; restore another step with step=N."
            ) from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "leaves" not in meta:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise _leaves.CheckpointError(
                f"checkpoint {where} is not a {FORMAT!r} checkpoint (format: {found!r}). "
                f"Fix: restore checkpoints written by jaxpp.checkpoint.CheckpointManager."
            )
        return meta

    def _check_config(self, saved: Mapping | None, where: str) -> None:
        if self.config is None or saved is None or saved == self.config:
            return
        keys = sorted(set(saved) | set(self.config))
        differ = [
            f"{k}: saved {saved.get(k, '<absent>')!r}, now {self.config.get(k, '<absent>')!r}"
            for k in keys
            if saved.get(k, "<absent>") != self.config.get(k, "<absent>")
        ]
        raise _leaves.CheckpointError(
            f"checkpoint {where} was saved by a run with another config: {'; '.join(differ)}. "
            f"Fix: use the saved config, or a new checkpoint directory."
        )

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for the save in progress, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _stored_leaf(x) -> jax.ShapeDtypeStruct:
    """What orbax reads for a target leaf: its shape and dtype (typed keys: their uint32
    data) on its sharding, or on the first local device."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = SingleDeviceSharding(jax.local_devices()[0])
    if _leaves.is_key(x):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(np.shape(x), x.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _json_roundtrip(value: JsonValue, name: str) -> JsonValue:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name}={value!r} is not JSON-able ({error}). Fix: use ints, floats, strings, "
            f"lists and dicts with string keys."
        ) from error


def _rng_to_json(rng: jax.Array | None) -> dict | None:
    if rng is None:
        return None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(rng))
        return {"impl": str(jax.random.key_impl(rng)), "data": data.tolist(), "typed": True}
    if np.dtype(rng.dtype) != np.uint32:
        raise ValueError(
            f"rng has dtype {rng.dtype}; expected a typed key (jax.random.key) or a raw uint32 "
            f"key (jax.random.PRNGKey). Fix: pass the key itself."
        )
    return {"impl": None, "data": np.asarray(rng).tolist(), "typed": False}


def _rng_from_json(data: Mapping | None) -> jax.Array | None:
    if data is None:
        return None
    raw = np.asarray(data["data"], np.uint32)
    if data["typed"]:
        return jax.random.wrap_key_data(raw, impl=data["impl"])
    return jax.numpy.asarray(raw)


def _release_failed_reads(error: BaseException) -> None:
    """Finalizes the reads orbax left pending when one failed, now rather than later.

    The tracebacks of a failed orbax read hold its event loop's other read coroutines;
    freed at some later garbage collection, they report "Exception ignored in
    <coroutine _read_array_index_and_device_put>" in whatever code runs then. Dropping
    the tracebacks (the messages stay) and collecting here reports them at the failure.
    """
    for link in _causes(error):
        link.__traceback__ = None
    gc.collect()


def _causes(error: BaseException | None):
    """`error`, then what caused it, down to the root cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    """The first line of `error`, and of its root cause (which names the file) if another."""
    lines = []
    for link in _causes(error):
        text = str(link).split("See full TensorStore details")[0].strip()
        lines.append(text.splitlines()[0][:300] if text else "(no message)")
    return lines[0] if len(lines) == 1 else f"{lines[0]} (cause: {lines[-1]})"
