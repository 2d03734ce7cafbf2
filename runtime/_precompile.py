"""Compiling a step's task programs before its first run, one thread per rank.

Run lazily, each task program compiles the first time the step reaches it, one after
the other, on the critical path of the first step: with large stages that is minutes
(XLA:GPU compiles and autotunes every F, B, I and W program of every rank). When every
rank is one device, the sharding of every value on a rank is that device, so the
programs can be compiled ahead from shapes alone: `plan_programs` walks the plan with
abstract values (`jax.eval_shape` per task, once) and `compile_programs` compiles them
in parallel, one thread per rank (XLA releases the GIL while it compiles, and each
rank's programs autotune on that rank's own device).

Ranks of several devices (DP, FSDP or TP inside a stage) need more: a value's sharding
on a rank is the one XLA chose for the program that made it (jit without out_shardings),
moved as the executor moves it (a send keeps the spec on the receiving rank's mesh, a
split is the executor's split program). There `plan_programs` records where each
argument's sharding comes from (`Origin`: a known sharding, or output i of another
program, then sends and splits), and `compile_programs` compiles in dataflow order: one
worker per rank takes, in plan order, the programs whose producers are compiled, reads
the producers' `output_shardings` and compiles. A pipeline's programs form short chains
(F of stage 0 -> F of stage 1 -> ... -> B of the last -> ...), so the ranks still
compile side by side most of the time.

`JAXPP_PRECOMPILE`: "1" (default) compiles ahead when every rank is one device, "all"
also for ranks of several devices (not yet the default: its time on a GPU is not
measured), "0" never.

A caller that wants to see a precompile while it runs (the benchmark prints its progress)
wraps the step in `watch(callback)`: `compile_programs` hands the callback a live
`Progress` when it starts and again when it ends, so the watcher can poll it from its own
thread (a single program may compile for minutes) without this module knowing who asks.
"""

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpp.runtime import _plan, _rank_mesh, _taskgraph

_ENV_PRECOMPILE = "JAXPP_PRECOMPILE"


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """Where a value's sharding comes from on a rank of several devices.

    Attributes:
        base: a known sharding (a step input as the executor places it), or
            `(n, i)`: output `i` of the plan's `n`-th Run.
        steps: what happened to it since, in order: `("send", mesh)` (moved to the rank
            of that mesh, spec kept), `("split", count, aval)` (the executor's split of
            `aval` into `count` microbatches; one of them).
    """

    base: object
    steps: tuple[tuple, ...] = ()

    @property
    def run(self) -> int | None:
        """The Run whose output this is, or None for a known sharding."""
        return None if isinstance(self.base, jax.sharding.Sharding) else self.base[0]

    def then(self, *step: object) -> "Origin":
        """This origin followed by one more step."""
        return Origin(self.base, (*self.steps, tuple(step)))


@dataclasses.dataclass(frozen=True, slots=True)
class Program:
    """One task program to compile: the task on a rank, with its argument types.

    `runs` (ranks of several devices only, else empty): each Run of it in the plan, as
    `(n, origins)`: the plan's `n`-th Run and where each of its arguments' sharding
    comes from. Its Runs may need more than one compiled variant (a loop accumulator
    starts replicated, from the init task, and continues as the loop task made it).
    """

    task: _taskgraph.Task
    rank: int
    args: tuple[jax.ShapeDtypeStruct, ...]
    runs: tuple[tuple[int, tuple[Origin, ...]], ...] = ()

    @property
    def key(self) -> tuple[str, int]:
        """(task name, rank), as the executor keys its compiled programs."""
        return (self.task.name, self.rank)


@dataclasses.dataclass(frozen=True, slots=True)
class RankStats:
    """What compiling ahead did (or has done so far) on one rank.

    Attributes:
        rank: the rank.
        programs: its programs compiled so far.
        total: its programs to compile.
        failed: its programs whose compile raised.
        seconds: time its thread has spent compiling them.
    """

    rank: int
    programs: int
    total: int
    failed: int = 0
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class PrecompileStats:
    """What compiling ahead did.

    Attributes:
        programs: task programs compiled ahead.
        failed: programs whose ahead-of-time compile raised (left to compile lazily).
        seconds: wall time of the whole precompile.
        threads: threads it used.
        ranks: per rank, sorted by rank.
        slowest: the slowest program so far, "task@rank" ("" before the first one).
        slowest_seconds: its compile time.
    """

    programs: int
    failed: int
    seconds: float
    threads: int
    ranks: tuple[RankStats, ...] = ()
    slowest: str = ""
    slowest_seconds: float = 0.0

    @property
    def total(self) -> int:
        """Programs to compile (compiled, failed, and not reached yet)."""
        return sum(r.total for r in self.ranks)


class Progress:
    """The live state of one running `compile_programs`, safe to read from any thread.

    Example:
        >>> progress = Progress({0: 2, 1: 1}, threads=2)
        >>> progress.finish_program(0, "F0", 1.5, ok=True)
        >>> stats = progress.stats()
        >>> stats.programs, stats.total, stats.slowest, progress.finished
        (1, 3, 'F0@0', False)
    """

    def __init__(self, totals: Mapping[int, int], *, threads: int) -> None:
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._ended: float | None = None
        self._threads = threads
        self._ranks = {r: RankStats(r, 0, n) for r, n in sorted(totals.items())}
        self._slowest = ("", 0.0)

    @property
    def finished(self) -> bool:
        """Whether every program was compiled (or failed)."""
        return self._ended is not None

    def finish_program(self, rank: int, name: str, seconds: float, *, ok: bool) -> None:
        """Counts one program of `rank` that took `seconds` (compiled if `ok`)."""
        with self._lock:
            r = self._ranks[rank]
            self._ranks[rank] = dataclasses.replace(
                r,
                programs=r.programs + ok,
                failed=r.failed + (not ok),
                seconds=r.seconds + seconds,
            )
            if seconds > self._slowest[1]:
                self._slowest = (f"{name}@{rank}", seconds)

    def add(self, rank: int) -> None:
        """Counts one more program to compile on `rank` (a variant found on the way)."""
        with self._lock:
            r = self._ranks[rank]
            self._ranks[rank] = dataclasses.replace(r, total=r.total + 1)

    def end(self) -> None:
        """Marks the precompile finished (its wall time stops)."""
        with self._lock:
            self._ended = time.perf_counter()

    def stats(self) -> PrecompileStats:
        """A snapshot: counts so far, wall time so far (or in all, once finished)."""
        with self._lock:
            ranks = tuple(self._ranks.values())
            ended = self._ended if self._ended is not None else time.perf_counter()
            return PrecompileStats(
                programs=sum(r.programs for r in ranks),
                failed=sum(r.failed for r in ranks),
                seconds=ended - self._started,
                threads=self._threads,
                ranks=ranks,
                slowest=self._slowest[0],
                slowest_seconds=self._slowest[1],
            )


# Who watches the precompiles of the current context (`watch`); None: nobody.
_WATCHER: contextvars.ContextVar[Callable[[Progress], None] | None] = contextvars.ContextVar(
    "jaxpp_precompile_watcher", default=None
)


@contextlib.contextmanager
def watch(callback: Callable[[Progress], None]) -> Iterator[None]:
    """Calls `callback(progress)` when a precompile in this context starts and ends.

    The callback runs in the thread that runs the step, and gets the same live `Progress`
    both times (`progress.finished` tells which); it may poll it from another thread.

    Example:
        >>> seen = []
        >>> with watch(lambda progress: seen.append(progress.finished)):
        ...     _, stats = compile_programs([], lambda task, rank: None)
        >>> seen, stats.programs
        ([False, True], 0)
    """
    token = _WATCHER.set(callback)
    try:
        yield
    finally:
        _WATCHER.reset(token)


def enabled(rank_meshes: Sequence[Mesh]) -> bool:
    """Whether to compile ahead: `JAXPP_PRECOMPILE` "1" (the default) and every rank one
    device, or "all"; never for "0".

    Example:
        >>> import numpy as np
        >>> enabled([Mesh(np.array(jax.devices()[:1]), ("m",))]) in (True, False)
        True
    """
    text = os.environ.get(_ENV_PRECOMPILE, "1").strip()
    if text not in ("0", "1", "all"):
        raise ValueError(
            f"{_ENV_PRECOMPILE}={text!r}: expected 1 (compile ahead when every rank is one "
            f"device), all (also ranks of several devices) or 0 (lazily)."
        )
    if text == "all":
        return True
    return text == "1" and all(m.devices.size == 1 for m in rank_meshes)


def plan_programs(
    tasks: Mapping[str, _taskgraph.Task],
    plan: _plan.Plan,
    given: Mapping[str, object],
    rank_meshes: Sequence[Mesh],
    runs_on: Callable[[int], bool],
    *,
    input_specs: Mapping[str, PartitionSpec] | None = None,
) -> list[Program]:
    """Every distinct (task, rank) program the plan runs here, with argument types.

    `tasks` maps task names to tasks. Walks the plan with abstract values: step inputs
    and constants from `given`, task outputs from `jax.eval_shape` (once per task and
    rank), sends keep their type, splits drop axis 0. On a one-device rank every sharding
    is that device; on a rank of several devices each Run's arguments get their
    `Origin`: a step input where the executor places it (its `input_specs` entry, else
    the spec it has, on the rank's mesh), anything else from the Run that made it.
    """
    specs = dict(input_specs or {})
    env: dict[_plan.Buffer, tuple[jax.ShapeDtypeStruct, Origin]] = {}
    for name, ranks in plan.input_ranks.items():
        value = given[name]
        aval = _abstract(value)
        for r in ranks:
            placed = _placed(value, rank_meshes[r], specs.get(name))
            env[_plan.Buffer(name, None, r)] = (aval, Origin(placed))
    outputs_of: dict[tuple[str, int], tuple] = {}
    found: dict[tuple[str, int], tuple[_taskgraph.Task, list, list]] = {}
    index = jax.ShapeDtypeStruct((), jax.numpy.int32)
    runs = 0
    for ins in plan.instructions:
        if isinstance(ins, _plan.Run):
            task = tasks[ins.task]
            key = (task.name, ins.rank)
            mesh = rank_meshes[ins.rank]
            args = [env[b][0] for b in ins.inputs]
            origins = [env[b][1] for b in ins.inputs]
            if _taskgraph.MICROBATCH_INDEX in task.inputs:
                args.append(index)
                origins.append(Origin(NamedSharding(mesh, PartitionSpec())))
            outs = outputs_of.get(key)
            if outs is None:
                outs = tuple(jax.eval_shape(task.fn, *args))
                outputs_of[key] = outs
                if runs_on(ins.rank):
                    found[key] = (task, args, [])
            if key in found:
                found[key][2].append((runs, tuple(origins)))
            for i, (b, aval) in enumerate(zip(ins.outputs, outs, strict=True)):
                env[b] = (_abstract(aval), Origin((runs, i)))
            runs += 1
        elif isinstance(ins, _plan.Send):
            aval, origin = env[ins.source]
            env[ins.target] = (aval, origin.then("send", rank_meshes[ins.dst]))
        elif isinstance(ins, _plan.Split):
            whole, origin = env[ins.source]
            part = jax.ShapeDtypeStruct(whole.shape[1:], whole.dtype, weak_type=whole.weak_type)
            for b in ins.outputs:
                env[b] = (part, origin.then("split", ins.num_microbatches, whole))
    programs = []
    for (task, rank), (task, args, instances) in found.items():
        mesh = rank_meshes[rank]
        if mesh.devices.size == 1:  # every value on the rank lives on its one device
            sharding = NamedSharding(mesh, PartitionSpec())
            programs.append(Program(task, rank, tuple(_on(a, sharding) for a in args)))
        else:
            programs.append(Program(task, rank, tuple(args), tuple(instances)))
    return programs


def compile_programs(
    programs: Sequence[Program], make_jit: Callable[[_taskgraph.Task, int], Callable]
) -> tuple[dict[tuple[str, int], object], PrecompileStats]:
    """Compiles `programs`, ranks in parallel; returns {(task name, rank): compiled}.

    `make_jit(task, rank)` gives the `jax.jit` the executor would call. A program whose
    compile raises is left out (the step compiles it lazily and raises there if it must),
    and so are the Runs that need its output shardings. Programs with `runs` (ranks of
    several devices) compile in dataflow order (module docstring); one whose Runs need
    several variants is returned as a `Variants`.
    """
    by_rank: dict[int, list[Program]] = {}
    for p in programs:
        by_rank.setdefault(p.rank, []).append(p)
    threads = max(1, min(len(by_rank), os.cpu_count() or 1))
    progress = Progress({r: len(mine) for r, mine in by_rank.items()}, threads=threads)
    watcher = _WATCHER.get()
    if watcher is not None:
        watcher(progress)

    def compile_one(p: Program, args: Sequence[jax.ShapeDtypeStruct], *, make_jit=make_jit):
        started = time.perf_counter()
        try:
            compiled = make_jit(p.task, p.rank).lower(*args).compile()
        except Exception:  # noqa: BLE001  (the lazy path reports it with its context)
            compiled = None
        seconds = time.perf_counter() - started
        progress.finish_program(p.rank, p.task.name, seconds, ok=compiled is not None)
        return compiled

    compiled: dict[tuple[str, int], object] = {}
    if any(p.runs for p in programs):
        compiled, by_run = _compile_in_dataflow_order(programs, by_rank, compile_one, progress)
        compiled.update(_accumulators_in_place(programs, compiled, by_run, compile_one, progress))
    else:

        def compile_rank(mine: list[Program]) -> list[tuple[tuple[str, int], object]]:
            done = [(p.key, compile_one(p, p.args)) for p in mine]
            return [(k, c) for k, c in done if c is not None]

        with concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="jaxpp-compile"
        ) as pool:
            for done in pool.map(compile_rank, by_rank.values()):
                compiled.update(done)
    progress.end()
    if watcher is not None:
        watcher(progress)
    return compiled, progress.stats()


class Variants:
    """Compiled variants of one task program, for arguments sharded differently; a call
    runs the one compiled for its arguments' shardings (a `ValueError` if none was).

    The variants differ only at a few argument positions (e.g. a loop accumulator:
    replicated from the init task in the first microbatch, as the loop task left it
    after); only those are compared.
    """

    def __init__(self, compiled: Sequence[object]) -> None:
        self.compiled = tuple(compiled)
        shardings = [tuple(c.input_shardings[0]) for c in self.compiled]
        self._where = tuple(
            i for i in range(len(shardings[0])) if len({s[i] for s in shardings}) > 1
        )
        self._keys = [tuple(s[i] for i in self._where) for s in shardings]

    def __call__(self, *args):
        got = tuple(getattr(args[i], "sharding", None) for i in self._where)
        for key, compiled in zip(self._keys, self.compiled, strict=True):
            if key == got:
                return compiled(*args)
        for compiled in self.compiled:  # equivalent shardings written differently
            try:
                return compiled(*args)
            except (TypeError, ValueError):
                continue
        raise ValueError(
            f"no compiled variant for argument shardings {got} at positions {self._where}; "
            f"compiled for {self._keys}."
        )


def _compile_in_dataflow_order(
    programs: Sequence[Program],
    by_rank: Mapping[int, list[Program]],
    compile_one: Callable[[Program, Sequence[jax.ShapeDtypeStruct]], object],
    progress: Progress,
) -> tuple[dict[tuple[str, int], object], dict[int, object]]:
    """Resolves every Run's argument shardings once the Runs it reads from have their
    compiled variant, and compiles each new (program, shardings) variant on its rank's
    worker, earliest in plan order first."""
    pending = sorted(((n, p, o) for p in programs for n, o in p.runs), key=lambda x: x[0])
    ours = {n for n, _, _ in pending}
    of_run: dict[int, concurrent.futures.Future] = {}
    variants: dict[tuple[str, int], dict[tuple, concurrent.futures.Future]] = {}
    uses: dict[concurrent.futures.Future, int] = {}
    queues = {r: queue.PriorityQueue() for r in by_rank}
    splits: dict[tuple, object] = {}
    failed: concurrent.futures.Future = concurrent.futures.Future()
    failed.set_result(None)
    submitted = 0

    def worker(rank: int) -> None:
        while True:
            _, _, item = queues[rank].get()
            if item is None:
                return
            p, args, future = item
            try:
                future.set_result(compile_one(p, args))
            except BaseException:  # never leave the coordinator waiting on it
                future.set_result(None)
                raise

    with concurrent.futures.ThreadPoolExecutor(
        len(by_rank), thread_name_prefix="jaxpp-compile"
    ) as pool:
        workers = [pool.submit(worker, r) for r in by_rank]
        try:
            while pending:
                waiting = []
                for n, p, origins in pending:
                    needed = [o.run for o in origins if o.run is not None and o.run in ours]
                    if any(d not in of_run or not of_run[d].done() for d in needed):
                        waiting.append((n, p, origins))
                        continue
                    try:
                        shardings = _resolve(origins, of_run, splits)
                    except Exception:  # noqa: BLE001  (left to the lazy path)
                        shardings = None
                    if shardings is None:
                        of_run[n] = failed
                        continue
                    mine = variants.setdefault(p.key, {})
                    future = mine.get(shardings)
                    if future is None:
                        future = concurrent.futures.Future()
                        mine[shardings] = future
                        if len(mine) > 1:
                            progress.add(p.rank)
                        args = [_on(a, s) for a, s in zip(p.args, shardings, strict=True)]
                        queues[p.rank].put((n, submitted, (p, args, future)))
                        submitted += 1
                    uses[future] = uses.get(future, 0) + 1
                    of_run[n] = future
                if len(waiting) == len(pending):
                    running = [f for f in uses if not f.done()]
                    assert running, "bug in jaxpp: precompile waits on no compile"
                    concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
                pending = waiting
        finally:
            for r in by_rank:
                queues[r].put((float("inf"), submitted, None))
            for w in workers:
                w.result()
    compiled = {}
    for key, mine in variants.items():
        done = sorted(
            ((uses[f], f.result()) for f in mine.values() if f.result() is not None),
            key=lambda x: -x[0],
        )
        if len(done) == 1:
            compiled[key] = done[0][1]
        elif done:
            compiled[key] = Variants([c for _, c in done])
    return compiled, {n: f.result() for n, f in of_run.items()}


def _accumulators_in_place(
    programs: Sequence[Program],
    compiled: Mapping[tuple[str, int], object],
    by_run: Mapping[int, object],
    compile_one: Callable[..., object],
    progress: Progress,
) -> dict[tuple[str, int], object]:
    """Init tasks (no inputs: the accumulators' zeros) recompiled to make each
    accumulator with the sharding its loop task keeps it in (the output sharding of the
    first task that reads it, for the same value name), where that is not replicated.

    The executor's init task makes them replicated on the rank; the loop task's first
    microbatch then held the whole stage's float32 gradients per device (DP: `data`
    copies) beside its sharded output, and ran a variant compiled for it alone. Only
    where the reader has a variant compiled for the placed sharding (its later
    microbatches), so no call misses.
    """
    readers: dict[tuple[int, int], tuple[Program, int, int]] = {}
    for p in programs:
        for n, origins in p.runs:
            for j, o in enumerate(origins):
                if o.run is not None and not o.steps:
                    readers.setdefault(o.base, (p, n, j))
    out: dict[tuple[str, int], object] = {}
    for p in programs:
        if p.task.inputs or not p.runs:
            continue
        n = p.runs[0][0]
        shardings, moved = [], False
        for i, name in enumerate(p.task.outputs):
            sharding = None
            reader = readers.get((n, i))
            if reader is not None:
                user, m, j = reader
                first = by_run.get(m)
                if first is not None and user.task.inputs[j] == name:
                    if name in user.task.outputs:
                        k = user.task.outputs.index(name)
                        sharding = jax.tree.leaves(first.output_shardings)[k]
                if sharding is not None:
                    have = compiled.get(user.key)
                    have = have.compiled if isinstance(have, Variants) else (have,)
                    if not any(c is not None and c.input_shardings[0][j] == sharding for c in have):
                        sharding = None
            shardings.append(sharding)
            moved = moved or (sharding is not None and not sharding.is_fully_replicated)
        if not moved:
            continue
        mesh = next(s for s in shardings if s is not None).mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        placed = tuple(replicated if s is None else s for s in shardings)

        def make_jit(task, rank, placed=placed, mesh=mesh):
            return jax.jit(_rank_mesh.on_rank(task.fn, rank, mesh), out_shardings=placed)

        progress.add(p.rank)
        made = compile_one(dataclasses.replace(p, runs=()), (), make_jit=make_jit)
        if made is not None:
            out[p.key] = made
    return out


def _resolve(
    origins: Sequence[Origin], of_run: Mapping[int, concurrent.futures.Future], splits: dict
) -> tuple | None:
    """A Run's argument shardings, or None where a Run it reads from has no compiled
    program (its compile failed, or another process runs it)."""
    shardings = []
    for origin in origins:
        if origin.run is None:
            sharding = origin.base
        else:
            future = of_run.get(origin.run)
            compiled = None if future is None else future.result()
            if compiled is None:
                return None
            sharding = jax.tree.leaves(compiled.output_shardings)[origin.base[1]]
        for step in origin.steps:
            if step[0] == "send":
                sharding = _moved(sharding, step[1])
            else:
                sharding = _split_sharding(step[1], step[2], sharding, splits)
        shardings.append(sharding)
    return tuple(shardings)


def _placed(value, mesh: Mesh, spec: PartitionSpec | None) -> NamedSharding:
    """Where the executor places a step input on `mesh` (`LocalExecutor._sharding_on`)."""
    if spec is not None:
        return NamedSharding(mesh, spec)
    return _moved(getattr(value, "sharding", None), mesh)


def _moved(sharding, mesh: Mesh) -> NamedSharding:
    """A value of `sharding` after the executor moves it to `mesh`: the same spec where
    its axes exist there, else replicated."""
    spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
    for axis in spec:
        names = axis if isinstance(axis, tuple) else (axis,)
        if axis is not None and not all(n in mesh.axis_names for n in names):
            spec = PartitionSpec()
            break
    return NamedSharding(mesh, spec)


def _split_sharding(count: int, whole: jax.ShapeDtypeStruct, sharding, cache: dict):
    """The sharding of one microbatch after the executor's split (`LocalExecutor._split`:
    a jit of `tuple(a[i] for i in range(count))`, compiled here for its shardings)."""
    key = (count, whole.shape, whole.dtype, sharding)
    if key not in cache:
        split = jax.jit(lambda a: tuple(a[i] for i in range(count)))
        compiled = split.lower(_on(whole, sharding)).compile()
        cache[key] = compiled.output_shardings[0]
    return cache[key]


def _abstract(x) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _on(aval: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding, weak_type=aval.weak_type)
