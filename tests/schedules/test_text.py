"""Tests for the text format and the torch-style CSV: round trips, inference, errors."""

import pytest
from hypothesis import given, settings
from schedule_strategies import valid_schedules

from jaxpp.schedules import (
    BUILTINS,
    Action,
    ScheduleError,
    format_schedule,
    from_csv,
    parse,
    to_csv,
    validate,
)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_text_and_csv_roundtrip_every_builtin(name):
    two_per_rank = name in {"zbv", "dualpipev", "interleaved-1f1b", "looped-bfs"}
    schedule = BUILTINS[name](6 if two_per_rank else 3, ranks=3).build(7)
    text = format_schedule(schedule)
    assert parse(text) == schedule
    assert format_schedule(parse(text)) == text
    assert from_csv(to_csv(schedule)) == schedule


@settings(max_examples=60, deadline=None)
@given(valid_schedules)
def test_text_roundtrip_random_schedules(schedule):
    assert parse(format_schedule(schedule)) == schedule


@settings(max_examples=60, deadline=None)
@given(valid_schedules)
def test_csv_roundtrip_random_schedules(schedule):
    assert from_csv(to_csv(schedule)) == schedule


def test_parse_without_header_infers_counts_and_placement():
    schedule = parse("rank 0: 0F0 3F0 3B0 0B0\nrank 1: 1F0 2F0 2B0 1B0\n")
    assert (schedule.num_stages, schedule.num_microbatches) == (4, 1)
    assert schedule.placement == (0, 1, 1, 0)


def test_parse_skips_comments_blank_lines_and_idle_slots():
    schedule = parse(
        "# jaxpp-schedule v1\n\n# a note\nstages 2  microbatches 1\n"
        "rank 0: 0F0 . . 0B0   # rank 0 waits\nrank 1: . 1F0 1B0\n"
    )
    assert [str(a) for a in schedule.actions[0]] == ["0F0", "0B0"]


def test_parse_empty_rank_line_is_a_rank_without_actions():
    schedule = parse("stages 1 microbatches 1 placement 0\nrank 0: 0F0 0B0\nrank 1:\n")
    assert schedule.num_ranks == 2 and schedule.actions[1] == ()
    assert format_schedule(schedule).endswith("rank 1:\n")


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("rank 0: 0F0 0X0", "line 1: cannot read action '0X0'. Fix: write <stage><kind><mb>"),
        (
            "# jaxpp-schedule v2\nrank 0: 0F0 0B0",
            "is not supported .* Fix: write '# jaxpp-schedule v1'",
        ),
        ("rank 0: 0F0\nrank 0: 0B0", "Fix: put all of rank 0's actions on one 'rank 0:' line"),
        ("rank 1: 1F0 1B0", r"no line for rank\(s\) \[0\].* Fix: add 'rank 0:'"),
        (
            "stages 1 pipelines 2\nrank 0: 0F0 0B0",
            "unknown or repeated header field 'pipelines'. Fix",
        ),
        ("stages x\nrank 0: 0F0 0B0", "'stages' needs a count. Fix: write e.g. 'stages 4'"),
        ("rank 0: 0F0 0B0\nstages 1", "cannot read 'stages 1'. Fix: lines are the header"),
        ("# only a comment", "no 'rank R: ...' lines found. Fix"),
        (
            "rank 0: 0F0 1F0\nrank 1: 1B0 0B0",
            "each stage lives on exactly one rank. Fix: move all of stage 1",
        ),
        ("stages 1 placement 0 1\nrank 0: 0F0 0B0", "Fix: give one rank per stage"),
    ],
)
def test_parse_bad_text_raises_with_fix(text, fix):
    with pytest.raises(ScheduleError, match=fix):
        parse(text)


def test_from_csv_reads_torch_compute_only_rows_with_idle_cells():
    # As torch's _dump_csv writes a compute-only 1F1B: one row per rank, "" = idle.
    text = "0F0,0F1,,0B0,,0B1\r\n,1F0,1B0,1F1,1B1,\r\n"
    schedule = from_csv(text)
    assert schedule.placement == (0, 1)
    assert [str(a) for a in schedule.actions[0]] == ["0F0", "0F1", "0B0", "0B1"]
    assert [str(a) for a in schedule.actions[1]] == ["1F0", "1B0", "1F1", "1B1"]


def test_from_csv_reads_split_backward_and_overlapped_cells():
    text = "0F0,1F0,(0F1;1B0)OVERLAP_F_B,0I0,0W0,1F1,1B1,0B1\n"
    schedule = validate(from_csv(text, num_stages=2))
    assert schedule.actions[0][2:4] == (Action(0, "F", 1), Action(1, "B", 0))
    assert (schedule.num_stages, schedule.num_microbatches, schedule.placement) == (2, 2, (0, 0))


def test_from_csv_communication_cell_raises_compute_only_fix():
    with pytest.raises(ScheduleError, match="row 0 .*column 1.*format='compute_only'"):
        from_csv("0F0,0SEND_F0,0B0\n")


def test_from_csv_empty_raises():
    with pytest.raises(ScheduleError, match="the CSV is empty. Fix"):
        from_csv("")


def test_to_csv_writes_one_row_per_rank():
    schedule = parse("rank 0: 0F0 0B0\nrank 1: 1F0 1B0")
    assert to_csv(schedule) == "0F0,0B0\n1F0,1B0\n"


def test_from_csv_reads_legacy_b_next_to_w_as_input_grad():
    # Older torch zero-bubble CSVs wrote the input-grad pass as B beside its W.
    schedule = validate(from_csv("0F0,0F1,,0B0,0W0,0B1,0W1\n,1F0,1B0,1W0,1F1,1B1,1W1\n"))
    assert [str(a) for a in schedule.actions[1]] == ["1F0", "1I0", "1W0", "1F1", "1I1", "1W1"]
    assert from_csv("0F0,0B0\n") == parse("rank 0: 0F0 0B0")
