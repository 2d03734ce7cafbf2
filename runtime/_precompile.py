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
"""

import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence

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
class PrecompileStats:
    """What compiling ahead did.

    Attributes:
        programs: task programs compiled ahead.
        failed: programs whose ahead-of-time compile raised (left to compile lazily).
        seconds: wall time of the whole precompile.
        threads: threads it used.
    """

    programs: int
    failed: int
    seconds: float
    threads: int


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
    started = time.perf_counter()
    by_rank: dict[int, list[Program]] = {}
    for p in programs:
        by_rank.setdefault(p.rank, []).append(p)

    def compile_rank(mine: list[Program]) -> list[tuple[tuple[str, int], object]]:
        done = []
        for p in mine:
            try:
                compiled = make_jit(p.task, p.rank).lower(*p.args).compile()
            except Exception:  # noqa: BLE001  (the lazy path reports it with its context)
                continue
            done.append(((p.task.name, p.rank), compiled))
        return done

    threads = max(1, min(len(by_rank), os.cpu_count() or 1))
    compiled: dict[tuple[str, int], object] = {}
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxpp-compile") as pool:
        for done in pool.map(compile_rank, by_rank.values()):
            compiled.update(done)
    stats = PrecompileStats(
        programs=len(compiled),
        failed=len(programs) - len(compiled),
        seconds=time.perf_counter() - started,
        threads=threads,
    )
    return compiled, stats


def _abstract(x) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _on(aval: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding, weak_type=aval.weak_type)
