"""Compiling a step's task programs before its first run, one thread per rank.

Run lazily, each task program compiles the first time the step reaches it, one after
the other, on the critical path of the first step: with large stages that is minutes
(XLA:GPU compiles and autotunes every F, B, I and W program of every rank). When every
rank is one device, the sharding of every value on a rank is that device, so the
programs can be compiled ahead from shapes alone: `plan_programs` walks the plan with
abstract values (`jax.eval_shape` per task, once) and `compile_programs` compiles them
in parallel, one thread per rank (XLA releases the GIL while it compiles, and each
rank's programs autotune on that rank's own device).

`JAXPP_PRECOMPILE=0` turns it off.

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
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpp.runtime import _plan, _taskgraph

_ENV_PRECOMPILE = "JAXPP_PRECOMPILE"


@dataclasses.dataclass(frozen=True, slots=True)
class Program:
    """One task program to compile: the task on a rank, with its argument types."""

    task: _taskgraph.Task
    rank: int
    args: tuple[jax.ShapeDtypeStruct, ...]


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
    """Whether to compile ahead: every rank one device, and `JAXPP_PRECOMPILE` not "0".

    Example:
        >>> import numpy as np
        >>> enabled([Mesh(np.array(jax.devices()[:1]), ("m",))]) in (True, False)
        True
    """
    text = os.environ.get(_ENV_PRECOMPILE, "1").strip()
    if text not in ("0", "1"):
        raise ValueError(f"{_ENV_PRECOMPILE}={text!r}: expected 1 (compile ahead) or 0 (lazily).")
    return text == "1" and all(m.devices.size == 1 for m in rank_meshes)


def plan_programs(
    tasks: Mapping[str, _taskgraph.Task],
    plan: _plan.Plan,
    given: Mapping[str, object],
    rank_meshes: Sequence[Mesh],
    runs_on: Callable[[int], bool],
) -> list[Program]:
    """Every distinct (task, rank) program the plan runs here, with argument types.

    `tasks` maps task names to tasks. Walks the plan with abstract values: step inputs
    and constants from `given`, task outputs from `jax.eval_shape` (once per task and
    rank), sends keep their type, splits drop axis 0. Only for one-device ranks (all
    shardings are that device).
    """
    env: dict[_plan.Buffer, jax.ShapeDtypeStruct] = {}
    for name, ranks in plan.input_ranks.items():
        aval = _abstract(given[name])
        for r in ranks:
            env[_plan.Buffer(name, None, r)] = aval
    outputs_of: dict[tuple[str, int], tuple] = {}
    programs: list[Program] = []
    index = jax.ShapeDtypeStruct((), jax.numpy.int32)
    for ins in plan.instructions:
        if isinstance(ins, _plan.Run):
            task = tasks[ins.task]
            key = (task.name, ins.rank)
            outs = outputs_of.get(key)
            if outs is None:
                args = [env[b] for b in ins.inputs]
                if _taskgraph.MICROBATCH_INDEX in task.inputs:
                    args.append(index)
                outs = tuple(jax.eval_shape(task.fn, *args))
                outputs_of[key] = outs
                if runs_on(ins.rank):
                    sharding = NamedSharding(rank_meshes[ins.rank], PartitionSpec())
                    placed = tuple(_on(a, sharding) for a in args)
                    programs.append(Program(task, ins.rank, placed))
            for b, aval in zip(ins.outputs, outs, strict=True):
                env[b] = _abstract(aval)
        elif isinstance(ins, _plan.Send):
            env[ins.target] = env[ins.source]
        elif isinstance(ins, _plan.Split):
            whole = env[ins.source]
            part = jax.ShapeDtypeStruct(whole.shape[1:], whole.dtype, weak_type=whole.weak_type)
            for b in ins.outputs:
                env[b] = part
    return programs


def compile_programs(
    programs: Sequence[Program], make_jit: Callable[[_taskgraph.Task, int], Callable]
) -> tuple[dict[tuple[str, int], object], PrecompileStats]:
    """Compiles `programs`, ranks in parallel; returns {(task name, rank): compiled}.

    `make_jit(task, rank)` gives the `jax.jit` the executor would call. A program whose
    compile raises is left out (the step compiles it lazily and raises there if it must).
    """
    by_rank: dict[int, list[Program]] = {}
    for p in programs:
        by_rank.setdefault(p.rank, []).append(p)
    threads = max(1, min(len(by_rank), os.cpu_count() or 1))
    progress = Progress({r: len(mine) for r, mine in by_rank.items()}, threads=threads)
    watcher = _WATCHER.get()
    if watcher is not None:
        watcher(progress)

    def compile_rank(mine: list[Program]) -> list[tuple[tuple[str, int], object]]:
        done = []
        for p in mine:
            started = time.perf_counter()
            try:
                compiled = make_jit(p.task, p.rank).lower(*p.args).compile()
            except Exception:  # noqa: BLE001  (the lazy path reports it with its context)
                compiled = None
            seconds = time.perf_counter() - started
            progress.finish_program(p.rank, p.task.name, seconds, ok=compiled is not None)
            if compiled is not None:
                done.append(((p.task.name, p.rank), compiled))
        return done

    compiled: dict[tuple[str, int], object] = {}
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxpp-compile") as pool:
        for done in pool.map(compile_rank, by_rank.values()):
            compiled.update(done)
    progress.end()
    if watcher is not None:
        watcher(progress)
    return compiled, progress.stats()


def _abstract(x) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _on(aval: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding, weak_type=aval.weak_type)
