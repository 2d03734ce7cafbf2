"""Measured timelines: Chrome/Perfetto traces, measured costs, bubble.

A profiled step waits for every task (`LocalExecutor.run(record_timing=True)`), so
its per-task times are device time plus dispatch. Those times fed to
`schedules.simulate` predict what the schedule should take; the unprofiled step
time says what it did take.
"""

import dataclasses
import statistics
from collections.abc import Mapping

from jaxpp import schedules
from jaxpp.runtime import _local


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """What one profiled step measured.

    Attributes:
        timings: per-Run wall times of the profiled step.
        costs: per-stage median task times (seconds) as simulator costs.
        simulation: the schedule simulated with those costs.
        busy_seconds: per rank, the summed time of its loop tasks.
        outside_loop_seconds: time of the tasks before and after the loop (casts,
            accumulator set-up, the optimizer) on the rank where they take longest: the
            ranks run theirs side by side, so the step waits for the longest, not the sum.
    """

    timings: tuple[_local.TaskTiming, ...]
    costs: schedules.Costs
    simulation: schedules.Simulation
    busy_seconds: tuple[float, ...]
    outside_loop_seconds: float

    @property
    def predicted_step_seconds(self) -> float:
        """The simulator's makespan plus the code outside the loop."""
        return self.simulation.makespan + self.outside_loop_seconds

    def bubble(self, step_seconds: float) -> float:
        """Idle share of the ranks during a real step of `step_seconds`."""
        ranks = len(self.busy_seconds)
        return max(0.0, 1.0 - sum(self.busy_seconds) / (ranks * step_seconds))

    def chrome_trace(self) -> dict[str, object]:
        """The profiled step as a Chrome/Perfetto trace."""
        return schedules.to_chrome_trace(trace_events(self.timings), time_scale_us=1e6)


def trace_events(timings) -> list[tuple[int, str, float, float]]:
    """`(rank, name, start, end)` per task, the form `schedules.to_chrome_trace` takes.

    Example:
        >>> t = _local.TaskTiming(rank=1, name="s1/F", mb=0, start=0.0, end=0.5)
        >>> trace_events([t])
        [(1, 's1/F[0]', 0.0, 0.5)]
    """
    return [
        (t.rank, t.name if t.mb is None else f"{t.name}[{t.mb}]", t.start, t.end) for t in timings
    ]


def profile_from_timings(
    timings, schedule: schedules.Schedule, loop_tasks: Mapping[str, tuple[int, schedules.Kind]]
) -> Profile:
    """Builds a Profile from the timings of a profiled step.

    Example:
        >>> from jaxpp.schedules import GPipe
        >>> ts = [_local.TaskTiming(0, "s0/F", 0, 0.0, 1.0),
        ...       _local.TaskTiming(0, "s0/B", 0, 1.0, 3.0)]
        >>> tasks = {"s0/F": (0, "F"), "s0/B": (0, "B")}
        >>> p = profile_from_timings(ts, GPipe(1).build(1), tasks)
        >>> p.simulation.makespan, p.busy_seconds
        (3.0, (3.0,))
        >>> ts += [_local.TaskTiming(0, "post/r0", None, 3.0, 3.5)]
        >>> profile_from_timings(ts, GPipe(1).build(1), tasks).outside_loop_seconds
        0.5
    """
    durations: dict[tuple[int, schedules.Kind], list[float]] = {}
    busy = [0.0] * schedule.num_ranks
    outside = [0.0] * schedule.num_ranks
    for t in timings:
        seconds = t.end - t.start
        if t.name in loop_tasks:
            stage, kind = loop_tasks[t.name]
            durations.setdefault((stage, schedules.Kind(kind)), []).append(seconds)
            busy[t.rank] += seconds
        else:
            outside[t.rank] += seconds
    per_stage: dict[int, dict[schedules.Kind, float]] = {}
    for (stage, kind), values in durations.items():
        per_stage.setdefault(stage, {})[kind] = statistics.median(values)
    # Tasks with no work never run, so they have no timing: they cost nothing.
    costs = schedules.Costs(
        forward=0.0, backward=0.0, input_grad=0.0, weight_grad=0.0, per_stage=per_stage
    )
    return Profile(
        timings=tuple(timings),
        costs=costs,
        simulation=schedules.simulate(schedule, costs),
        busy_seconds=tuple(busy),
        outside_loop_seconds=max(outside, default=0.0),
    )
