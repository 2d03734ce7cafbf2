"""Lowering a TaskGraph and a Schedule to a Plan: per-rank instruction streams.

The plan is data: printable and testable without devices. Executors only follow it.
Loop tasks run in the simulator's order (`schedules.simulate(...).order`, the one
place that orders actions); transfers are inferred from dataflow, any rank to any
rank, and issued right after the producing instruction; every buffer is freed
after its last use.
"""

import dataclasses
from collections.abc import Mapping

from jaxpp import schedules
from jaxpp.runtime import _taskgraph


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Buffer:
    """One value on one rank; `mb` is None for values that are not per microbatch.

    Example:
        >>> str(Buffer("v3", 2, 1)), str(Buffer("acc0", None, 0))
        ('v3[2]@r1', 'acc0@r0')
    """

    value: str
    mb: int | None
    rank: int

    def __str__(self) -> str:
        mb = "" if self.mb is None else f"[{self.mb}]"
        return f"{self.value}{mb}@r{self.rank}"

    def on(self, rank: int) -> "Buffer":
        return dataclasses.replace(self, rank=rank)


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """Run a task on a rank (for loop tasks, on microbatch `mb`)."""

    rank: int
    task: str
    mb: int | None
    inputs: tuple[Buffer, ...]
    outputs: tuple[Buffer, ...]

    def __str__(self) -> str:
        mb = "" if self.mb is None else f"[{self.mb}]"
        return f"RUN  {self.task}{mb}"


@dataclasses.dataclass(frozen=True, slots=True)
class Split:
    """Slice a global value along axis 0 into per-microbatch buffers on a rank."""

    rank: int
    source: Buffer
    per_mb: str
    num_microbatches: int

    @property
    def outputs(self) -> tuple[Buffer, ...]:
        return tuple(Buffer(self.per_mb, mb, self.rank) for mb in range(self.num_microbatches))

    def __str__(self) -> str:
        return f"SPLIT {self.source.value} -> {self.per_mb}[0..{self.num_microbatches - 1}]"


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Copy a buffer to another rank (resharding it for the receiver's stage)."""

    source: Buffer
    dst: int

    @property
    def target(self) -> Buffer:
        return self.source.on(self.dst)

    def __str__(self) -> str:
        return f"SEND {self.source} -> r{self.dst}"


@dataclasses.dataclass(frozen=True, slots=True)
class Free:
    """Drop a buffer after its last use."""

    buffer: Buffer

    def __str__(self) -> str:
        return f"FREE {self.buffer}"


Instruction = Run | Split | Send | Free


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """Instructions in one global order, which every rank's stream follows.

    Attributes:
        num_ranks: ranks (stage groups of devices).
        instructions: the global order.
        input_ranks: for each step input or constant, the ranks that read it.
        outputs: for each step output, the buffer that holds it (None: it is the
            step input or constant of the same name, returned as is).
        activations: the buffers that hold activations kept from one pass of a
            (stage, microbatch) to a later pass of it, with that pair.
        schedule: the concrete schedule.
        simulation: its simulation (the order used).
    """

    num_ranks: int
    instructions: tuple[Instruction, ...]
    input_ranks: Mapping[str, tuple[int, ...]]
    outputs: tuple[tuple[str, Buffer | None], ...]
    activations: Mapping[Buffer, tuple[int, int]]
    schedule: schedules.Schedule
    simulation: schedules.Simulation

    def for_rank(self, rank: int) -> tuple[str, ...]:
        """The instruction stream of one rank, as text (a Send shows as SEND/RECV)."""
        lines = []
        for ins in self.instructions:
            if isinstance(ins, Send):
                if ins.source.rank == rank:
                    lines.append(str(ins))
                elif ins.dst == rank:
                    lines.append(f"RECV {ins.source} -> r{rank}")
            elif isinstance(ins, Free):
                if ins.buffer.rank == rank:
                    lines.append(str(ins))
            elif ins.rank == rank:
                lines.append(str(ins))
        return tuple(lines)

    def __str__(self) -> str:
        parts = []
        for r in range(self.num_ranks):
            parts.append(f"rank {r}:")
            parts.extend(f"  {line}" for line in self.for_rank(r))
        return "\n".join(parts)


def lower(
    graph: _taskgraph.TaskGraph,
    schedule: schedules.Schedule,
    *,
    costs: schedules.Costs | None = None,
) -> Plan:
    """Lowers a task graph with a concrete schedule to a Plan.

    Args:
        graph: the compiled step.
        schedule: a concrete schedule with the graph's stage and microbatch counts.
        costs: per-kind costs for the simulator (the order of the loop).

    Raises:
        ValueError: if the schedule does not fit the graph.
    """
    _check_fits(graph, schedule)
    simulation = schedules.simulate(schedule, costs)
    placement = schedule.placement
    runs: list[Instruction] = []
    loop_values = graph.loop_values
    micro = {m.per_mb: m for m in graph.microbatch_inputs}

    def buffer(name: str, mb: int | None, rank: int) -> Buffer:
        return Buffer(name, mb if name in loop_values else None, rank)

    for task in graph.pre_tasks:
        if task.num_equations:
            runs.append(_run(task, task.rank, None, buffer))
    # Microbatch slices, on every rank whose loop tasks read them.
    for m in graph.microbatch_inputs:
        ranks = sorted(
            {placement[t.stage] for t in graph.loop_tasks.values() if m.per_mb in t.inputs}
        )
        for r in ranks:
            runs.append(Split(r, Buffer(m.value, None, r), m.per_mb, graph.num_microbatches))
    for rank, action in simulation.order:
        task = graph.loop_tasks.get((action.stage, action.kind))
        if task is None:
            raise ValueError(
                f"the schedule runs {action} but the compiled step has no "
                f"{action.kind.name} task for stage {action.stage}. Fix: use a schedule whose "
                f"backward kind matches (B, or I and W)."
            )
        if task.num_equations:
            runs.append(_run(task, rank, action.mb, buffer))
    for task in graph.post_tasks:
        if task.num_equations:
            runs.append(_run(task, task.rank, None, buffer))

    instructions, input_ranks = _insert_sends(runs, graph, micro)
    outputs = _output_buffers(graph, instructions)
    keep = {b for _, b in outputs if b is not None}
    instructions = _insert_frees(instructions, keep)
    return Plan(
        num_ranks=max(placement) + 1,
        instructions=tuple(instructions),
        input_ranks=input_ranks,
        outputs=outputs,
        activations=_activations(instructions, graph),
        schedule=schedule,
        simulation=simulation,
    )


def _check_fits(graph: _taskgraph.TaskGraph, schedule: schedules.Schedule) -> None:
    if schedule.num_stages != graph.num_stages:
        raise ValueError(
            f"the schedule has {schedule.num_stages} stages but the step marks "
            f"{graph.num_stages} (mark_stage_end calls). Fix: build the schedule with "
            f"num_stages={graph.num_stages} or change the markers."
        )
    if schedule.num_microbatches != graph.num_microbatches:
        raise ValueError(
            f"the schedule has {schedule.num_microbatches} microbatches but the loop runs "
            f"{graph.num_microbatches}. Fix: build it with "
            f"num_microbatches={graph.num_microbatches}."
        )
    if schedule.uses_split_backward and not graph.uses_split_backward:
        raise ValueError(
            "the schedule splits the backward into I and W but the step was compiled without "
            "the split. Fix: compile the step with the same schedule."
        )


def _run(task: _taskgraph.Task, rank: int, mb: int | None, buffer) -> Run:
    inputs = tuple(
        buffer(name, mb, rank) for name in task.inputs if name != _taskgraph.MICROBATCH_INDEX
    )
    outputs = tuple(buffer(name, mb, rank) for name in task.outputs)
    return Run(rank, task.name, mb, inputs, outputs)


def _reads(ins: Instruction) -> tuple[Buffer, ...]:
    if isinstance(ins, Run):
        return ins.inputs
    if isinstance(ins, Split):
        return (ins.source,)
    if isinstance(ins, Send):
        return (ins.source,)
    return ()


def _writes(ins: Instruction) -> tuple[Buffer, ...]:
    if isinstance(ins, Run | Split):
        return ins.outputs
    if isinstance(ins, Send):
        return (ins.target,)
    return ()


def _insert_sends(runs, graph, micro):
    """Adds a Send right after the producer for every read on another rank."""
    external = set(graph.step_inputs) | set(graph.constants)
    producer: dict[tuple[str, int | None], tuple[int, int]] = {}  # key -> (index, rank)
    delivered: dict[tuple[str, int | None], set[int]] = {}
    sends_after: dict[int, list[Send]] = {}
    input_ranks: dict[str, set[int]] = {}
    for index, ins in enumerate(runs):
        for b in _reads(ins):
            key = (b.value, b.mb)
            if key not in producer:
                if b.value in external and b.mb is None:
                    input_ranks.setdefault(b.value, set()).add(b.rank)
                    continue
                raise AssertionError(f"bug in jaxpp: {b} is read before any task writes it")
            where, src = producer[key]
            if b.rank not in delivered[key]:
                sends_after.setdefault(where, []).append(Send(Buffer(b.value, b.mb, src), b.rank))
                delivered[key].add(b.rank)
        reads = {(b.value, b.mb) for b in _reads(ins)}
        for b in _writes(ins):
            key = (b.value, b.mb)
            if key in producer and key not in reads:
                # The same value computed again on another rank (code before the loop
                # runs on every rank that needs it): that rank has it now too.
                delivered[key].add(b.rank)
                continue
            producer[key] = (index, b.rank)  # a new value, or a new version (accumulator)
            delivered[key] = {b.rank}
    out: list[Instruction] = []
    for index, ins in enumerate(runs):
        out.append(ins)
        out.extend(sends_after.get(index, ()))
    return out, {k: tuple(sorted(v)) for k, v in sorted(input_ranks.items())}


def _output_buffers(graph, instructions) -> tuple[tuple[str, Buffer | None], ...]:
    first_written: dict[str, Buffer] = {}
    for ins in instructions:
        if isinstance(ins, Run):
            for b in ins.outputs:
                if b.mb is None and b.value not in first_written:
                    first_written[b.value] = b
    outputs = []
    for name in graph.step_outputs:
        if name in first_written:
            outputs.append((name, first_written[name]))
        elif name in graph.step_inputs or name in graph.constants:
            outputs.append((name, None))
        else:
            raise AssertionError(f"bug in jaxpp: step output {name} is never computed")
    return tuple(outputs)


def _insert_frees(instructions, keep: set[Buffer]) -> list[Instruction]:
    last_use: dict[Buffer, int] = {}
    for index, ins in enumerate(instructions):
        for b in (*_reads(ins), *_writes(ins)):
            last_use[b] = index
    frees_after: dict[int, list[Buffer]] = {}
    for b, index in last_use.items():
        if b not in keep:
            frees_after.setdefault(index, []).append(b)
    out: list[Instruction] = []
    for index, ins in enumerate(instructions):
        out.append(ins)
        out.extend(Free(b) for b in sorted(frees_after.get(index, ())))
    return out


def _activations(instructions, graph) -> dict[Buffer, tuple[int, int]]:
    """Buffers a loop pass of (stage, mb) writes and a later pass of the same pair reads."""
    stage_of_task = {t.name: t.stage for t in graph.loop_tasks.values()}
    written_by: dict[Buffer, tuple[int, int, str]] = {}
    result: dict[Buffer, tuple[int, int]] = {}
    for ins in instructions:
        if not isinstance(ins, Run) or ins.task not in stage_of_task:
            continue
        pair = (stage_of_task[ins.task], ins.mb)
        for b in ins.inputs:
            w = written_by.get(b)
            if w is not None and w[:2] == pair and w[2] != ins.task:
                result[b] = pair
        for b in ins.outputs:
            if b.mb is not None:
                written_by[b] = (*pair, ins.task)
    return result
