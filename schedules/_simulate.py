"""The event-driven simulator: the one place that orders a schedule's actions in time."""

import dataclasses
import heapq
import math
import types
from collections import defaultdict
from collections.abc import Mapping, Sequence

from jaxpp.schedules import _deps, _ir

K = _ir.Kind
_DEFAULT_MEMORY = types.MappingProxyType(
    {K.FORWARD: 1.0, K.BACKWARD: -1.0, K.INPUT_GRAD: 0.0, K.WEIGHT_GRAD: -1.0}
)


@dataclasses.dataclass(frozen=True, slots=True)
class Costs:
    """Durations per pass, a transfer latency, and activation-memory deltas.

    Attributes:
        forward: duration of an `F`.
        backward: duration of a full backward `B`.
        input_grad: duration of an `I`.
        weight_grad: duration of a `W`.
        transfer: latency added on every dependency edge between different ranks.
        per_stage: optional `stage -> {kind: duration}` overrides (stored read-only).
        memory: activation delta per kind (default `F:+1, B:-1, I:0, W:-1`); kinds left
            out keep their default. Stored read-only.

    Example:
        >>> c = Costs(backward=3.0, per_stage={1: {"F": 2.0}})
        >>> c.duration(_ir.Action(1, "F", 0)), c.duration(_ir.Action(0, "B", 0))
        (2.0, 3.0)
    """

    forward: float = 1.0
    backward: float = 2.0
    input_grad: float = 1.0
    weight_grad: float = 1.0
    transfer: float = 0.0
    per_stage: Mapping[int, Mapping[K, float]] | None = None
    memory: Mapping[K, float] = dataclasses.field(default_factory=lambda: _DEFAULT_MEMORY)

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "input_grad", "weight_grad", "transfer"):
            _check_cost(name, getattr(self, name))
        if self.per_stage is not None:
            frozen = {}
            for stage, overrides in self.per_stage.items():
                frozen[stage] = types.MappingProxyType(
                    {
                        K(kind): _check_cost(f"per_stage[{stage}][{kind}]", value)
                        for kind, value in overrides.items()
                    }
                )
            object.__setattr__(self, "per_stage", types.MappingProxyType(frozen))
        memory = dict(_DEFAULT_MEMORY)
        memory.update({K(kind): float(value) for kind, value in self.memory.items()})
        object.__setattr__(self, "memory", types.MappingProxyType(memory))

    def __hash__(self) -> int:
        per_stage = None
        if self.per_stage is not None:
            per_stage = tuple(
                sorted((s, tuple(sorted(o.items()))) for s, o in self.per_stage.items())
            )
        return hash(
            (
                self.forward,
                self.backward,
                self.input_grad,
                self.weight_grad,
                self.transfer,
                per_stage,
                tuple(sorted(self.memory.items())),
            )
        )

    def duration(self, action: _ir.Action) -> float:
        """How long `action` takes under these costs."""
        if self.per_stage is not None:
            override = self.per_stage.get(action.stage)
            if override is not None and action.kind in override:
                return override[action.kind]
        return {
            K.FORWARD: self.forward,
            K.BACKWARD: self.backward,
            K.INPUT_GRAD: self.input_grad,
            K.WEIGHT_GRAD: self.weight_grad,
        }[action.kind]


def _check_cost(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"Costs {name}={value!r} must be a finite number >= 0.")
    return float(value)


@dataclasses.dataclass(frozen=True, slots=True)
class TimedAction:
    """An action placed in time by the simulator.

    Example:
        >>> TimedAction(0, _ir.parse_action("0F0"), 0.0, 1.0).end
        1.0
    """

    rank: int
    action: _ir.Action
    start: float
    end: float


@dataclasses.dataclass(frozen=True, slots=True)
class Simulation:
    """The result of `simulate`.

    Attributes:
        schedule: the simulated schedule.
        costs: the costs used.
        timeline: every action with its start and end, in the order the simulator started
            them (ascending start; ties broken by rank).
        makespan: end of the last action.
        bubble: idle fraction over all ranks, `1 - busy / (num_ranks * makespan)`.
        bubble_per_rank: idle fraction of each rank, `1 - busy[rank] / makespan`.
        peak_activations: per rank, the largest running sum of `costs.memory[kind]`.

    Example:
        >>> from jaxpp.schedules import Std1F1B
        >>> sim = simulate(Std1F1B(2).build(2))
        >>> sim.makespan, round(sim.bubble, 3), sim.peak_activations
        (9.0, 0.333, (2.0, 1.0))
    """

    schedule: _ir.Schedule
    costs: Costs
    timeline: tuple[TimedAction, ...]
    makespan: float
    bubble: float
    bubble_per_rank: tuple[float, ...]
    peak_activations: tuple[float, ...]

    @property
    def order(self) -> tuple[tuple[int, _ir.Action], ...]:
        """`(rank, action)` in the timeline's order: a topological order of the dependencies."""
        return tuple((t.rank, t.action) for t in self.timeline)


def simulate(schedule: _ir.Schedule, costs: Costs | None = None) -> Simulation:
    """Runs the schedule on an ideal machine: each rank in its list order, as early as deps allow.

    An action starts when its rank has finished the previous action and all its
    dependencies have ended (plus `costs.transfer` for each dependency on another rank).

    Args:
        schedule: the schedule; it is checked for completeness and placement first.
        costs: durations and memory deltas; default `Costs()` (F=1, B=2, I=W=1).

    Returns:
        The `Simulation`.

    Raises:
        ScheduleError: if the schedule is incomplete, misplaced, or deadlocks; a deadlock
            message marks each stuck action in the grid and says what it waits for.

    Example:
        >>> from jaxpp.schedules import GPipe
        >>> sim = simulate(GPipe(2).build(2))
        >>> [str(a) for _, a in sim.order]
        ['0F0', '0F1', '1F0', '1F1', '1B0', '0B0', '1B1', '0B1']
    """
    costs = Costs() if costs is None else costs
    runs = run_in_time(schedule, costs)
    rank_actions = schedule.actions
    timeline = [TimedAction(rank, rank_actions[rank][step], s, e) for rank, step, s, e in runs]
    makespan = max((t.end for t in timeline), default=0.0)
    busy = [0.0] * schedule.num_ranks
    for t in timeline:
        busy[t.rank] += t.end - t.start
    per_rank = tuple(1.0 - b / makespan if makespan > 0 else 0.0 for b in busy)
    bubble = 1.0 - sum(busy) / (schedule.num_ranks * makespan) if makespan > 0 else 0.0
    peaks = []
    for actions in rank_actions:
        level = peak = 0.0
        for action in actions:
            level += costs.memory[action.kind]
            peak = max(peak, level)
        peaks.append(peak)
    return Simulation(
        schedule=schedule,
        costs=costs,
        timeline=tuple(timeline),
        makespan=makespan,
        bubble=bubble,
        bubble_per_rank=per_rank,
        peak_activations=tuple(peaks),
    )


def run_in_time(
    schedule: _ir.Schedule,
    costs: Costs,
    *,
    transfer: Sequence[Sequence[float]] | None = None,
) -> list[tuple[int, int, float, float]]:
    """The list scheduler behind `simulate`: `(rank, step, start, end)` in start order.

    Args:
        schedule: the schedule.
        costs: durations; `costs.transfer` is added on every edge between ranks unless
            `transfer` is given.
        transfer: optional per-edge times, `transfer[a][b]` for a dependency from rank
            `a` to rank `b != a` (links of different speeds, e.g. across nodes).

    Raises:
        ScheduleError: incomplete, misplaced, or deadlocked schedules.
    """
    index = _deps.check_structure(schedule)
    placement, rank_actions = schedule.placement, schedule.actions
    rank_keys = [[(a.stage, a.kind, a.mb) for a in row] for row in rank_actions]
    heads = [0] * schedule.num_ranks
    free = [0.0] * schedule.num_ranks
    end: dict[_deps.Key, float] = {}
    waiting: dict[_deps.Key, list[int]] = defaultdict(list)
    ready: list[tuple[float, int]] = []
    uniform = costs.transfer

    def queue_head(rank: int) -> None:
        if heads[rank] == len(rank_keys[rank]):
            return
        start = free[rank]
        for need in index.needs[rank_keys[rank][heads[rank]]]:
            finish = end.get(need)
            if finish is None:
                waiting[need].append(rank)
                return
            source = placement[need[0]]
            if source != rank:
                finish += uniform if transfer is None else transfer[source][rank]
            if finish > start:
                start = finish
        heapq.heappush(ready, (start, rank))

    for rank in range(schedule.num_ranks):
        queue_head(rank)
    runs: list[tuple[int, int, float, float]] = []
    while ready:
        start, rank = heapq.heappop(ready)
        action = rank_actions[rank][heads[rank]]
        key = rank_keys[rank][heads[rank]]
        finish = start + costs.duration(action)
        runs.append((rank, heads[rank], start, finish))
        end[key] = finish
        free[rank] = finish
        heads[rank] += 1
        queue_head(rank)
        for waiter in waiting.pop(key, ()):
            queue_head(waiter)
    if len(runs) != len(index.where):
        raise _deadlock_error(schedule, index, heads, end)
    return runs


def _deadlock_error(
    schedule: _ir.Schedule,
    index: _deps.Index,
    heads: list[int],
    end: dict[_deps.Key, float],
) -> _ir.ScheduleError:
    marks: dict[tuple[int, int], str] = {}
    waits_on: dict[int, tuple[_ir.Action, _ir.Action, int, int]] = {}
    for rank, head in enumerate(heads):
        if head == len(schedule.actions[rank]):
            continue
        action = schedule.actions[rank][head]
        missing = [n for n in index.needs[_deps.key_of(action)] if n not in end]
        need = _ir.Action(*missing[0])
        need_rank, need_step = index.where[missing[0]]
        if need_rank == rank:
            marks[(rank, head)] = (
                f"{action} waits for {need}, later on this rank (step {need_step})"
            )
        else:
            marks[(rank, head)] = f"{action} waits for {need} (rank {need_rank} step {need_step})"
        waits_on[rank] = (action, need, need_rank, need_step)
    # The first stuck rank whose wait leads back to itself shows the problem best.
    for rank in sorted(waits_on):
        action, need, need_rank, need_step = waits_on[rank]
        if need_rank == rank:
            return _deps.error(
                schedule,
                marks,
                f"deadlock: rank {rank} step {heads[rank]}: {action} needs {need}, which rank "
                f"{rank} runs later (step {need_step}); a rank runs its actions in list order.",
                f"move {need} before {action} on rank {rank}.",
            )
    cycle = _find_cycle(waits_on)
    chain = ", ".join(
        f"rank {r} waits at step {heads[r]} ({waits_on[r][0]}) for {waits_on[r][1]} from rank "
        f"{waits_on[r][2]}"
        for r in cycle
    )
    first = cycle[0]
    action, need, need_rank, need_step = waits_on[first]
    blocker = schedule.actions[need_rank][heads[need_rank]]
    return _deps.error(
        schedule,
        marks,
        f"deadlock: no rank can run its next action ({chain}).",
        f"break the cycle by reordering one rank, e.g. on rank {need_rank} run {need} "
        f"(step {need_step}) before {blocker} (step {heads[need_rank]}), or on rank {first} "
        f"run {action} later.",
    )


def _find_cycle(waits_on: dict[int, tuple[_ir.Action, _ir.Action, int, int]]) -> list[int]:
    """A cycle in the rank wait-for graph (every stuck rank waits on another stuck rank)."""
    rank = min(waits_on)
    seen: list[int] = []
    while rank not in seen:
        seen.append(rank)
        rank = waits_on[rank][2]
    return seen[seen.index(rank) :]
