"""LocalExecutor: one process drives every rank of one host.

It follows a Plan in its global order. JAX dispatches asynchronously, so while
one rank's task runs the host already enqueues the next rank's work: the ranks
overlap as the schedule intends. Transfers are `jax.device_put` to the
receiving stage's sharding.
"""

import dataclasses
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpp.runtime import _plan, _precompile, _rank_mesh, _taskgraph


@dataclasses.dataclass(frozen=True, slots=True)
class TaskTiming:
    """Wall-clock start and end (seconds from the step's start) of one Run."""

    rank: int
    name: str
    mb: int | None
    start: float
    end: float


@dataclasses.dataclass(frozen=True, slots=True)
class StepStats:
    """What one executed step looked like.

    Attributes:
        seconds: wall time of the step (until its outputs were ready).
        peak_activations: per rank, the most (stage, microbatch) pairs whose kept
            activations were alive at once.
        timings: per-Run timings when the executor was asked to record them.
        dispatch_seconds: host time spent issuing the step's work (until the last
            instruction was dispatched); near `seconds` means the host, not the
            devices, sets the pace.
        dispatch_by_kind: that host time split by what it issued ("inputs", "run",
            "send", "split", "free", "outputs", and "wait": time spent waiting for a
            value that another thread was still bringing, e.g. an asynchronous
            transfer); a kind that takes far longer than its work needs is where the
            host waits.
    """

    seconds: float
    peak_activations: tuple[int, ...]
    timings: tuple[TaskTiming, ...]
    dispatch_seconds: float = 0.0
    dispatch_by_kind: Mapping[str, float] = dataclasses.field(default_factory=dict)


class LocalExecutor:
    """Runs a Plan on the devices of this process.

    Args:
        graph: the compiled task graph (its callables).
        plan: the instructions.
        rank_meshes: the mesh of each rank (a rank's devices, with the SPMD axes
            that live inside a stage).
        input_specs: optional PartitionSpec per step input name, over the rank mesh
            axes; values without one keep a sharding they already have on the rank's
            devices, or are replicated.
    """

    def __init__(
        self,
        graph: _taskgraph.TaskGraph,
        plan: _plan.Plan,
        rank_meshes: Sequence[Mesh],
        *,
        input_specs: Mapping[str, PartitionSpec] | None = None,
    ) -> None:
        self.graph = graph
        self.plan = plan
        self.rank_meshes = tuple(rank_meshes)
        self.input_specs = dict(input_specs or {})
        self._tasks = {
            t.name: t for t in (*graph.pre_tasks, *graph.loop_tasks.values(), *graph.post_tasks)
        }
        self._compiled: dict[tuple[str, int], object] = {}
        self._mb_index: dict[tuple[int, int], jax.Array] = {}
        self._split_fns: dict[int, object] = {}
        # Step inputs by position (value names may differ between processes).
        position = {name: i for i, name in enumerate(graph.step_inputs)}
        self._input_order = tuple(
            sorted(
                plan.input_ranks.items(), key=lambda kv: (position.get(kv[0], len(position)), kv[0])
            )
        )
        self.last_stats: StepStats | None = None
        self._wait_seconds = 0.0
        # Task programs compiled before the first step (`_precompile`), and how often a
        # step's arguments did not fit one (then it was compiled lazily instead).
        self.last_precompile: _precompile.PrecompileStats | None = None
        self.precompile_misses = 0
        self._precompiled = False
        self._ahead: set[tuple[str, int]] = set()

    # -- placement helpers ------------------------------------------------------------

    def _replicated(self, rank: int) -> NamedSharding:
        return NamedSharding(self.rank_meshes[rank], PartitionSpec())

    def _sharding_on(self, x, rank: int, spec: PartitionSpec | None = None) -> NamedSharding:
        mesh = self.rank_meshes[rank]
        if spec is None:
            sharding = getattr(x, "sharding", None)
            spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
            if not all(a is None or _axes_in(a, mesh) for a in spec):
                spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    def _place(self, x, rank: int, spec: PartitionSpec | None = None) -> jax.Array:
        target = self._sharding_on(x, rank, spec)
        if getattr(x, "sharding", None) == target:
            return x
        # Also when the sharding is only equivalent: one canonical sharding per value keeps
        # every task's compiled executable valid from the first step on.
        if _same_layout_elsewhere(x, target):
            return _copy_shards(x, target)
        if _needs_pieces(x, target):
            return _move_pieces(x, target)
        return jax.device_put(x, target)

    def _make_jit(self, task: _taskgraph.Task, rank: int):
        # Sharding annotations written against a template mesh land on this rank's devices.
        fn = _rank_mesh.on_rank(task.fn, rank, self.rank_meshes[rank])
        if task.inputs:
            return jax.jit(fn, donate_argnums=task.donate)
        return jax.jit(fn, out_shardings=self._replicated(rank))

    def _compiled_task(self, task: _taskgraph.Task, rank: int):
        key = (task.name, rank)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._make_jit(task, rank)
            self._compiled[key] = fn
        return fn

    def _call_task(self, task: _taskgraph.Task, rank: int, args: list):
        key = (task.name, rank)
        try:
            return self._compiled_task(task, rank)(*args)
        except (TypeError, ValueError):
            if key not in self._ahead:
                raise
        # The arguments' types or devices differ from the ones compiled ahead: compile
        # lazily as without precompiling (a wrong step would raise again here).
        self._ahead.discard(key)
        self.precompile_misses += 1
        self._compiled[key] = self._make_jit(task, rank)
        return self._compiled[key](*args)

    def _precompile(self, given: Mapping[str, object]) -> None:
        """Compiles every task program before the first step, ranks in parallel."""
        self._precompiled = True
        if not _precompile.enabled(self.rank_meshes):
            return
        programs = _precompile.plan_programs(
            self._tasks, self.plan, given, self.rank_meshes, self._runs_on,
            input_specs=self.input_specs,
        )  # fmt: skip
        programs = [p for p in programs if (p.task.name, p.rank) not in self._compiled]
        compiled, self.last_precompile = _precompile.compile_programs(programs, self._make_jit)
        self._compiled.update(compiled)
        self._ahead.update(compiled)

    def _microbatch_index(self, rank: int, mb: int) -> jax.Array:
        key = (rank, mb)
        if key not in self._mb_index:
            self._mb_index[key] = jax.device_put(np.int32(mb), self._replicated(rank))
        return self._mb_index[key]

    def _split(self, x: jax.Array, num: int) -> tuple[jax.Array, ...]:
        fn = self._split_fns.get(num)
        if fn is None:
            fn = jax.jit(lambda a: tuple(a[i] for i in range(num)))
            self._split_fns[num] = fn
        return fn(x)

    # -- what a subclass that runs only some ranks overrides -----------------------------

    def _runs_on(self, rank: int) -> bool:
        """Whether this process runs the instructions of `rank` (here: every rank)."""
        del rank
        return True

    def _place_input(self, name: str, x, rank: int) -> jax.Array | None:
        """A step input on `rank` (None where this process holds no part of it)."""
        return self._place(x, rank, self.input_specs.get(name))

    def _send(self, send: _plan.Send, x) -> jax.Array | None:
        """Runs a Send; `x` is the source (None here when this process does not hold it)."""
        return self._place(x, send.dst)

    def _output(self, index: int, buffer: _plan.Buffer, env: Mapping) -> jax.Array:
        """Step output `index`, held in `buffer`."""
        del index
        return self._resolve(env[buffer])

    def _resolve(self, value):
        """The value a buffer holds (here: always the value itself; a subclass may hold
        a future of it while another thread brings it, and adds the time it waited for
        it to `self._wait_seconds`)."""
        return value

    def _finish_dispatch(self) -> None:
        """Waits until work handed to other threads during the step was dispatched."""

    # -- running ------------------------------------------------------------------------

    def run(self, inputs: Sequence, *, record_timing: bool = False) -> list:
        """Executes one step; returns the flat step outputs.

        Args:
            inputs: the flat step arguments, in `graph.step_inputs` order.
            record_timing: wait for each task and record its wall time (this
                serialises the ranks; use it to measure task costs, not throughput).
        """
        graph, plan = self.graph, self.plan
        given = dict(zip(graph.step_inputs, inputs, strict=True))
        given.update(graph.constants)
        if not self._precompiled:
            self._precompile(given)
        env: dict[_plan.Buffer, object] = {}
        start = time.perf_counter()
        for name, ranks in self._input_order:
            for r in ranks:
                value = self._place_input(name, given[name], r)
                if value is not None:
                    env[_plan.Buffer(name, None, r)] = value
        host = dict.fromkeys(("run", "send", "split", "free"), 0.0)
        self._wait_seconds = 0.0
        host["inputs"] = time.perf_counter() - start
        live: list[dict[tuple[int, int], int]] = [{} for _ in range(plan.num_ranks)]
        peak = [0] * plan.num_ranks
        timings = []
        for ins in plan.instructions:
            issued = time.perf_counter()
            if isinstance(ins, _plan.Run):
                if not self._runs_on(ins.rank):
                    continue
                task = self._tasks[ins.task]
                waited_before = self._wait_seconds
                args = [self._resolve(env[b]) for b in ins.inputs]
                issued += self._wait_seconds - waited_before
                if _taskgraph.MICROBATCH_INDEX in task.inputs:
                    args.append(self._microbatch_index(ins.rank, ins.mb))
                t0 = time.perf_counter() - start
                outs = self._call_task(task, ins.rank, args)
                if record_timing:
                    jax.block_until_ready(outs)
                    timings.append(
                        TaskTiming(ins.rank, ins.task, ins.mb, t0, time.perf_counter() - start)
                    )
                for b, value in zip(ins.outputs, outs, strict=True):
                    env[b] = value
                    pair = plan.activations.get(b)
                    if pair is not None:
                        counts = live[b.rank]
                        counts[pair] = counts.get(pair, 0) + 1
                        peak[b.rank] = max(peak[b.rank], len(counts))
                host["run"] += time.perf_counter() - issued
            elif isinstance(ins, _plan.Send):
                value = self._send(ins, env.get(ins.source))
                if value is not None:
                    env[ins.target] = value
                host["send"] += time.perf_counter() - issued
            elif isinstance(ins, _plan.Split):
                if not self._runs_on(ins.rank):
                    continue
                source = self._resolve(env[ins.source])
                for b, value in zip(
                    ins.outputs, self._split(source, ins.num_microbatches), strict=True
                ):
                    env[b] = value
                host["split"] += time.perf_counter() - issued
            elif isinstance(ins, _plan.Free):
                if not self._runs_on(ins.buffer.rank):
                    continue
                del env[ins.buffer]
                pair = plan.activations.get(ins.buffer)
                if pair is not None:
                    counts = live[ins.buffer.rank]
                    counts[pair] -= 1
                    if counts[pair] == 0:
                        del counts[pair]
                host["free"] += time.perf_counter() - issued
        self._finish_dispatch()
        host["wait"] = self._wait_seconds
        issued = time.perf_counter()
        outputs = [
            given[name] if b is None else self._output(index, b, env)
            for index, (name, b) in enumerate(plan.outputs)
        ]
        host["outputs"] = time.perf_counter() - issued
        dispatched = time.perf_counter() - start
        jax.block_until_ready(outputs)
        self.last_stats = StepStats(
            time.perf_counter() - start, tuple(peak), tuple(timings), dispatched, host
        )
        return outputs


try:  # the copy that jax.device_put makes when only the devices change, without its
    # ~0.1 ms of host work per call (a pipeline step issues hundreds of transfers)
    from jax._src.lib import xla_client as _xc

    _BATCHED_COPY = _xc.batched_copy_array_to_devices_with_sharding
    _REUSE_INPUT = _xc.ArrayCopySemantics.REUSE_INPUT
except (ImportError, AttributeError):  # another jax: jax.device_put does the same copy
    _BATCHED_COPY = None


def _same_layout_elsewhere(x, target: NamedSharding) -> bool:
    """Whether `x` only needs its shards copied to `target`'s devices, one to one.

    True for a fully addressable array whose NamedSharding has the same spec, mesh axes
    and memory kind as `target` (so shard i goes to device i of the other mesh).
    """
    if _BATCHED_COPY is None or not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return False
    source = x.sharding
    return (
        isinstance(source, NamedSharding)
        and source.spec == target.spec
        and source.mesh.shape_tuple == target.mesh.shape_tuple
        and source.memory_kind == target.memory_kind
    )


def _copy_shards(x: jax.Array, target: NamedSharding) -> jax.Array:
    """`jax.device_put(x, target)` for an `x` that `_same_layout_elsewhere` accepts.

    Example:
        >>> import numpy as np
        >>> devices = jax.devices()[:2]
        >>> x = jax.device_put(np.arange(4.0), devices[0])
        >>> there = NamedSharding(Mesh(np.array(devices[-1:]), ("m",)), PartitionSpec())
        >>> here = NamedSharding(Mesh(np.array(devices[:1]), ("m",)), PartitionSpec())
        >>> y = _copy_shards(jax.device_put(x, here), there)
        >>> y.sharding == there, np.asarray(y).tolist()
        (True, [0.0, 1.0, 2.0, 3.0])
    """
    devices = target._internal_device_list
    return _BATCHED_COPY([x], [devices], [target], [_REUSE_INPUT])[0]


def _needs_pieces(x, target: NamedSharding) -> bool:
    """Whether `jax.device_put(x, target)` would copy `x` through the host.

    jax copies device to device only when every shard `target` needs is already a whole
    shard of `x`; otherwise (a model initialized sharded over all devices and then
    placed on one rank, say) it fetches the whole array to the host first, which took
    110 s for one stage of an 8B model's state on an H200.
    """
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return False
    held = {_bounds(i, x.shape) for i in x.sharding.devices_indices_map(x.shape).values()}
    wanted = target.devices_indices_map(x.shape).values()
    return any(_bounds(i, x.shape) not in held for i in wanted)


def _move_pieces(x: jax.Array, target: NamedSharding) -> jax.Array:
    """`jax.device_put(x, target)` device to device, for any two shardings.

    Each of `target`'s shards is assembled on its device from the pieces of `x`'s shards
    that overlap it (one copy of each piece, preferring one already on that device).

    Example:
        >>> import numpy as np
        >>> devices = jax.devices()[:3]
        >>> halves = NamedSharding(Mesh(np.array(devices[:2]), ("d",)), PartitionSpec("d"))
        >>> x = jax.device_put(np.arange(8.0), halves)
        >>> there = NamedSharding(Mesh(np.array(devices[2:]), ("m",)), PartitionSpec())
        >>> y = _move_pieces(x, there)
        >>> y.sharding == there, np.asarray(y).tolist()
        (True, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    """
    shards = [(_bounds(s.index, x.shape), s.data) for s in x.addressable_shards]
    buffers = []
    for device, index in target.addressable_devices_indices_map(x.shape).items():
        want = _bounds(index, x.shape)
        pieces: dict[tuple, jax.Array] = {}
        for have, data in sorted(shards, key=lambda s: device not in s[1].devices()):
            piece = _overlap(want, have)
            if piece is None or piece in pieces:
                continue
            if piece != have:  # only part of this shard is wanted: slice it where it is
                data = data[tuple(slice(lo, hi) for lo, hi in _relative(piece, have))]
            pieces[piece] = jax.device_put(data, device)
        if list(pieces) == [want]:
            buffers.append(pieces[want])
            continue
        out = jnp.zeros(tuple(hi - lo for lo, hi in want), x.dtype, device=device)
        for piece, data in pieces.items():
            out = _write_piece(out, data, tuple(lo for lo, _ in _relative(piece, want)))
        buffers.append(out)
    return jax.make_array_from_single_device_arrays(x.shape, target, buffers)


@jax.jit
def _write_piece(out: jax.Array, piece: jax.Array, starts: tuple) -> jax.Array:
    return jax.lax.dynamic_update_slice(out, piece, starts)


Bounds = tuple[tuple[int, int], ...]  # (start, stop) per dimension


def _bounds(index: tuple, shape: tuple[int, ...]) -> Bounds:
    """A shard's index (slices, as jax gives them) as bounds."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _overlap(a: Bounds, b: Bounds) -> Bounds | None:
    both = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in both) else both


def _relative(inner: Bounds, outer: Bounds) -> Bounds:
    """`inner`'s bounds counted from `outer`'s start."""
    return tuple((lo - o, hi - o) for (lo, hi), (o, _) in zip(inner, outer, strict=True))


def _axes_in(axis, mesh: Mesh) -> bool:
    names = axis if isinstance(axis, tuple) else (axis,)
    return all(n in mesh.axis_names for n in names)
