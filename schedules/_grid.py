"""The rank x step text grid, used by `render_grid` and by every schedule error message."""

from collections.abc import Mapping, Sequence

from jaxpp.schedules import _ir

# Steps shown either side of a marked action when an error grid is cut to fit a terminal.
_ERROR_CONTEXT_STEPS = 6


def format_grid(
    actions: Sequence[Sequence[_ir.Action | None]],
    *,
    marks: Mapping[tuple[int, int], str] | None = None,
    max_steps: int | None = None,
) -> str:
    """Draws one row per rank, one column per step; marked cells get brackets and a note.

    Args:
        actions: `actions[rank][step]`; `None` is an idle slot (drawn `.`).
        marks: `(rank, step) -> note`; the cell is drawn `[0F2]` and the row ends with
            `<-- here: note`.
        max_steps: when set and the grid is wider, only the steps around the marks (or
            the first `max_steps`) are drawn, with `...` where steps were left out.

    Returns:
        The grid as lines of text (no trailing newline).

    Example:
        >>> a = _ir.parse_action
        >>> print(format_grid([[a("0F0"), a("0B0")], [a("1F0")]], marks={(1, 0): "why"}))
        step       0     1
        rank 0:   0F0   0B0
        rank 1:  [1F0]        <-- here: why
    """
    marks = dict(marks or {})
    num_steps = max((len(row) for row in actions), default=0)
    shown = _shown_steps(num_steps, marks, max_steps)
    width = max(
        [len(str(a)) for row in actions for a in row if a is not None] + [len(str(num_steps)), 1]
    )
    header = ["step    "]
    rows = [[f"rank {r}:".ljust(8)] for r in range(len(actions))]
    previous = -1
    for step in shown:
        if step != previous + 1:
            header.append(" ...")
            for row in rows:
                row.append(" ...")
        previous = step
        header.append(f" {str(step).center(width + 2)}")
        for rank, row in enumerate(rows):
            action = actions[rank][step] if step < len(actions[rank]) else None
            text = "." if action is None else str(action)
            if step >= len(actions[rank]):
                text = ""
            cell = f"[{text}]" if (rank, step) in marks else f" {text} "
            row.append(f" {cell.center(width + 2)}")
    if shown and shown[-1] != num_steps - 1:
        header.append(" ...")
        for row in rows:
            row.append(" ...")
    lines = ["".join(header).rstrip()]
    for rank, row in enumerate(rows):
        line = "".join(row).rstrip()
        notes = [note for (r, _), note in sorted(marks.items()) if r == rank]
        if notes:
            line += "  <-- here: " + "; ".join(notes)
        lines.append(line)
    return "\n".join(lines)


def error_grid(schedule: _ir.Schedule, marks: Mapping[tuple[int, int], str]) -> str:
    """The grid of `schedule` for an error message: cut around the marked actions."""
    return format_grid(schedule.actions, marks=marks, max_steps=2 * _ERROR_CONTEXT_STEPS + 1)


def _shown_steps(
    num_steps: int, marks: Mapping[tuple[int, int], str], max_steps: int | None
) -> list[int]:
    if max_steps is None or num_steps <= max_steps:
        return list(range(num_steps))
    if not marks:
        return list(range(max_steps))
    keep: set[int] = set()
    for _, step in marks:
        lo = max(0, step - _ERROR_CONTEXT_STEPS)
        keep.update(range(lo, min(num_steps, step + _ERROR_CONTEXT_STEPS + 1)))
    return sorted(keep)
