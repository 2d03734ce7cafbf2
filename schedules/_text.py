"""The versioned text format (`parse`, `format_schedule`) and torch CSV (`from_csv`, `to_csv`).

Text, version 1::

    # jaxpp-schedule v1
    stages 2  microbatches 2  placement 0 1
    rank 0: 0F0 0F1 0B0 0B1
    rank 1: 1F0 1B0 1F1 1B1

`#` starts a comment (the first line's `# jaxpp-schedule vN` is the version). The
header line and each of its fields are optional when reading: `stages` and
`microbatches` default to one more than the largest stage and microbatch seen,
`placement` to the rank whose line holds the stage (stage s on rank `s % ranks` if no
line holds it). `.` in a rank line is an idle slot and is skipped. `format_schedule`
always writes every field, so `parse(format_schedule(s)) == s`.

CSV is the compute-only form of `torch.distributed.pipelining` (`_dump_csv`/`_load_csv`):
row r is rank r, each cell one action (`0F0`, `1B2`, `2I0`, `2W0`), empty cells idle.
"""

import csv
import io
import re

from jaxpp.schedules import _ir

VERSION = 1
_HEADER = f"# jaxpp-schedule v{VERSION}"
_VERSION_RE = re.compile(r"#\s*jaxpp-schedule\s+v(\S+)\s*")
_RANK_RE = re.compile(r"rank\s+(\d+)\s*:(.*)")
_IDLE = {".", "-", ""}


def parse(text: str) -> _ir.Schedule:
    """Reads a schedule written in the jaxpp text format (see the module docstring).

    Args:
        text: the file's contents.

    Returns:
        The `Schedule` (checked for types and ranges; call `validate` for the rest).

    Raises:
        ScheduleError: naming the line, what is wrong there, and the fix.

    Example:
        >>> s = parse('''
        ... # jaxpp-schedule v1
        ... stages 2  microbatches 1  placement 0 1
        ... rank 0: 0F0 0B0
        ... rank 1: 1F0 1B0
        ... ''')
        >>> s.num_ranks, [str(a) for a in s.actions[1]]
        (2, ['1F0', '1B0'])
    """
    header: dict[str, object] = {}
    ranks: dict[int, tuple[_ir.Action, ...]] = {}
    first_content = True
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        version = _VERSION_RE.fullmatch(line)
        if version is not None:
            if version.group(1) != str(VERSION):
                raise _ir.ScheduleError(
                    f"line {number}: schedule format v{version.group(1)} is not supported "
                    f"(this jaxpp reads v{VERSION}). Fix: write '{_HEADER}' and the v{VERSION} "
                    f"syntax, or upgrade jaxpp."
                )
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        rank_line = _RANK_RE.fullmatch(line)
        if rank_line is not None:
            rank = int(rank_line.group(1))
            if rank in ranks:
                raise _ir.ScheduleError(
                    f"line {number}: rank {rank} is listed twice. Fix: put all of rank "
                    f"{rank}'s actions on one 'rank {rank}:' line."
                )
            ranks[rank] = tuple(
                _parse_token(token, number)
                for token in rank_line.group(2).split()
                if token not in _IDLE
            )
        elif first_content and not ranks and not header:
            header = _parse_header(line, number)
        else:
            raise _ir.ScheduleError(
                f"line {number}: cannot read {line!r}. Fix: lines are the header "
                f"'stages N  microbatches M  placement r0 r1 ...' (first) or "
                f"'rank R: 0F0 0B0 ...'."
            )
        first_content = False
    if not ranks:
        raise _ir.ScheduleError(
            "no 'rank R: ...' lines found. Fix: give each rank a line, e.g. 'rank 0: 0F0 0B0'."
        )
    return _assemble(ranks, header, where="text")


def _parse_header(line: str, number: int) -> dict[str, object]:
    tokens = line.split()
    header: dict[str, object] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key in ("stages", "microbatches") and key not in header:
            if i + 1 >= len(tokens) or not tokens[i + 1].isdigit():
                raise _ir.ScheduleError(
                    f"line {number}: '{key}' needs a count. Fix: write e.g. '{key} 4'."
                )
            header[key] = int(tokens[i + 1])
            i += 2
        elif key == "placement" and key not in header:
            values = []
            i += 1
            while i < len(tokens) and tokens[i].isdigit():
                values.append(int(tokens[i]))
                i += 1
            header[key] = tuple(values)
        else:
            raise _ir.ScheduleError(
                f"line {number}: unknown or repeated header field {key!r}. Fix: the header is "
                f"'stages N  microbatches M  placement r0 r1 ...' (each field once)."
            )
    return header


def _parse_token(token: str, number: int) -> _ir.Action:
    try:
        return _ir.parse_action(token)
    except _ir.ScheduleError as error:
        raise _ir.ScheduleError(f"line {number}: {error}") from None


def _assemble(
    ranks: dict[int, tuple[_ir.Action, ...]], header: dict[str, object], *, where: str
) -> _ir.Schedule:
    num_ranks = max(ranks) + 1
    missing = sorted(set(range(num_ranks)) - set(ranks))
    if missing:
        raise _ir.ScheduleError(
            f"the {where} has no line for rank(s) {missing} (ranks go up to {num_ranks - 1}). "
            f"Fix: add 'rank {missing[0]}:' (it may be empty) or renumber the ranks from 0."
        )
    rows = tuple(ranks[r] for r in range(num_ranks))
    actions = [a for row in rows for a in row]
    num_stages = header.get("stages", max((a.stage for a in actions), default=0) + 1)
    num_microbatches = header.get("microbatches", max((a.mb for a in actions), default=0) + 1)
    placement = header.get("placement")
    if placement is None:
        placement = _infer_placement(rows, num_stages)  # type: ignore[arg-type]
    return _ir.Schedule(num_stages, num_microbatches, placement, rows)  # type: ignore[arg-type]


def _infer_placement(rows: tuple[tuple[_ir.Action, ...], ...], num_stages: int) -> tuple[int, ...]:
    home: dict[int, int] = {}
    for rank, row in enumerate(rows):
        for action in row:
            if home.setdefault(action.stage, rank) != rank:
                raise _ir.ScheduleError(
                    f"stage {action.stage} appears on rank {home[action.stage]} and rank {rank} "
                    f"(e.g. {action}); each stage lives on exactly one rank. Fix: move all of "
                    f"stage {action.stage}'s actions to one rank."
                )
    return tuple(home.get(stage, stage % len(rows)) for stage in range(num_stages))


def format_schedule(schedule: _ir.Schedule) -> str:
    """Writes `schedule` in the jaxpp text format; `parse` reads it back exactly.

    Example:
        >>> from jaxpp.schedules import GPipe
        >>> print(format_schedule(GPipe(2).build(2)), end="")
        # jaxpp-schedule v1
        stages 2  microbatches 2  placement 0 1
        rank 0: 0F0 0F1 0B0 0B1
        rank 1: 1F0 1F1 1B0 1B1
    """
    placement = " ".join(str(r) for r in schedule.placement)
    lines = [
        _HEADER,
        f"stages {schedule.num_stages}  microbatches {schedule.num_microbatches}  "
        f"placement {placement}",
    ]
    for rank, actions in enumerate(schedule.actions):
        lines.append(f"rank {rank}: {' '.join(str(a) for a in actions)}".rstrip())
    return "\n".join(lines) + "\n"


def from_csv(
    text: str, *, num_stages: int | None = None, num_microbatches: int | None = None
) -> _ir.Schedule:
    """Reads a compute-only schedule CSV as torch.distributed.pipelining writes it.

    Row r holds rank r's actions in order; empty cells are idle slots. Torch's
    overlapped pair cells `(0F1;1B0)OVERLAP_F_B` are read as the two actions in order.
    Older torch files wrote the input-grad pass as `B` next to a `W`: a `B` whose
    (stage, microbatch) also has a `W` and no `I` is read as `I`.

    Args:
        text: the CSV contents.
        num_stages: defaults to the largest stage + 1.
        num_microbatches: defaults to the largest microbatch + 1.

    Raises:
        ScheduleError: a cell that is not a compute action, with its row and column.

    Example:
        >>> s = from_csv("0F0,,0B0\\n,1F0,1B0\\n")
        >>> s.placement, [str(a) for a in s.actions[0]]
        ((0, 1), ['0F0', '0B0'])
    """
    ranks: dict[int, tuple[_ir.Action, ...]] = {}
    for row_number, row in enumerate(csv.reader(io.StringIO(text))):
        actions = []
        for column, cell in enumerate(row):
            actions.extend(_parse_cell(cell.strip(), row_number, column))
        ranks[row_number] = tuple(actions)
    ranks = _legacy_input_grads(ranks)
    if not ranks:
        raise _ir.ScheduleError("the CSV is empty. Fix: one row per rank, e.g. '0F0,0B0'.")
    header: dict[str, object] = {}
    if num_stages is not None:
        header["stages"] = num_stages
    if num_microbatches is not None:
        header["microbatches"] = num_microbatches
    return _assemble(ranks, header, where="CSV")


def _legacy_input_grads(
    ranks: dict[int, tuple[_ir.Action, ...]],
) -> dict[int, tuple[_ir.Action, ...]]:
    kinds: dict[tuple[int, int], set[_ir.Kind]] = {}
    for row in ranks.values():
        for a in row:
            kinds.setdefault((a.stage, a.mb), set()).add(a.kind)
    legacy = {
        key
        for key, seen in kinds.items()
        if {_ir.Kind.BACKWARD, _ir.Kind.WEIGHT_GRAD} <= seen and _ir.Kind.INPUT_GRAD not in seen
    }
    if not legacy:
        return ranks
    return {
        rank: tuple(
            _ir.Action(a.stage, _ir.Kind.INPUT_GRAD, a.mb)
            if a.kind is _ir.Kind.BACKWARD and (a.stage, a.mb) in legacy
            else a
            for a in row
        )
        for rank, row in ranks.items()
    }


_OVERLAP_RE = re.compile(r"\((.*)\)OVERLAP_F_B")


def _parse_cell(cell: str, row: int, column: int) -> list[_ir.Action]:
    if not cell:
        return []
    overlap = _OVERLAP_RE.fullmatch(cell)
    parts = overlap.group(1).split(";") if overlap else [cell]
    try:
        return [_ir.parse_action(part) for part in parts]
    except _ir.ScheduleError:
        raise _ir.ScheduleError(
            f"CSV row {row} (rank {row}) column {column}: cannot read {cell!r}. jaxpp reads the "
            f"compute-only form (F, B, I, W); it infers transfers itself. Fix: write cells "
            f"like '0F0', '1B2', '2I0', '2W0', or dump the torch schedule with "
            f"format='compute_only'."
        ) from None


def to_csv(schedule: _ir.Schedule) -> str:
    """Writes `schedule` as a compute-only CSV that torch's `_load_csv` reads.

    Example:
        >>> from jaxpp.schedules import GPipe
        >>> print(to_csv(GPipe(2).build(1)), end="")
        0F0,0B0
        1F0,1B0
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for actions in schedule.actions:
        writer.writerow([str(a) for a in actions])
    return out.getvalue()
