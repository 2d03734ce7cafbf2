"""Tests for validate: every kind of bad schedule gets a clear error with the fix."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from schedule_strategies import random_valid_schedule, reference_start_times

from jaxpp.schedules import BUILTINS, Costs, Schedule, ScheduleError, parse, validate


def _schedule(*rows: str, header: str = "") -> Schedule:
    lines = [header] if header else []
    lines += [f"rank {r}: {row}" for r, row in enumerate(rows)]
    return parse("\n".join(lines))


def test_validate_returns_the_schedule():
    schedule = _schedule("0F0 0B0", "1F0 1B0")
    assert validate(schedule) is schedule


@pytest.mark.parametrize("name", list(BUILTINS))
def test_validate_accepts_every_builtin(name):
    builder = BUILTINS[name](
        6 if name in {"zbv", "dualpipev", "interleaved-1f1b", "looped-bfs"} else 3, ranks=3
    )
    validate(builder.build(8))


def test_validate_duplicate_action_marks_both():
    schedule = _schedule("0F0 0B0 0F0", "1F0 1B0")
    with pytest.raises(ScheduleError, match="Fix: remove one of the two 0F0") as info:
        validate(schedule)
    assert "<-- here: first; again" in str(info.value)


def test_validate_missing_microbatch_names_action_and_rank():
    schedule = _schedule("0F0 0B0 0F1", "1F0 1B0 1F1 1B1", header="stages 2 microbatches 2")
    with pytest.raises(ScheduleError, match="Fix: add 0B1 to rank 0's list"):
        validate(schedule)


def test_validate_missing_forward_is_caught():
    schedule = _schedule("0B0", "1F0 1B0")
    with pytest.raises(ScheduleError, match="(?s)0F0 missing.*Fix: add 0F0 to rank 0's list"):
        validate(schedule)


def test_validate_input_grad_without_weight_grad_is_caught():
    schedule = _schedule("0F0 0I0", "1F0 1B0")
    with pytest.raises(ScheduleError, match="Fix: add 0W0 to rank 0's list"):
        validate(schedule)


def test_validate_full_and_split_backward_together_is_caught():
    schedule = _schedule("0F0 0B0 0I0 0W0", "1F0 1B0")
    with pytest.raises(ScheduleError, match="Fix: keep either 0B0 alone, or 0I0 and 0W0"):
        validate(schedule)


def test_validate_stage_on_two_ranks_is_caught():
    schedule = Schedule(
        2,
        1,
        (0, 1),
        (tuple(parse("rank 0: 0F0 1F0").actions[0]), tuple(parse("rank 0: 1B0 0B0").actions[0])),
    )
    with pytest.raises(
        ScheduleError, match="(?s)each stage lives on exactly one rank.*Fix: move all of stage"
    ):
        validate(schedule)


def test_validate_action_on_wrong_rank_is_caught():
    schedule = _schedule("0F0 0B0", "1F0 1B0", header="stages 2 microbatches 1 placement 1 0")
    with pytest.raises(
        ScheduleError, match=r"Fix: move 0F0 to rank 1's list, or change placement\[0\]"
    ):
        validate(schedule)


def test_validate_cyclic_wait_is_caught_with_grid():
    schedule = _schedule("0F0 0B0 0F1 0B1", "1F1 1F0 1B0 1B1")
    with pytest.raises(ScheduleError, match="(?s)deadlock.*Fix: break the cycle") as info:
        validate(schedule)
    assert "[0B0]" in str(info.value) and "[1F1]" in str(info.value)


def test_validate_backward_before_downstream_backward_on_same_rank_is_caught():
    schedule = _schedule("0F0 1F0 0B0 1B0", header="stages 2 microbatches 1 placement 0 0")
    with pytest.raises(ScheduleError, match="Fix: move 1B0 before 0B0 on rank 0"):
        validate(schedule)


def test_validate_long_schedule_error_grid_is_cut_around_the_mark():
    schedule = BUILTINS["gpipe"](2).build(32)
    rows = [list(schedule.actions[0]), list(schedule.actions[1])]
    rows[0][40], rows[0][10] = (
        rows[0][10],
        rows[0][40],
    )  # 0B8 ahead of 0F10: a cycle
    bad = Schedule(2, 32, (0, 1), tuple(tuple(r) for r in rows))
    with pytest.raises(ScheduleError) as info:
        validate(bad)
    grid_line = str(info.value).splitlines()[1]
    assert "..." in grid_line and len(grid_line) < 140


@settings(max_examples=80, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 10_000))
def test_validate_random_swap_caught_iff_it_breaks_a_dependency(rng, seed):
    schedule = random_valid_schedule(rng)
    picker = random.Random(seed)
    rank = picker.randrange(schedule.num_ranks)
    row = list(schedule.actions[rank])
    if len(row) < 2:
        return
    i, j = sorted(picker.sample(range(len(row)), 2))
    row[i], row[j] = row[j], row[i]
    actions = list(schedule.actions)
    actions[rank] = tuple(row)
    swapped = Schedule(
        schedule.num_stages, schedule.num_microbatches, schedule.placement, tuple(actions)
    )
    runnable = reference_start_times(swapped, Costs()) is not None
    if runnable:
        validate(swapped)
    else:
        with pytest.raises(ScheduleError, match="(?s)deadlock.*Fix: "):
            validate(swapped)
