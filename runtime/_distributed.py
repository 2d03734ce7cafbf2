"""DistributedExecutor: one process per host (or stage group) on `jax.distributed`.

Every process lowers the same Plan and walks the same global instruction list; it
runs the Runs, Splits and Frees of the ranks whose devices it owns (a rank may span
several processes: they all run its tasks, as SPMD programs over the rank's mesh),
and takes part in the Sends whose source or target rank it owns. A Send inside one
process is a `jax.device_put`; across processes it is a jitted collective-permute
over a mesh of the sender's and the receiver's devices, built once per
(shape, dtype, partition spec, source rank, target rank). Since every process
follows the one global order, every pair of processes issues its transfers in the
same order on both sides and the collectives cannot deadlock.

Issuing such a collective blocks the host about until the GPU gets there (measured on
2 H200s: the sends held the host for 125 of a 176 ms step, against 127 ms for one
process driving both GPUs). `JAXPP_ASYNC_TRANSFERS=1` (or `async_transfers=True`)
hands the collectives, in plan order, to one transfer thread while the main thread
goes on issuing compute; a Run whose input is still in transit waits for it
(`dispatch_by_kind["wait"]`). It is off by default because it measured slower: 212
against 176 ms on 2 H200s, 93 against 69 ms on 2 CPU processes. A run in which a rank
spans several processes always transfers in line (its tasks hold collectives of their
own, which must keep one order with the transfers in every process).

On GPUs, values between ranks of different processes move by a cross-process
`jax.device_put` instead (`JAXPP_TRANSFER=auto`, the default): the client sends over
NCCL on its own stream and thread (runtime/NOTES.md), so neither the host nor the
compute stream waits for the peer. Measured on 2 H200s (GPT, batch 128): 134.7 ms a
step against 126.4 ms for one process driving both GPUs (1.07x), where the permute
took 202.4 ms (1.60x). On CPUs (gloo) it does not deliver, so there the permute stays;
`JAXPP_TRANSFER=permute` forces the permute everywhere.

Results are `jax.Array`s as in multi-controller JAX: addressable in the processes
that own the rank holding them. `fetch` brings a value to every process or to one.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpp import schedules
from jaxpp.runtime import _coordination, _local, _plan, _taskgraph

_PAIR_AXIS = "_jaxpp_pair"
_ENV_ASYNC_TRANSFERS = "JAXPP_ASYNC_TRANSFERS"
_ENV_TRANSFER = "JAXPP_TRANSFER"
TRANSFER_METHODS = ("auto", "permute", "device_put")


@dataclasses.dataclass(frozen=True, slots=True)
class _TransferKey:
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec
    src: int
    dst: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Pair:
    """A compiled transfer between two ranks and the shardings around it."""

    permute: Callable[[jax.Array], jax.Array]
    sharding: NamedSharding
    shape: tuple[int, ...]
    source_sharding: NamedSharding
    target_sharding: NamedSharding
    devices: tuple  # this process's devices of the pair mesh, in its order
    dst_devices: frozenset
    receiver_zeros: dict  # the receiver's never-read half of the input, per device
    stack: Callable[[jax.Array], jax.Array]
    unstack: Callable[[jax.Array], jax.Array]


class DistributedExecutor(_local.LocalExecutor):
    """Runs a Plan with one process per host or per stage group.

    Every process builds it with the same graph, plan and meshes (the global meshes
    of all ranks) and calls `run` with the same inputs; each does its own part.

    Args:
        graph: the compiled task graph.
        plan: the instructions (the same in every process).
        rank_meshes: the mesh of each rank, over global devices.
        output_avals: shape and dtype of each flat step output (processes that hold
            no part of an output return a non-addressable array of this type).
        input_specs: optional PartitionSpec per step input name.
        async_transfers: issue cross-process transfers on a transfer thread (default:
            `JAXPP_ASYNC_TRANSFERS`, else no); False issues them in line. Only honoured
            when every rank lives in one process.

    Step inputs may be host values (numpy, or arrays addressable in this process;
    every process must pass the same value) or arrays that an earlier step left on a
    rank (committed, on exactly that rank's devices).
    """

    def __init__(
        self,
        graph: _taskgraph.TaskGraph,
        plan: _plan.Plan,
        rank_meshes: Sequence[Mesh],
        *,
        output_avals: Sequence[jax.ShapeDtypeStruct],
        input_specs: Mapping[str, PartitionSpec] | None = None,
        async_transfers: bool | None = None,
    ) -> None:
        super().__init__(graph, plan, rank_meshes, input_specs=input_specs)
        self.output_avals = tuple(output_avals)
        self._transfer_thread: _TransferThread | None = None
        self._pending: list[_Transfer] = []
        me = jax.process_index()
        self._processes = tuple(
            frozenset(d.process_index for d in m.devices.flat) for m in self.rank_meshes
        )
        self._mine = tuple(me in p for p in self._processes)
        self._only_mine = tuple(p == {me} for p in self._processes)
        self._rank_of_devices = {
            frozenset(m.devices.flat): r for r, m in enumerate(self.rank_meshes)
        }
        self._pairs: dict[_TransferKey, _Pair] = {}
        self._reshard_fns: dict[NamedSharding, object] = {}
        # Sends by position in the plan: value names may differ between processes (the
        # compiler numbers values in an order that can vary), positions do not.
        sends = (ins for ins in plan.instructions if isinstance(ins, _plan.Send))
        self._send_index = {send: k for k, send in enumerate(sends)}
        self._agreed: dict[int, tuple] = {}
        # Two executors may share a plan's structure (one step, two batch shapes): the
        # creation number tells their transfers apart, the plan's hash checks the order.
        self._plan_id = f"{_coordination.next_executor_id()}-{_plan_id(plan, self.rank_meshes)}"
        self._runs = 0
        self._sync_transfers = all(
            d.platform == "cpu" for m in self.rank_meshes for d in m.devices.flat
        )
        # On CPUs a rank spread over processes runs in line (`_in_line`).
        self._spans_cpu_processes = tuple(
            self._sync_transfers and not only for only in self._only_mine
        )
        self.transfer_method = _resolve_transfer_method(
            transfer_method_default(), cpu=self._sync_transfers
        )
        if self.transfer_method == "device_put" and self._sync_transfers:
            raise ValueError(
                f"{_ENV_TRANSFER}=device_put: cross-process jax.device_put does not deliver on "
                f"CPUs (gloo) in jax 0.11.2. Fix: unset {_ENV_TRANSFER} (the collective-permute "
                f"transfer) on CPUs."
            )
        if async_transfers is None:
            async_transfers = async_transfers_default()
        if async_transfers is None:
            async_transfers = False  # measured slower on GPUs and CPUs (module docstring)
        # A rank spread over processes runs collectives of its own (its tasks are SPMD
        # programs over them); issued from two threads, the order of those and of the
        # transfers could differ between processes and deadlock them. So only when
        # every rank lives in one process.
        self.async_transfers = async_transfers and all(len(p) == 1 for p in self._processes)
        _coordination.describe_ranks(self._processes)

    def run(self, inputs: Sequence, *, record_timing: bool = False) -> list:
        """Executes this process's part of one step; returns the flat step outputs.

        Every process of the run must call it with the same inputs. If a collective
        fails because a peer died, it waits for the watchdog to name that peer (and
        stop this process) before re-raising.
        """
        try:
            outputs = super().run(inputs, record_timing=record_timing)
        except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as error:
            if _coordination.failed_collective(error):
                _coordination.wait_for_verdict(error)
            raise
        self._runs += 1
        if record_timing:
            self.last_stats = self._gather_stats(self.last_stats)
        return outputs

    def _gather_stats(self, stats: _local.StepStats) -> _local.StepStats:
        """Every rank's timings and peak activations, from the process that leads it.

        Each process measured only its ranks; they swap them through the key-value store
        (start times stay relative to each process's own step start).
        """
        me = jax.process_index()
        leads = {r for r, p in enumerate(self._processes) if min(p) == me}
        mine = {
            "timings": [dataclasses.astuple(t) for t in stats.timings if t.rank in leads],
            "peak": {str(r): stats.peak_activations[r] for r in leads},
        }
        prefix = f"jaxpp/stats/{self._plan_id}/{self._runs}"
        _coordination.kv_set(f"{prefix}/{me}", json.dumps(mine))
        timings, peak = [], list(stats.peak_activations)
        for p in sorted(set().union(*self._processes)):
            text = _coordination.kv_get(f"{prefix}/{p}", waiting_for=f"the timings of process {p}")
            theirs = json.loads(text)
            timings.extend(_local.TaskTiming(*t) for t in theirs["timings"])
            for r, n in theirs["peak"].items():
                peak[int(r)] = n
        timings.sort(key=lambda t: (t.start, t.rank))
        return dataclasses.replace(stats, peak_activations=tuple(peak), timings=tuple(timings))

    # -- ownership ----------------------------------------------------------------------

    def _runs_on(self, rank: int) -> bool:
        return self._mine[rank]

    # -- inputs -------------------------------------------------------------------------

    def _place_input(self, name: str, x, rank: int) -> jax.Array | None:
        # Inputs get exactly the same sharding every step, so tasks never recompile.
        spec = self.input_specs.get(name)
        home = self._home_rank(name, x)
        if home is None:  # a host value: every process of `rank` has it
            if not self._mine[rank]:
                return None
            target = _canonical(self._sharding_on(x, rank, spec))
            if self._only_mine[rank]:
                return jax.device_put(x, target)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, target, lambda index: host[index])
        if home == rank:
            if not self._mine[rank]:
                return None
            target = _canonical(self._sharding_on(x, rank, spec))
            if not x.sharding.is_equivalent_to(target, x.ndim):
                return self._reshard(x, target)
            return _relabel(x, target)
        agreed = (tuple(x.shape), np.dtype(x.dtype).name, _spec_of(x, self.rank_meshes[home]))
        what = f"step input {name!r} from rank {home} to rank {rank}"
        return self._later(what, rank, self._transfer_input, x, home, rank, agreed, spec)

    def _transfer_input(self, x, home: int, rank: int, agreed, spec) -> jax.Array | None:
        moved = self._transfer(x, home, rank, agreed)
        if moved is not None and spec is not None:
            target = _canonical(NamedSharding(self.rank_meshes[rank], spec))
            if moved.sharding != target:
                moved = self._reshard(moved, target)
        return moved

    def _home_rank(self, name: str, x) -> int | None:
        """The rank an input array lives on, or None for a host value."""
        if not isinstance(x, jax.Array):
            return None
        devices = frozenset(x.sharding.device_set)
        if x.committed and devices in self._rank_of_devices:
            return self._rank_of_devices[devices]
        if x.is_fully_addressable:
            return None
        raise ValueError(
            f"step input {name!r} is an array over devices "
            f"{sorted(d.id for d in devices)} spread over processes "
            f"{sorted({d.process_index for d in devices})}, which is no rank's device set. "
            f"Fix: pass host values (numpy, the same in every process) or arrays that a "
            f"previous pipelined step returned."
        )

    # -- transfers ----------------------------------------------------------------------

    def _send(self, send: _plan.Send, x) -> jax.Array | None:
        src, dst = send.source.rank, send.dst
        if not (self._mine[src] or self._mine[dst]):
            return None
        what = f"{send.source} from rank {src} to rank {dst}"
        if self._only_mine[src] and self._only_mine[dst]:
            if isinstance(x, _Transfer):  # still arriving: place it after it lands
                return self._later(what, dst, lambda v: self._place(self._resolve(v), dst), x)
            return self._place(x, dst)
        agreed = self._agreed_type(send, x)
        return self._later(what, dst, self._transfer, x, src, dst, agreed)

    # -- asynchronous transfers ---------------------------------------------------------

    def _later(self, what: str, dst: int, fn: Callable, *args) -> object:
        """Runs `fn(*args)` now, or hands it to the transfer thread (in call order).

        Returns what this process keeps of the result: the value (or a `_Transfer`
        future of it) where it owns rank `dst`, else None.
        """
        if not self.async_transfers:
            return fn(*args)
        if self._transfer_thread is None:
            self._transfer_thread = _TransferThread(f"jaxpp-transfers-{jax.process_index()}")
        future = self._transfer_thread.submit(what, fn, *args)
        self._pending.append(future)
        return future if self._mine[dst] else None

    def _resolve(self, value):
        if not isinstance(value, _Transfer):
            return value
        if value.done():
            return value.wait()
        started = time.perf_counter()
        try:
            return value.wait()
        finally:
            if not self._transfer_thread.is_current():  # the step's thread waited
                self._wait_seconds += time.perf_counter() - started

    def _finish_dispatch(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            self._resolve(future)

    def _agreed_type(self, send: _plan.Send, x) -> tuple[tuple[int, ...], str, PartitionSpec]:
        """Shape, dtype and spec of a Send's value, the same in every process it involves.

        Processes that own only the receiving rank never see the value before it
        arrives; the first time a value moves between two ranks, the sender's first
        process publishes its type in the coordination service's key-value store and
        the others read it there. Later Sends of that value use the same type (the
        sender reshards if a later step produced another layout).
        """
        src, dst = send.source.rank, send.dst
        index = self._send_index[send]
        agreed = self._agreed.get(index)
        if agreed is not None:
            return agreed
        store_key = f"jaxpp/transfer/{self._plan_id}/{index}"
        if self._mine[src]:
            x = self._resolve(x)  # a value this process forwards: its type, once
            agreed = (tuple(x.shape), np.dtype(x.dtype).name, _spec_of(x, self.rank_meshes[src]))
            needs_telling = not self._processes[dst] <= self._processes[src]
            if needs_telling and jax.process_index() == min(self._processes[src]):
                _coordination.kv_set(store_key, _encode_type(agreed))
        else:
            waiting_for = f"the type of {send.source} from rank {src}"
            agreed = _decode_type(_coordination.kv_get(store_key, waiting_for=waiting_for))
        self._agreed[index] = agreed
        return agreed

    def _transfer(
        self, x, src: int, dst: int, agreed: tuple[tuple[int, ...], str, PartitionSpec]
    ) -> jax.Array | None:
        """Moves `x` from rank `src` to rank `dst` (None in processes that do not receive).

        Processes owning neither rank return at once; the others run one
        collective-permute over the pair mesh, in the same global order.
        """
        if not (self._mine[src] or self._mine[dst]):
            return None
        x = self._resolve(x)  # on the transfer thread: an earlier transfer, so done
        shape, dtype_name, spec = agreed
        if self.transfer_method == "device_put" and not (
            self._processes[src] & self._processes[dst]
        ):
            return self._device_put_transfer(x, src, dst, agreed)
        pair = self._pair(_TransferKey(shape, dtype_name, spec, src, dst))
        if self._mine[src] and not x.sharding.is_equivalent_to(pair.source_sharding, x.ndim):
            x = self._reshard(x, pair.source_sharding)
        by_device = {s.device: s.data for s in x.addressable_shards} if self._mine[src] else {}
        pieces = [
            pair.receiver_zeros[device]
            if device in pair.dst_devices
            else pair.stack(by_device[device])
            for device in pair.devices
        ]
        stacked = jax.make_array_from_single_device_arrays(pair.shape, pair.sharding, pieces)
        if self._sync_transfers:
            # XLA's CPU client runs a computation whose inputs are not ready on its
            # thread pool, where a gloo collective holds a thread while it waits for
            # the peer: on a machine with few cores, waiting collectives can take every
            # thread and starve the peer's. With ready inputs it runs on this thread.
            jax.block_until_ready(stacked)
        out = pair.permute(stacked)
        if not self._mine[dst]:
            return None
        received = [
            pair.unstack(s.data) for s in out.addressable_shards if s.device in pair.dst_devices
        ]
        return jax.make_array_from_single_device_arrays(shape, pair.target_sharding, received)

    def _device_put_transfer(
        self, x, src: int, dst: int, agreed: tuple[tuple[int, ...], str, PartitionSpec]
    ) -> jax.Array | None:
        """A cross-process `jax.device_put` (`JAXPP_TRANSFER=auto` on GPUs, or device_put).

        The client sends over NCCL on its device-to-device stream from its own thread
        (runtime/NOTES.md), so neither the caller nor the compute stream waits for the
        peer. Both processes call it in the plan's one global order; the receiver passes
        a handle on the sender's array with no shards of its own.
        """
        shape, dtype_name, spec = agreed
        source = NamedSharding(self.rank_meshes[src], spec)
        if self._mine[src]:
            if not x.sharding.is_equivalent_to(source, x.ndim):
                x = self._reshard(x, source)
            x = _relabel(x, source)
        else:
            x = jax.make_array_from_single_device_arrays(
                shape, source, [], dtype=np.dtype(dtype_name)
            )
        out = jax.device_put(x, NamedSharding(self.rank_meshes[dst], spec))
        return out if self._mine[dst] else None

    def _pair(self, key: _TransferKey) -> "_Pair":
        """Everything a transfer of this type between these two ranks needs, made once.

        The sender's and receiver's shards are stacked along axis 0 (the pair axis
        major over the spec's own axes there), so each device's block is its own shard
        as it is: one program per transfer, no reshaping around it. Scalars get a new
        leading axis of 2.
        """
        pair = self._pairs.get(key)
        if pair is not None:
            return pair
        mesh_src, mesh_dst = self.rank_meshes[key.src], self.rank_meshes[key.dst]
        if mesh_src.devices.shape != mesh_dst.devices.shape:
            raise ValueError(
                f"rank {key.src} has a mesh of shape {mesh_src.devices.shape} but rank "
                f"{key.dst} one of {mesh_dst.devices.shape}; a transfer between processes needs "
                f"equal rank meshes. Fix: build the MpmdMesh by slicing one mesh along its "
                f"stage axis."
            )
        # Lower device ids first: XLA:GPU wants an iota device assignment (it logs an
        # error for others), so a transfer to a lower rank sends from pair index 1.
        flip = mesh_src.devices.flat[0].id > mesh_dst.devices.flat[0].id
        halves = (
            [mesh_dst.devices, mesh_src.devices] if flip else [mesh_src.devices, mesh_dst.devices]
        )
        mesh = Mesh(np.stack(halves), (_PAIR_AXIS, *mesh_src.axis_names))
        stacked_axis = len(key.shape) > 0
        if stacked_axis:
            spec = tuple(key.spec) + (None,) * (len(key.shape) - len(key.spec))
            lead = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
            lead = tuple(a for a in lead if a is not None)
            pair_spec = PartitionSpec((_PAIR_AXIS, *lead), *spec[1:])
            pair_shape = (2 * key.shape[0], *key.shape[1:])
        else:
            pair_spec = PartitionSpec(_PAIR_AXIS)
            pair_shape = (2,)
        perm = ((1, 0),) if flip else ((0, 1),)

        def move(stacked):
            return jax.lax.ppermute(stacked, _PAIR_AXIS, perm=perm)

        sharding = NamedSharding(mesh, pair_spec)
        source_sharding = NamedSharding(mesh_src, key.spec)
        dst_devices = frozenset(mesh_dst.devices.flat)
        devices = tuple(sharding.addressable_devices)
        shard_shape = source_sharding.shard_shape(key.shape)
        zeros_shape = shard_shape if stacked_axis else (1, *shard_shape)
        dtype = np.dtype(key.dtype)
        pair = _Pair(
            permute=jax.jit(
                jax.shard_map(move, mesh=mesh, in_specs=pair_spec, out_specs=pair_spec)
            ),
            sharding=sharding,
            shape=pair_shape,
            source_sharding=source_sharding,
            target_sharding=NamedSharding(mesh_dst, key.spec),
            devices=devices,
            dst_devices=dst_devices,
            receiver_zeros={
                d: jax.device_put(np.zeros(zeros_shape, dtype), d)
                for d in devices
                if d in dst_devices
            },
            stack=_identity if stacked_axis else _expand,
            unstack=_identity if stacked_axis else _squeeze,
        )
        self._pairs[key] = pair
        return pair

    def _call_task(self, task: _taskgraph.Task, rank: int, args: list):
        call = super()._call_task
        if self._spans_cpu_processes[rank]:
            return _in_line(call, task, rank, args)
        return call(task, rank, args)

    def _reshard(self, x: jax.Array, target: NamedSharding) -> jax.Array:
        fn = self._reshard_fns.get(target)
        if fn is None:
            fn = jax.jit(lambda a: a, out_shardings=target)
            if self._sync_transfers and len({d.process_index for d in target.device_set}) > 1:
                fn = functools.partial(_in_line, fn)
            self._reshard_fns[target] = fn
        return fn(x)

    def _microbatch_index(self, rank: int, mb: int) -> jax.Array:
        key = (rank, mb)
        if key not in self._mb_index:
            value = np.int32(mb)
            self._mb_index[key] = jax.make_array_from_callback(
                (), self._replicated(rank), lambda index: value
            )
        return self._mb_index[key]

    # -- outputs ------------------------------------------------------------------------

    def _output(self, index: int, buffer: _plan.Buffer, env: Mapping) -> jax.Array:
        if self._mine[buffer.rank]:
            return self._resolve(env[buffer])
        aval = self.output_avals[index]
        sharding = NamedSharding(self.rank_meshes[buffer.rank], PartitionSpec())
        return jax.make_array_from_single_device_arrays(aval.shape, sharding, [], dtype=aval.dtype)


def async_transfers_default() -> bool | None:
    """`JAXPP_ASYNC_TRANSFERS`: "1" transfers on a transfer thread, "0" in line, unset
    None (the executor's default: in line, see the module docstring).

    Example:
        >>> async_transfers_default() in (True, False, None)
        True
    """
    text = os.environ.get(_ENV_ASYNC_TRANSFERS, "").strip()
    if not text:
        return None
    if text not in ("0", "1"):
        raise ValueError(
            f"{_ENV_ASYNC_TRANSFERS}={text!r}: expected 1 (transfers on a transfer thread) "
            f"or 0 (in line)."
        )
    return text == "1"


def transfer_method_default() -> str:
    """`JAXPP_TRANSFER`: how values move between processes: "auto" (default: device_put
    on GPUs, permute on CPUs), "permute" (a jitted collective-permute over the pair of
    ranks) or "device_put" (a cross-process `jax.device_put`; GPUs only).

    Example:
        >>> transfer_method_default() in TRANSFER_METHODS
        True
    """
    text = os.environ.get(_ENV_TRANSFER, "auto").strip() or "auto"
    if text not in TRANSFER_METHODS:
        expected = ", ".join(TRANSFER_METHODS)
        raise ValueError(f"{_ENV_TRANSFER}={text!r}: expected one of {expected}.")
    return text


def _resolve_transfer_method(method: str, *, cpu: bool) -> str:
    """The method an executor uses: "auto" is the permute on CPUs, device_put elsewhere.

    Example:
        >>> _resolve_transfer_method("auto", cpu=True), _resolve_transfer_method("auto", cpu=False)
        ('permute', 'device_put')
    """
    if method == "auto":
        return "permute" if cpu else "device_put"
    return method


class _Transfer(concurrent.futures.Future):
    """A value that the transfer thread is bringing, and what it is (for errors)."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def wait(self):
        """The value, once the transfer thread issued it; raises its error if it failed.

        Bounded by `JAXPP_PROGRESS_TIMEOUT` (a dead peer is caught sooner, by the
        watchdog's heartbeats).
        """
        limit_s = _coordination.progress_timeout_s()
        try:
            return self.result(timeout=limit_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"waited {limit_s:g} s for the transfer of {self.what}, which the transfer "
                f"thread never finished issuing (its peer process is alive but did not "
                f"take part). Fix: check that every process runs the same step with the "
                f"same inputs; if the peer is only slow (compiling), raise "
                f"JAXPP_PROGRESS_TIMEOUT."
            ) from None


class _TransferThread:
    """One daemon thread that runs the submitted transfers in order.

    Example:
        >>> thread = _TransferThread("example")
        >>> thread.submit("a sum", sum, [1, 2]).wait()
        3
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def is_current(self) -> bool:
        """Whether the caller runs on this thread."""
        return threading.current_thread() is self._thread

    def submit(self, what: str, fn: Callable, *args) -> _Transfer:
        future = _Transfer(what)
        self._queue.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # handed to whoever waits for it
                future.set_exception(error)


def _in_line(fn: Callable, *args):
    """`fn(*args)` run to completion on this thread: the CPU program of a rank spread over
    processes, which holds gloo collectives. With its inputs ready XLA's CPU client runs it
    on the calling thread, in plan order, as the transfers (`_transfer`); queued on the
    client's thread pool, collectives waiting for the peer process could take every thread
    and starve the ones they wait on (a hang seen once in CI)."""
    jax.block_until_ready(args)
    return jax.block_until_ready(fn(*args))


def _plan_id(plan: _plan.Plan, meshes: Sequence[Mesh]) -> str:
    """A name for this plan and placement, the same in every process (no value names)."""
    shape = []
    for ins in plan.instructions:
        if isinstance(ins, _plan.Run):
            shape.append(f"R{ins.rank}:{ins.task}:{ins.mb}")
        elif isinstance(ins, _plan.Send):
            shape.append(f"S{ins.source.rank}>{ins.dst}:{ins.source.mb}")
        elif isinstance(ins, _plan.Split):
            shape.append(f"P{ins.rank}")
    devices = repr([[d.id for d in m.devices.flat] for m in meshes])
    text = "\n".join((schedules.format_schedule(plan.schedule), devices, *shape))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _encode_type(agreed: tuple[tuple[int, ...], str, PartitionSpec]) -> str:
    shape, dtype, spec = agreed
    axes = [list(a) if isinstance(a, tuple) else a for a in spec]
    return json.dumps({"shape": list(shape), "dtype": dtype, "spec": axes})


def _decode_type(text: str) -> tuple[tuple[int, ...], str, PartitionSpec]:
    data = json.loads(text)
    axes = [tuple(a) if isinstance(a, list) else a for a in data["spec"]]
    return tuple(data["shape"]), data["dtype"], PartitionSpec(*axes)


def _spec_of(x, mesh: Mesh) -> PartitionSpec:
    """The spec of `x` if it names axes of `mesh` only, else replicated; no trailing Nones."""
    sharding = getattr(x, "sharding", None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
    names = set(mesh.axis_names)
    for axis in spec:
        for n in axis if isinstance(axis, tuple) else (axis,):
            if n is not None and n not in names:
                return PartitionSpec()
    return _trim(spec)


def _trim(spec: PartitionSpec) -> PartitionSpec:
    axes = list(spec)
    while axes and axes[-1] is None:
        axes.pop()
    return PartitionSpec(*axes)


def _canonical(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, _trim(sharding.spec))


def _relabel(x: jax.Array, target: NamedSharding) -> jax.Array:
    """`x` with the sharding object `target`, which it is equivalent to (no copy)."""
    if x.sharding == target:
        return x
    shards = [s.data for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, target, shards)


def _expand(shard: jax.Array) -> jax.Array:
    return shard[None]


def _squeeze(shard: jax.Array) -> jax.Array:
    return shard[0]


def fetch(tree, *, process: int | None = None):
    """Brings values (losses, parameters: any pytree) to every process, or to one, as numpy.

    In a multi-process run every process must call it with the same tree structure
    (the arrays it holds, addressable or not); it costs one collective over all
    processes, plus one inside each rank whose values are sharded. Processes other
    than `process` get None.

    Args:
        tree: a pytree of `jax.Array`s (possibly with shards only in other
            processes) or host values.
        process: the process that wants them; None for every process.

    Raises:
        ValueError: if `process` is not a process of the run.

    Example:
        >>> import jax.numpy as jnp
        >>> fetch({"loss": jnp.float32(0.5), "w": jnp.arange(3.0)})
        {'loss': array(0.5, dtype=float32), 'w': array([0., 1., 2.], dtype=float32)}
    """
    count, me = jax.process_count(), jax.process_index()
    if process is not None and not 0 <= process < count:
        raise ValueError(
            f"process={process} is not a process of this run (0..{count - 1}). Fix: pass a "
            f"process index, or None to fetch to every process."
        )
    wanted = process is None or process == me
    leaves, treedef = jax.tree.flatten(tree)
    if count == 1:
        return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves]) if wanted else None
    local, sources = [], []
    for x in leaves:
        owners = sorted(_owners(x, count))
        sources.append(owners[0])
        local.append(_local_copy(x) if me in owners else np.zeros(np.shape(x), _dtype(x)))
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(
        [v if me == src else np.zeros_like(v) for v, src in zip(local, sources, strict=True)]
    )
    if not wanted:
        return None
    values = [np.asarray(g[src]) for g, src in zip(gathered, sources, strict=True)]
    return jax.tree.unflatten(treedef, values)


def _owners(x, count: int) -> set[int]:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return {d.process_index for d in x.sharding.device_set}
    if isinstance(x, jax.Array) and x.committed:
        return {d.process_index for d in x.sharding.device_set}
    return set(range(count))  # a host value: every process has it


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _local_copy(x) -> np.ndarray:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if not x.is_fully_replicated:
        x = jax.jit(_identity, out_shardings=_replicated_like(x))(x)
    return np.asarray(x.addressable_data(0))


def _identity(x):
    return x


def _replicated_like(x: jax.Array) -> NamedSharding:
    if isinstance(x.sharding, NamedSharding):
        return NamedSharding(x.sharding.mesh, PartitionSpec())
    devices = sorted(x.sharding.device_set, key=lambda d: d.id)
    return NamedSharding(Mesh(np.array(devices), ("_devices",)), PartitionSpec())


def stage_mesh(
    num_ranks: int,
    inner: Mapping[str, int] | None = None,
    *,
    stage_axis: str = "stages",
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh of every device of the run, ranks along `stage_axis`, checked to fit.

    Devices are ordered by process, so a rank spans as few processes as it can:
    with one device per process and `inner={"data": 2}`, each rank spans two.

    Args:
        num_ranks: pipeline ranks.
        inner: the SPMD axes inside a rank and their sizes (default: none).
        stage_axis: the name of the rank axis.
        devices: the devices to use (default: `jax.devices()`, all processes').

    Raises:
        ValueError: if the devices do not fill `num_ranks` ranks of that shape.

    Example:
        >>> import jax
        >>> dict(stage_mesh(4, {"data": 2}).shape)
        {'stages': 4, 'data': 2}
    """
    inner = dict(inner or {})
    devices = list(jax.devices() if devices is None else devices)
    per_rank = int(np.prod(tuple(inner.values()), dtype=int))
    need = num_ranks * per_rank
    if len(devices) != need:
        per_process: dict[int, int] = {}
        for d in devices:
            per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
        layout = ", ".join(f"{n}" for n in per_process.values())
        raise ValueError(
            f"the pipeline needs {num_ranks} ranks x {per_rank} devices = {need} devices but "
            f"the run has {len(devices)} ({len(per_process)} processes with {layout} devices). "
            f"Fix: launch {need} devices in all, e.g. jaxpp launch -n {num_ranks} "
            f"--devices-per-process {per_rank}, or change the number of ranks."
        )
    devices.sort(key=lambda d: (d.process_index, d.id))
    shape = (num_ranks, *inner.values())
    return Mesh(np.array(devices).reshape(shape), (stage_axis, *inner))
