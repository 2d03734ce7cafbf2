"""Measured profiles: what a profiled step's task times say about the step."""

import pytest

from jaxpp import schedules
from jaxpp.runtime import _local, _trace


def test_code_outside_the_loop_counts_once_per_step_not_once_per_rank():
    # Two ranks, each with its own cast before and optimizer after the loop: they run side
    # by side, so the step pays the longer rank's, not the sum.
    timings = [
        _local.TaskTiming(0, "pre/r0", None, 0.0, 0.2),
        _local.TaskTiming(1, "pre/r1", None, 0.0, 0.1),
        _local.TaskTiming(0, "s0/F", 0, 0.2, 1.2),
        _local.TaskTiming(1, "s1/F", 0, 1.2, 2.2),
        _local.TaskTiming(1, "s1/B", 0, 2.2, 4.2),
        _local.TaskTiming(0, "s0/B", 0, 4.2, 6.2),
        _local.TaskTiming(0, "post/r0", None, 6.2, 6.5),
        _local.TaskTiming(1, "post/r1", None, 4.2, 4.6),
    ]
    tasks = {"s0/F": (0, "F"), "s1/F": (1, "F"), "s0/B": (0, "B"), "s1/B": (1, "B")}
    profile = _trace.profile_from_timings(timings, schedules.GPipe(2).build(1), tasks)
    assert profile.busy_seconds == (3.0, 3.0)
    # rank 0: 0.2 + 0.3 outside its loop tasks; rank 1: 0.1 + 0.4
    assert profile.outside_loop_seconds == pytest.approx(0.5)
    assert profile.predicted_step_seconds == pytest.approx(profile.simulation.makespan + 0.5)
