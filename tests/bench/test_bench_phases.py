"""Phase lines of `jaxpp bench pipeline`: printed, parsed back, and in the result rows."""

import io
import time
import types

import pytest

from jaxpp._bench import _phases
from jaxpp.runtime import _precompile


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


class _SlowProgram:
    """Stands in for `jax.jit(...)`: `lower(...).compile()` takes `seconds`."""

    def __init__(self, seconds: float, *, fails: bool = False) -> None:
        self.seconds, self.fails = seconds, fails

    def lower(self, *args):
        return self

    def compile(self):
        time.sleep(self.seconds)
        if self.fails:
            raise RuntimeError("cannot compile")
        return "compiled"


def _program(name: str, rank: int) -> _precompile.Program:
    return _precompile.Program(types.SimpleNamespace(name=name), rank, ())


def test_precompile_report_prints_progress_then_per_rank_summary():
    stream = io.StringIO()
    clock = _phases.PhaseClock("cfg", origin=time.time(), stream=stream)
    programs = [_program(f"{s}F", r) for r in (0, 1) for s in range(3)]
    programs.append(_program("bad", 1))
    slow = {"1F": 0.15}

    def make_jit(task, rank):
        return _SlowProgram(slow.get(task.name, 0.02), fails=task.name == "bad")

    with _phases.PrecompileReport(clock, interval=0.05).watching():
        compiled, stats = _precompile.compile_programs(programs, make_jit)
    lines = stream.getvalue().splitlines()
    texts = [line.split(": ", 1)[1] for line in lines]
    assert texts[0] == "precompile ..."
    progress = [t for t in texts if t.startswith("precompile: ") and "after" in t]
    assert progress and all("r0 " in t and "r1 " in t for t in progress)
    assert all(_phases.parse_line(line) is None for line in lines if "precompile: " in line)
    end = _phases.parse_line(lines[-2])
    assert end.phase == "precompile" and end.seconds == pytest.approx(stats.seconds, abs=0.06)
    assert texts[-1].startswith("precompile: 6 programs (1 failed), ")
    assert "slowest 1F@" in texts[-1] and "per rank: r0 " in texts[-1]
    assert _phases.precompile_text(lines[-1]) == texts[-1]
    # The same numbers in the clock, for the row.
    assert len(compiled) == stats.programs == 6 and stats.failed == 1 and stats.total == 7
    assert [(r.rank, r.programs, r.total, r.failed) for r in stats.ranks] == [
        (0, 3, 3, 0),
        (1, 3, 4, 1),
    ]
    assert stats.slowest_seconds >= 0.15 and stats.slowest.startswith("1F@")
    details = clock.details["precompile"]
    assert details["programs"] == 6 and details["total"] == 7
    assert details["ranks"][1] == {
        "rank": 1, "programs": 3, "total": 4, "failed": 1,
        "seconds": pytest.approx(stats.ranks[1].seconds, abs=1e-3),
    }  # fmt: skip
    assert clock.seconds["precompile"] == pytest.approx(stats.seconds, abs=1e-3)
    assert clock.current is None  # it does not replace the enclosing phase


def test_precompile_without_watcher_prints_nothing_and_keeps_stats():
    compiled, stats = _precompile.compile_programs(
        [_program("F", 0)], lambda task, rank: _SlowProgram(0.0)
    )
    assert list(compiled) == [("F", 0)] and stats.programs == 1 and stats.threads == 1


def test_where_names_the_innermost_jaxpp_frame_below_deep_library_code():
    import sys
    import threading

    def deep(n):
        if n == 0:
            return _phases.where(threading.get_ident(), depth=3)
        return deep(n - 1)

    module = type(sys)("jaxpp.fake_runtime")  # stands for a runtime module calling into jax
    exec("def run_step(callback):\n    return callback(6)\n", module.__dict__)
    text = module.run_step(deep)
    assert text.startswith("_phases.py:") and text.endswith("... <- <string>:2 run_step")
    assert text.count(" deep") == 2  # depth 3: where, deep, deep; then the jaxpp frame
