"""Pictures of schedules: the ASCII grid and Gantt chart, PNG/SVG Gantt, Chrome/Perfetto traces."""

import os
from collections.abc import Iterable

from jaxpp.schedules import _grid, _ir, _simulate

_KIND_COLORS = {
    _ir.Kind.FORWARD: "#4c72b0",
    _ir.Kind.BACKWARD: "#55a868",
    _ir.Kind.INPUT_GRAD: "#8fd19e",
    _ir.Kind.WEIGHT_GRAD: "#dd8452",
}
_KIND_NAMES = {
    _ir.Kind.FORWARD: "forward",
    _ir.Kind.BACKWARD: "backward",
    _ir.Kind.INPUT_GRAD: "input grad",
    _ir.Kind.WEIGHT_GRAD: "weight grad",
}


def render_grid(schedule: _ir.Schedule, *, max_steps: int | None = None) -> str:
    """The rank x step grid: row r lists rank r's actions in order (not timed).

    Args:
        schedule: the schedule.
        max_steps: draw at most this many steps (then `...`); all when None.

    Example:
        >>> from jaxpp.schedules import Std1F1B
        >>> print(render_grid(Std1F1B(2).build(2)))
        step       0     1     2     3
        rank 0:   0F0   0F1   0B0   0B1
        rank 1:   1F0   1B0   1F1   1B1
    """
    return _grid.format_grid(schedule.actions, max_steps=max_steps)


def render_timeline(simulation: _simulate.Simulation, *, max_width: int = 160) -> str:
    """An ASCII Gantt chart of a simulation: one row per rank, time to the right.

    Each action is drawn as wide as its duration (labelled when it fits, else its kind
    letter); `.` is idle time. The last line gives makespan, bubble and peak memory.

    Args:
        simulation: from `simulate`.
        max_width: the most characters used for the time axis.

    Example:
        >>> from jaxpp.schedules import Std1F1B, simulate
        >>> print(render_timeline(simulate(Std1F1B(2).build(2))))
        time    0       2       4       6       8
        rank 0: 0F0 0F1 ........0B0     ....0B1
        rank 1: ....1F0 1B0     1F1 1B1     ........
        makespan 9  bubble 33.3%  peak activations per rank 2 1
    """
    timeline = simulation.timeline
    num_ranks = simulation.schedule.num_ranks
    makespan = simulation.makespan
    footer = (
        f"makespan {makespan:g}  bubble {100 * simulation.bubble:.1f}%  peak activations "
        f"per rank {' '.join(f'{p:g}' for p in simulation.peak_activations)}"
    )
    if makespan <= 0:
        return footer
    label = max((len(str(t.action)) for t in timeline), default=3) + 1
    shortest = min((t.end - t.start for t in timeline if t.end > t.start), default=1.0)
    scale = min(label / shortest, max_width / makespan)
    if scale >= 1:
        scale = float(int(scale))  # whole columns per time unit keep unit actions aligned
    width = max(1, round(makespan * scale))
    rows = [["."] * width for _ in range(num_ranks)]
    for t in timeline:
        lo = min(round(t.start * scale), width - 1)
        hi = min(max(round(t.end * scale), lo + 1), width)
        text = str(t.action)
        if hi - lo > len(text):
            cells = text.ljust(hi - lo)
        else:
            cells = t.action.kind.value * (hi - lo)
        rows[t.rank][lo:hi] = list(cells)
    ticks = [" "] * (width + 8)
    step = _tick_step(makespan, width)
    tick = 0.0
    while tick <= makespan:
        text = f"{tick:g}"
        at = round(tick * scale)
        if at + len(text) <= len(ticks) and all(c == " " for c in ticks[max(0, at - 1) : at]):
            ticks[at : at + len(text)] = list(text)
        tick += step
    lines = ["time    " + "".join(ticks).rstrip()]
    lines += [(f"rank {r}:".ljust(8) + "".join(row)).rstrip() for r, row in enumerate(rows)]
    return "\n".join(lines + [footer])


def _tick_step(makespan: float, width: int) -> float:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        if makespan / step * 8 <= width:
            return float(step)
    return makespan


def to_chrome_trace(
    timeline: _simulate.Simulation | Iterable[tuple[int, str, float, float]],
    *,
    time_scale_us: float = 1.0,
    process_name: str = "jaxpp pipeline",
) -> dict[str, object]:
    """A Chrome/Perfetto trace (`json.dump` it, open in ui.perfetto.dev) of a timeline.

    Args:
        timeline: a `Simulation`, or measured events `(rank, name, start, end)`.
        time_scale_us: microseconds per time unit of the input (e.g. 1e6 for seconds).
        process_name: the process label in the viewer.

    Returns:
        `{"traceEvents": [...], "displayTimeUnit": "ms"}`; one thread per rank, one
        complete ("X") event per action.

    Example:
        >>> from jaxpp.schedules import GPipe, simulate
        >>> trace = to_chrome_trace(simulate(GPipe(2).build(1)))
        >>> [(e["name"], e["ts"], e["dur"]) for e in trace["traceEvents"] if e["ph"] == "X"]
        [('0F0', 0.0, 1.0), ('1F0', 1.0, 1.0), ('1B0', 2.0, 2.0), ('0B0', 4.0, 2.0)]
        >>> len(to_chrome_trace([(0, "step", 0.0, 0.5)], time_scale_us=1e6)["traceEvents"])
        3
    """
    if isinstance(timeline, _simulate.Simulation):
        events = [(t.rank, str(t.action), t.start, t.end, t.action) for t in timeline.timeline]
    else:
        events = [(int(r), str(n), float(s), float(e), None) for r, n, s, e in timeline]
    trace: list[dict[str, object]] = [
        {"ph": "M", "pid": 0, "tid": 0, "name": "process_name", "args": {"name": process_name}}
    ]
    for rank in sorted({e[0] for e in events}):
        trace.append(
            {
                "ph": "M",
                "pid": 0,
                "tid": rank,
                "name": "thread_name",
                "args": {"name": f"rank {rank}"},
            }
        )
    for rank, name, start, end, action in events:
        if end < start:
            raise ValueError(
                f"trace event {name!r} on rank {rank} ends ({end}) before it starts ({start}). "
                f"Fix: pass (rank, name, start, end) with end >= start."
            )
        event: dict[str, object] = {
            "ph": "X",
            "pid": 0,
            "tid": rank,
            "name": name,
            "ts": start * time_scale_us,
            "dur": (end - start) * time_scale_us,
        }
        if action is not None:
            event["cat"] = _KIND_NAMES[action.kind]
            event["args"] = {"stage": action.stage, "kind": action.kind.value, "mb": action.mb}
        trace.append(event)
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def save_gantt(
    simulation: _simulate.Simulation, path: str | os.PathLike[str], *, title: str | None = None
) -> None:
    """Draws the simulated timeline as a Gantt chart to a PNG/SVG/PDF file (by suffix).

    Needs matplotlib (`pip install jaxpp[plots]`); it is imported only here.

    Raises:
        ImportError: matplotlib is missing; the message says how to install it.

    Example:
        >>> import tempfile, pathlib
        >>> from jaxpp.schedules import Std1F1B, simulate
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "1f1b.svg"
        >>> save_gantt(simulate(Std1F1B(2).build(2)), out)
        >>> out.stat().st_size > 0
        True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import patches
        from matplotlib import pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "save_gantt needs matplotlib. Fix: pip install 'jaxpp[plots]' (or matplotlib)."
        ) from error
    schedule = simulation.schedule
    fig, ax = plt.subplots(
        figsize=(max(6.0, simulation.makespan * 0.3), 0.5 * schedule.num_ranks + 1.2)
    )
    try:
        for t in simulation.timeline:
            ax.broken_barh(
                [(t.start, t.end - t.start)],
                (t.rank - 0.4, 0.8),
                facecolors=_KIND_COLORS[t.action.kind],
                edgecolors="black",
                linewidth=0.4,
            )
            if t.end - t.start >= 0.6:
                ax.text(
                    (t.start + t.end) / 2,
                    t.rank,
                    f"{t.action.stage}.{t.action.mb}",
                    ha="center",
                    va="center",
                    fontsize=6,
                )
        ax.set_yticks(range(schedule.num_ranks), [f"rank {r}" for r in range(schedule.num_ranks)])
        ax.invert_yaxis()
        ax.set_xlim(0, max(simulation.makespan, 1e-9))
        ax.set_xlabel("time")
        kinds = sorted({t.action.kind for t in simulation.timeline}, key=list(_ir.Kind).index)
        ax.legend(
            handles=[patches.Patch(color=_KIND_COLORS[k], label=_KIND_NAMES[k]) for k in kinds],
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            fontsize=7,
        )
        ax.set_title(
            title or f"makespan {simulation.makespan:g}, bubble {100 * simulation.bubble:.1f}%",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(os.fspath(path))
    finally:
        plt.close(fig)
