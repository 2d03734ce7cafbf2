"""Tests for the simulator: exact timelines, latency, costs, memory, references, deadlocks."""

import pytest
from hypothesis import given, settings
from schedule_strategies import (
    critical_path,
    random_costs,
    reference_needs,
    reference_start_times,
    valid_schedules,
)

from jaxpp.schedules import (
    Action,
    Costs,
    GPipe,
    Kind,
    Schedule,
    ScheduleError,
    Std1F1B,
    ZeroBubble,
    parse,
    simulate,
)


def _times(sim):
    return [(t.rank, str(t.action), t.start, t.end) for t in sim.timeline]


def test_simulate_two_stage_1f1b_exact_timeline():
    sim = simulate(Std1F1B(2).build(2))
    assert _times(sim) == [
        (0, "0F0", 0.0, 1.0),
        (0, "0F1", 1.0, 2.0),
        (1, "1F0", 1.0, 2.0),
        (1, "1B0", 2.0, 4.0),
        (0, "0B0", 4.0, 6.0),
        (1, "1F1", 4.0, 5.0),
        (1, "1B1", 5.0, 7.0),
        (0, "0B1", 7.0, 9.0),
    ]
    assert sim.makespan == 9.0
    assert sim.bubble_per_rank == pytest.approx((1 / 3, 1 / 3))


def test_simulate_transfer_latency_on_cross_rank_edges_only():
    sim = simulate(GPipe(2).build(1), Costs(transfer=0.5))
    assert _times(sim) == [
        (0, "0F0", 0.0, 1.0),
        (1, "1F0", 1.5, 2.5),
        (1, "1B0", 2.5, 4.5),
        (0, "0B0", 5.0, 7.0),
    ]
    same_rank = parse("stages 2 microbatches 1 placement 0 0\nrank 0: 0F0 1F0 1B0 0B0")
    assert simulate(same_rank, Costs(transfer=0.5)).makespan == 6.0


def test_simulate_per_stage_costs_override_kind_costs():
    costs = Costs(per_stage={1: {Kind.FORWARD: 3.0, "B": 0.5}})
    sim = simulate(GPipe(2).build(1), costs)
    assert _times(sim) == [
        (0, "0F0", 0.0, 1.0),
        (1, "1F0", 1.0, 4.0),
        (1, "1B0", 4.0, 4.5),
        (0, "0B0", 4.5, 6.5),
    ]


def test_simulate_memory_deltas_are_configurable():
    schedule = ZeroBubble(2).build(3)
    assert simulate(schedule).peak_activations == (2.0, 2.0)
    heavy_i = Costs(memory={"I": -0.5, "W": -0.5})
    assert simulate(schedule, heavy_i).peak_activations == (2.0, 1.5)


def test_simulate_ties_broken_by_rank():
    schedule = parse("stages 2 microbatches 1\nrank 0: 0F0 0B0\nrank 1: 1F0 1B0")
    sim = simulate(schedule, Costs(forward=0.0))
    assert [r for r, _ in sim.order[:2]] == [0, 1]


def test_simulate_zero_costs_give_zero_makespan_and_bubble():
    zero = Costs(forward=0, backward=0, input_grad=0, weight_grad=0)
    sim = simulate(Std1F1B(3).build(4), zero)
    assert (sim.makespan, sim.bubble, sim.bubble_per_rank) == (0.0, 0.0, (0.0,) * 3)


@settings(max_examples=60, deadline=None)
@given(valid_schedules, random_costs)
def test_simulate_matches_reference_start_times(schedule, costs):
    sim = simulate(schedule, costs)
    reference = reference_start_times(schedule, costs)
    assert reference is not None
    for timed in sim.timeline:
        assert timed.start == pytest.approx(reference[timed.action])
        assert timed.end - timed.start == pytest.approx(costs.duration(timed.action))


@settings(max_examples=60, deadline=None)
@given(valid_schedules, random_costs)
def test_simulate_makespan_never_below_critical_path_or_busy_time(schedule, costs):
    sim = simulate(schedule, costs)
    assert sim.makespan >= critical_path(schedule, costs) - 1e-9
    for row in schedule.actions:
        assert sim.makespan >= sum(costs.duration(a) for a in row) - 1e-9


@settings(max_examples=40, deadline=None)
@given(valid_schedules)
def test_simulate_order_is_topological_and_keeps_rank_order(schedule):
    sim = simulate(schedule)
    position = {action: i for i, (_, action) in enumerate(sim.order)}
    for action, needs in reference_needs(schedule).items():
        assert all(position[need] < position[action] for need in needs)
    for rank, row in enumerate(schedule.actions):
        assert [a for r, a in sim.order if r == rank] == list(row)
    starts = [t.start for t in sim.timeline]
    assert starts == sorted(starts)


def test_simulate_same_rank_wrong_order_deadlock_names_fix():
    schedule = parse("stages 1 microbatches 1\nrank 0: 0B0 0F0")
    with pytest.raises(ScheduleError, match="Fix: move 0F0 before 0B0 on rank 0") as info:
        simulate(schedule)
    assert "[0B0]" in str(info.value) and "<-- here" in str(info.value)


def test_simulate_cyclic_wait_across_ranks_raises_not_hangs():
    schedule = parse("stages 2 microbatches 2\nrank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F1 1F0 1B0 1B1")
    with pytest.raises(ScheduleError, match="Fix: break the cycle by reordering one rank") as info:
        simulate(schedule)
    message = str(info.value)
    assert "rank 0 waits at step 1 (0B0) for 1B0 from rank 1" in message
    assert "rank 1 waits at step 0 (1F1) for 0F1 from rank 0" in message


@pytest.mark.parametrize(
    ("field", "value"), [("forward", -1.0), ("transfer", float("nan")), ("weight_grad", True)]
)
def test_costs_bad_value_raises(field, value):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        Costs(**{field: value})


def test_costs_are_frozen_and_hashable():
    a = Costs(per_stage={0: {"F": 2.0}}, memory={"I": -0.5})
    b = Costs(per_stage={0: {Kind.FORWARD: 2.0}}, memory={Kind.INPUT_GRAD: -0.5})
    assert a == b and hash(a) == hash(b)
    with pytest.raises(TypeError):
        a.memory[Kind.FORWARD] = 3.0  # type: ignore[index]


def test_simulation_reports_action_objects():
    sim = simulate(Schedule(1, 1, (0,), ((Action(0, "F", 0), Action(0, "B", 0)),)))
    assert sim.order == ((0, Action(0, "F", 0)), (0, Action(0, "B", 0)))
