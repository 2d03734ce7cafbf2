"""Timestamped phase lines of the benchmark, and reading them back.

Every phase prints a start line and an end line, flushed at once, with the seconds since
one origin (the `--isolate` parent's start, handed to its children in `ORIGIN_ENV`):

    [+12.3s] jaxpp/zb-h1/pp4/mb32/noremat: compile+first step ...
    [+85.0s] jaxpp/zb-h1/pp4/mb32/noremat: compile+first step 72.7 s

The parent reads its children's lines with `parse_line`, so it knows the phase a child is
in when it has to stop it, and the seconds of the phases it finished.
"""

import contextlib
import dataclasses
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import TextIO

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
