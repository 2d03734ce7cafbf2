"""Timestamped phase lines of the benchmark, and reading them back.

Every phase prints a start line and an end line, flushed at once, with the seconds since
one origin (the `--isolate` parent's start, handed to its children in `ORIGIN_ENV`):

    [+12.3s] jaxpp/zb-h1/pp4/mb32/noremat: compile+first step ...
    [+85.0s] jaxpp/zb-h1/pp4/mb32/noremat: compile+first step 72.7 s

The parent reads its children's lines with `parse_line`, so it knows the phase a child is
in when it has to stop it, and the seconds of the phases it finished.

jaxpp's "compile+first step" starts with compiling every task program ahead, one thread
per rank (`jaxpp.runtime._precompile`); `PrecompileReport` makes that a phase of its own
inside it (`precompile ...` / `precompile X s`), prints how far it got every ~30 s, and
at its end one line with the per-rank seconds and the slowest program:

    [+95.0s] jaxpp/zb-h1/pp4/mb32/noremat: precompile: 9/24 programs after 30 s; r0 3/6, ...
    [+160.2s] jaxpp/zb-h1/pp4/mb32/noremat: precompile 72.1 s
    [+160.2s] jaxpp/zb-h1/pp4/mb32/noremat: precompile: 24 programs, 72.1 s wall, 4 threads;
        slowest 1B@1 30.2 s; per rank: r0 50.3 s/6, r1 71.9 s/6, ...
"""

import contextlib
import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from jaxpp.runtime import _precompile

ORIGIN_ENV = "JAXPP_BENCH_ORIGIN"  # time.time() of the run's start, for every process
SPAWNED_ENV = "JAXPP_BENCH_SPAWNED"  # time.time() when the parent started this child
SETUP = "setup"  # the label of the shared phases (reference loss, ceilings)

_LINE = re.compile(
    r"^\[\+(?P<at>[0-9.]+)s\] (?P<label>\S+): (?P<phase>.+?) (?P<end>\.\.\.|[0-9.]+ s)$"
)


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseLine:
    """One parsed phase line: `seconds` is None on a start line (`...`)."""

    at: float
    label: str
    phase: str
    seconds: float | None


def origin(environ: dict[str, str] | None = None) -> float:
    """The run's time origin: `ORIGIN_ENV` if set (a child), else now.

    Example:
        >>> origin({ORIGIN_ENV: "12.5"})
        12.5
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ORIGIN_ENV)
    return float(value) if value else time.time()


def parse_line(line: str) -> PhaseLine | None:
    """The phase line in `line`, or None if it is another line.

    Example:
        >>> parse_line("[+3.0s] spmd/dp2/acc1/noremat: init 1.5 s")
        PhaseLine(at=3.0, label='spmd/dp2/acc1/noremat', phase='init', seconds=1.5)
        >>> parse_line("[+3.0s] setup: reference ...").seconds is None
        True
        >>> parse_line("hello") is None
        True
    """
    found = _LINE.match(line.rstrip("\n"))
    if found is None:
        return None
    end = found["end"]
    seconds = None if end == "..." else float(end.removesuffix(" s"))
    return PhaseLine(float(found["at"]), found["label"], found["phase"], seconds)


_PRECOMPILE_LINE = re.compile(r"^\[\+[0-9.]+s\] \S+: (?P<text>precompile: .*)$")


def precompile_text(line: str) -> str | None:
    """The text of a precompile progress or summary line (`PrecompileReport`), else None.

    Example:
        >>> precompile_text("[+9.0s] cfg: precompile: 3/8 programs after 30 s; r0 3/8")
        'precompile: 3/8 programs after 30 s; r0 3/8'
        >>> precompile_text("[+9.0s] cfg: precompile 2.0 s") is None
        True
    """
    found = _PRECOMPILE_LINE.match(line.rstrip("\n"))
    return None if found is None else found["text"]


_VERDICT_LINE = re.compile(r"^\[\+[0-9.]+s\] \S+: (?P<status>ok|wrong|failed|skipped)\b")


def verdict(line: str) -> str | None:
    """The status of a configuration's verdict line (a child prints it right after it wrote
    its row), else None.

    Example:
        >>> verdict("[+9.0s] spmd/tp4/acc4/noremat: wrong in phase first step: loss ...")
        'wrong'
        >>> verdict("[+9.0s] spmd/tp4/acc4/noremat: first step 3.3 s") is None
        True
    """
    found = _VERDICT_LINE.match(line)
    return None if found is None else found["status"]


class PhaseClock:
    """Times named phases of one label (a configuration, or `SETUP`) and prints them.

    Example:
        >>> import io
        >>> stream = io.StringIO()
        >>> clock = PhaseClock("cfg", origin=time.time(), stream=stream)
        >>> with clock.phase("init"):
        ...     pass
        >>> [parse_line(line).phase for line in stream.getvalue().splitlines()]
        ['init', 'init']
        >>> list(clock.seconds), clock.current is None
        (['init'], True)
    """

    def __init__(self, label: str, *, origin: float, stream: TextIO | None = None) -> None:
        self.label = label
        self.origin = origin
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.details: dict[str, object] = {}  # more for the row, e.g. "precompile"
        self._stream = stream

    def say(self, text: str) -> None:
        """Prints `[+t] label: text`, flushed."""
        stream = self._stream or sys.stdout
        print(f"[+{time.time() - self.origin:.1f}s] {self.label}: {text}", file=stream, flush=True)

    def record(self, name: str, seconds: float) -> None:
        """Records (and prints) a phase timed elsewhere, e.g. a child's start-up."""
        self.seconds[name] = round(seconds, 3)
        self.say(f"{name} {seconds:.1f} s")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the body as phase `name`; a phase that raises is left in `current`."""
        self.current = name
        self.say(f"{name} ...")
        started = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - started)
        self.current = None


PRECOMPILE = "precompile"  # its phase name, and the row's field with its numbers


class PrecompileReport:
    """Prints a jaxpp step's compile-ahead as it runs, and keeps its numbers.

    Use `with PrecompileReport(clock).watching():` around the first step. When the
    precompile starts it prints `precompile ...`, then every `interval` seconds a progress
    line (programs compiled so far, per rank), and at the end the phase line `precompile
    X s` and a summary line; `clock.seconds["precompile"]` and
    `clock.details["precompile"]` (see `stats_dict`) keep the numbers.

    Example:
        >>> import io
        >>> stream = io.StringIO()
        >>> clock = PhaseClock("cfg", origin=time.time(), stream=stream)
        >>> with PrecompileReport(clock).watching():
        ...     _ = _precompile.compile_programs([], lambda task, rank: None)
        >>> [line.split(": ", 1)[1][:22] for line in stream.getvalue().splitlines()]
        ['precompile ...', 'precompile 0.0 s', 'precompile: 0 programs']
        >>> clock.details["precompile"]["programs"]
        0
    """

    def __init__(self, clock: PhaseClock, *, interval: float = 30.0) -> None:
        self.clock = clock
        self.interval = interval
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Reports the precompiles run in the body (stops the progress lines on exit)."""
        try:
            with _precompile.watch(self):
                yield
        finally:
            self._stop.set()

    def __call__(self, progress: _precompile.Progress) -> None:
        if progress.finished:
            self._stop.set()
            stats = progress.stats()
            self.clock.details[PRECOMPILE] = stats_dict(stats)
            self.clock.record(PRECOMPILE, stats.seconds)
            self.clock.say(summary(stats))
            return
        self.clock.say(f"{PRECOMPILE} ...")
        self._stop.clear()
        self._ticker = threading.Thread(
            target=self._tick, args=(progress,), name="jaxpp-bench-precompile", daemon=True
        )
        self._ticker.start()

    def _tick(self, progress: _precompile.Progress) -> None:
        while not self._stop.wait(self.interval):
            if progress.finished:
                return
            stats = progress.stats()
            self.clock.details[PRECOMPILE] = stats_dict(stats)
            ranks = ", ".join(f"r{r.rank} {r.programs + r.failed}/{r.total}" for r in stats.ranks)
            self.clock.say(
                f"{PRECOMPILE}: {stats.programs + stats.failed}/{stats.total} programs after "
                f"{stats.seconds:.0f} s; {ranks or 'no ranks'}"
            )


def summary(stats: _precompile.PrecompileStats) -> str:
    """The one-line account of a finished precompile (not a phase line: it never ends in
    "N s").

    Example:
        >>> rank = _precompile.RankStats(0, programs=2, total=2, seconds=3.25)
        >>> print(summary(_precompile.PrecompileStats(2, 0, 3.5, 1, (rank,), "1B", 2.0)))
        precompile: 2 programs, 3.5 s wall, 1 threads; slowest 1B 2.0 s; per rank: r0 3.2 s/2
    """
    failed = f" ({stats.failed} failed)" if stats.failed else ""
    ranks = ", ".join(f"r{r.rank} {r.seconds:.1f} s/{r.programs + r.failed}" for r in stats.ranks)
    slowest = f"slowest {stats.slowest} {stats.slowest_seconds:.1f} s" if stats.slowest else ""
    return (
        f"{PRECOMPILE}: {stats.programs} programs{failed}, {stats.seconds:.1f} s wall, "
        f"{stats.threads} threads; {slowest or 'slowest -'}; per rank: {ranks or 'none'}"
    )


def stats_dict(stats: _precompile.PrecompileStats) -> dict[str, object]:
    """`stats` for a result row (JSON).

    Example:
        >>> stats_dict(_precompile.PrecompileStats(0, 0, 0.5, 1))["total"]
        0
    """
    return {
        "programs": stats.programs,
        "failed": stats.failed,
        "total": stats.total,
        "seconds": round(stats.seconds, 3),
        "threads": stats.threads,
        "slowest": stats.slowest,
        "slowest_seconds": round(stats.slowest_seconds, 3),
        "ranks": [{**dataclasses.asdict(r), "seconds": round(r.seconds, 3)} for r in stats.ranks],
    }


def where(thread_id: int, *, depth: int = 5) -> str:
    """The innermost `depth` frames of a thread, innermost first: "file:line function";
    then, if none of those is jaxpp's own code, the innermost frame that is (" ... "
    before it), so a thread deep inside jax still says which jaxpp step it is in.

    Example:
        >>> "where" in where(threading.get_ident())
        True
    """
    frame = sys._current_frames().get(thread_id)
    frames, seen_ours = [], False
    while frame is not None:
        code = frame.f_code
        text = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"
        ours = _is_jaxpp(frame.f_globals.get("__name__", ""))
        if len(frames) < depth:
            frames.append(text)
            seen_ours |= ours
        elif ours and not seen_ours:
            frames += ["...", text]
            break
        frame = frame.f_back
    return " <- ".join(frames) or "(thread gone)"


def _is_jaxpp(module: str) -> bool:
    """Whether `module` is jaxpp's own code (not the benchmark's)."""
    return module.startswith("jaxpp.") and not module.startswith("jaxpp._bench")


@contextlib.contextmanager
def sampling(clock: PhaseClock, *, interval: float = 20.0, depth: int = 5) -> Iterator[None]:
    """While the body runs longer than `interval`, prints where its thread is every
    `interval` seconds (a first step that takes minutes shows what it waits for):

        [+140.0s] cfg: still in compile+first step after 20 s: _local.py:250 _call_task <- ...

    Example:
        >>> import io
        >>> stream = io.StringIO()
        >>> clock = PhaseClock("cfg", origin=time.time(), stream=stream)
        >>> with sampling(clock, interval=0.05):
        ...     time.sleep(0.12)
        >>> "still in" in stream.getvalue() and "sleep" not in stream.getvalue()
        True
    """
    target = threading.get_ident()
    stop = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not stop.wait(interval):
            at = where(target, depth=depth)
            phase = clock.current or "the step"
            clock.say(f"still in {phase} after {time.perf_counter() - started:.0f} s: {at}")

    sampler = threading.Thread(target=sample, name="jaxpp-bench-sampler", daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
