"""Phase lines of `jaxpp bench pipeline`: printed, parsed back, and in the result rows."""

import io
import time

import pytest

from jaxpp._bench import _phases


def test_phase_clock_lines_parse_back_with_seconds():
    stream = io.StringIO()
    clock = _phases.PhaseClock("jaxpp/1f1b/pp2/mb4/noremat", origin=time.time() - 5, stream=stream)
    with clock.phase("compile+first step"):
        time.sleep(0.01)
    start, end = (_phases.parse_line(line) for line in stream.getvalue().splitlines())
    assert start.phase == end.phase == "compile+first step"
    assert start.seconds is None and start.at >= 5.0
    assert end.label == "jaxpp/1f1b/pp2/mb4/noremat" and 0.0 <= end.seconds < 5
    assert clock.seconds == {"compile+first step": pytest.approx(end.seconds, abs=0.06)}


def test_phase_clock_failing_phase_stays_current():
    clock = _phases.PhaseClock("x", origin=time.time(), stream=io.StringIO())
    with pytest.raises(RuntimeError), clock.phase("trace"):
        raise RuntimeError("boom")
    assert clock.current == "trace" and clock.seconds == {}


def test_parse_line_ignores_other_output():
    assert _phases.parse_line("[+1.0s] bench: spmd/dp2/acc1/noremat exit 0 after 3 s; x") is None
    assert _phases.parse_line("WARNING: something ...x") is None
