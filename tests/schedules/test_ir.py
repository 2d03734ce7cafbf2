"""Tests for the IR types: Kind, Action, Schedule, parse_action."""

import pytest

from jaxpp.schedules import Action, Kind, Schedule, ScheduleError, parse_action


def test_action_str_roundtrips_through_parse_action():
    for action in (Action(0, Kind.FORWARD, 1), Action(12, Kind.INPUT_GRAD, 30), Action(3, "W", 0)):
        assert parse_action(str(action)) == action


def test_action_kind_letter_is_converted_to_kind():
    assert Action(1, "B", 2).kind is Kind.BACKWARD


def test_action_is_hashable_and_ordered():
    a, b = Action(0, "F", 1), Action(0, "F", 2)
    assert len({a, b, Action(0, "F", 1)}) == 2
    assert sorted([b, a]) == [a, b]


@pytest.mark.parametrize("bad", [dict(stage=-1), dict(mb=-2), dict(stage=True), dict(mb=1.0)])
def test_action_bad_index_raises_with_fix(bad):
    fields = dict(stage=0, kind="F", mb=0) | bad
    with pytest.raises(ScheduleError, match="must be an int >= 0. Fix"):
        Action(**fields)


def test_action_bad_kind_lists_valid_kinds():
    with pytest.raises(ScheduleError, match="is not one of F, B, I, W"):
        Action(0, "X", 0)


@pytest.mark.parametrize("text", ["", "F0", "0X1", "0F", "a0F1", "0F1x", "0 F"])
def test_parse_action_malformed_shows_valid_form(text):
    with pytest.raises(ScheduleError, match=r"Fix: write <stage><kind><mb>"):
        parse_action(text)


def test_parse_action_accepts_lowercase_and_spaces():
    assert parse_action(" 2i3 ") == Action(2, Kind.INPUT_GRAD, 3)


def _two_stage(actions0, actions1, placement=(0, 1)):
    return Schedule(2, 1, placement, (tuple(actions0), tuple(actions1)))


def test_schedule_lists_are_stored_as_tuples_and_hashable():
    s = Schedule(1, 1, [0], [[Action(0, "F", 0), Action(0, "B", 0)]])
    assert isinstance(s.placement, tuple) and isinstance(s.actions[0], tuple)
    assert hash(s) == hash(Schedule(1, 1, (0,), ((Action(0, "F", 0), Action(0, "B", 0)),)))


def test_schedule_properties_describe_ranks_and_split():
    s = Schedule(3, 1, (0, 1, 0), ((Action(0, "F", 0),), (Action(1, "I", 0),)))
    assert s.num_ranks == 2
    assert s.stages_of(0) == (0, 2)
    assert s.uses_split_backward


def test_schedule_placement_length_mismatch_raises():
    with pytest.raises(ScheduleError, match="Fix: give one rank per stage"):
        Schedule(2, 1, (0,), ((), ()))


def test_schedule_placement_rank_out_of_range_raises():
    with pytest.raises(ScheduleError, match="Fix: place every stage on one of the 2 ranks"):
        Schedule(2, 1, (0, 2), ((), ()))


def test_schedule_action_out_of_range_raises():
    with pytest.raises(ScheduleError, match="Fix: use stages 0..1 and microbatches 0..0"):
        _two_stage([Action(0, "F", 1)], [])


def test_schedule_non_action_entry_raises():
    with pytest.raises(ScheduleError, match=r"Fix: use Action\(stage, kind, mb\)"):
        _two_stage(["0F0"], [])


def test_schedule_without_ranks_raises():
    with pytest.raises(ScheduleError, match="Fix: give at least one rank"):
        Schedule(1, 1, (0,), ())
