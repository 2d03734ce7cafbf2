"""Tests for rendering: grid, ASCII timeline, Chrome trace, Gantt files."""

import json

import pytest

from jaxpp.schedules import (
    ZBV,
    Costs,
    GPipe,
    Std1F1B,
    render_grid,
    render_timeline,
    save_gantt,
    simulate,
    to_chrome_trace,
)


def test_render_grid_one_row_per_rank_in_list_order():
    lines = render_grid(Std1F1B(3).build(4)).splitlines()
    assert len(lines) == 4
    assert lines[1].split()[2:6] == ["0F0", "0F1", "0F2", "0B0"]


def test_render_grid_max_steps_cuts_with_ellipsis():
    text = render_grid(GPipe(2).build(16), max_steps=5)
    assert text.splitlines()[1].rstrip().endswith("...")
    assert "0F5" not in text


def test_render_timeline_widths_follow_durations_and_footer_reports():
    sim = simulate(GPipe(2).build(1), Costs(forward=1, backward=2))
    lines = render_timeline(sim).splitlines()
    assert lines[1].startswith("rank 0: 0F0")
    assert lines[2].index("1F0") == lines[1].index("0F0") + 4
    assert lines[-1] == "makespan 6  bubble 50.0%  peak activations per rank 1 1"


def test_render_timeline_fits_max_width():
    sim = simulate(ZBV(8).build(32))
    for line in render_timeline(sim, max_width=80).splitlines()[1:-1]:
        assert len(line) <= 8 + 80


def test_to_chrome_trace_from_simulation_has_thread_per_rank():
    sim = simulate(ZBV(4).build(2))
    trace = to_chrome_trace(sim, time_scale_us=10.0)
    json.dumps(trace)
    threads = [e for e in trace["traceEvents"] if e["name"] == "thread_name"]
    assert [e["args"]["name"] for e in threads] == ["rank 0", "rank 1"]
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(sim.timeline)
    first = spans[0]
    assert (first["ts"], first["dur"], first["args"]) == (
        0.0,
        10.0,
        {"stage": 0, "kind": "F", "mb": 0},
    )


def test_to_chrome_trace_accepts_measured_events():
    trace = to_chrome_trace([(1, "RUN 0F0", 0.5, 0.75)], time_scale_us=1e6)
    (span,) = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert (span["tid"], span["name"], span["ts"], span["dur"]) == (1, "RUN 0F0", 5e5, 2.5e5)


def test_to_chrome_trace_event_ending_before_start_raises():
    with pytest.raises(
        ValueError, match="Fix: pass \\(rank, name, start, end\\) with end >= start"
    ):
        to_chrome_trace([(0, "x", 2.0, 1.0)])


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_save_gantt_writes_file(tmp_path, suffix):
    path = tmp_path / f"gantt{suffix}"
    save_gantt(simulate(Std1F1B(2).build(3)), path, title="1F1B")
    assert path.stat().st_size > 1000
