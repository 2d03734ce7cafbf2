"""Tests for the grid drawing used by render_grid and by every schedule error."""

from jaxpp.schedules import GPipe, parse_action
from jaxpp.schedules._grid import error_grid, format_grid


def test_format_grid_marks_cell_and_row():
    a = parse_action
    text = format_grid([[a("0F0"), None, a("0B0")], [a("1F0")]], marks={(0, 2): "waits"})
    lines = text.splitlines()
    assert lines[0].split() == ["step", "0", "1", "2"]
    assert "[0B0]" in lines[1] and lines[1].endswith("<-- here: waits")
    assert " . " in lines[1]


def test_error_grid_shows_only_steps_near_the_mark():
    schedule = GPipe(2).build(30)
    lines = error_grid(schedule, {(0, 30): "here"}).splitlines()
    steps = [int(t) for t in lines[0].split()[1:] if t.isdigit()]
    assert steps == list(range(24, 37))
    assert "[0B0]" in lines[1]
