"""Completeness and placement checks, and the dependency rules between actions.

Rules: `F(s, mb)` needs `F(s-1, mb)`; `B(s, mb)` or `I(s, mb)` needs `F(s, mb)` and the
backward (`B` or `I`, whichever the schedule has) of `(s+1, mb)`, except on the last
stage; `W(s, mb)` needs `I(s, mb)`.
"""

import dataclasses
from collections import defaultdict

from jaxpp.schedules import _grid, _ir

K = _ir.Kind
_KINDS = tuple(K)
# Internally actions are keyed by plain tuples (stage, kind, mb): hashing them is C-level,
# several times faster than the dataclass hash on the simulator's hot path.
Key = tuple[int, _ir.Kind, int]


def key_of(action: _ir.Action) -> Key:
    """The tuple key of `action`."""
    return (action.stage, action.kind, action.mb)


@dataclasses.dataclass(frozen=True, slots=True)
class Index:
    """Where each action sits, and what each action needs; built by `check_structure`."""

    where: dict[Key, tuple[int, int]]  # action -> (rank, step)
    needs: dict[Key, tuple[Key, ...]]  # action -> the actions it depends on


def check_structure(schedule: _ir.Schedule) -> Index:
    """Checks placement, duplicates and completeness; returns where/needs for the simulator.

    Raises:
        ScheduleError: naming the first problem, with the grid and the fix.
    """
    _check_stage_ranks(schedule)
    where: dict[Key, tuple[int, int]] = {}
    placement = schedule.placement
    for rank, actions in enumerate(schedule.actions):
        for step, action in enumerate(actions):
            home = placement[action.stage]
            if home != rank:
                raise error(
                    schedule,
                    {(rank, step): f"stage {action.stage} is placed on rank {home}"},
                    f"rank {rank} step {step}: {action} runs on rank {rank}, but stage "
                    f"{action.stage} is placed on rank {home}.",
                    f"move {action} to rank {home}'s list, or change placement[{action.stage}] "
                    f"to {rank}.",
                )
            key = (action.stage, action.kind, action.mb)
            if key in where:
                first_rank, first_step = where[key]
                raise error(
                    schedule,
                    {(first_rank, first_step): "first", (rank, step): "again"},
                    f"{action} appears twice: rank {first_rank} step {first_step} and rank "
                    f"{rank} step {step}.",
                    f"remove one of the two {action}; every action runs exactly once.",
                )
            where[key] = (rank, step)
    for stage in range(schedule.num_stages):
        for mb in range(schedule.num_microbatches):
            _check_complete(schedule, where, stage, mb)
    last = schedule.num_stages - 1
    needs = {key: _needs(last, where, key) for key in where}
    return Index(where=where, needs=needs)


def _check_stage_ranks(schedule: _ir.Schedule) -> None:
    ranks_of: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)
    for rank, actions in enumerate(schedule.actions):
        for step, action in enumerate(actions):
            ranks_of[action.stage].setdefault(rank, (rank, step))
    for stage in sorted(ranks_of):
        seen = ranks_of[stage]
        if len(seen) > 1:
            ranks = sorted(seen)
            marks = {seen[r]: f"stage {stage} on rank {r}" for r in ranks}
            raise error(
                schedule,
                marks,
                f"stage {stage} runs on ranks {ranks}; each stage lives on exactly one rank.",
                f"move all of stage {stage}'s actions to rank {schedule.placement[stage]} "
                f"(its placement), or split it into two stages.",
            )


def _check_complete(
    schedule: _ir.Schedule, where: dict[Key, tuple[int, int]], stage: int, mb: int
) -> None:
    has = {kind: (stage, kind, mb) in where for kind in _KINDS}
    if (
        has[K.FORWARD]
        and (has[K.BACKWARD] != has[K.INPUT_GRAD])
        and (has[K.INPUT_GRAD] == has[K.WEIGHT_GRAD])
    ):
        return  # the common, complete case
    rank = schedule.placement[stage]
    missing: list[_ir.Action] = []
    if not has[K.FORWARD]:
        missing.append(_ir.Action(stage, K.FORWARD, mb))
    if has[K.BACKWARD] and (has[K.INPUT_GRAD] or has[K.WEIGHT_GRAD]):
        split = _ir.Action(stage, K.INPUT_GRAD if has[K.INPUT_GRAD] else K.WEIGHT_GRAD, mb)
        full = _ir.Action(stage, K.BACKWARD, mb)
        raise error(
            schedule,
            {where[key_of(full)]: "full backward", where[key_of(split)]: "split backward"},
            f"stage {stage} microbatch {mb} has both a full backward {full} and a split one "
            f"({split}).",
            f"keep either {full} alone, or {stage}I{mb} and {stage}W{mb} without {full}.",
        )
    if has[K.INPUT_GRAD] != has[K.WEIGHT_GRAD]:
        missing.append(_ir.Action(stage, K.WEIGHT_GRAD if has[K.INPUT_GRAD] else K.INPUT_GRAD, mb))
    elif not (has[K.BACKWARD] or has[K.INPUT_GRAD]):
        missing.append(_ir.Action(stage, K.BACKWARD, mb))
    if missing:
        names = " and ".join(str(a) for a in missing)
        raise error(
            schedule,
            {},
            f"{names} missing: no rank runs it (stage {stage}, microbatch {mb}, placed on "
            f"rank {rank}). Every (stage, microbatch) needs one F and either one B or one I "
            f"and one W.",
            f"add {names} to rank {rank}'s list.",
        )


def _needs(last: int, where: dict[Key, tuple[int, int]], key: Key) -> tuple[Key, ...]:
    stage, kind, mb = key
    if kind is K.FORWARD:
        return ((stage - 1, K.FORWARD, mb),) if stage > 0 else ()
    if kind is K.WEIGHT_GRAD:
        return ((stage, K.INPUT_GRAD, mb),)
    if stage == last:
        return ((stage, K.FORWARD, mb),)
    later = (stage + 1, K.BACKWARD, mb)
    return ((stage, K.FORWARD, mb), later if later in where else (stage + 1, K.INPUT_GRAD, mb))


def error(
    schedule: _ir.Schedule, marks: dict[tuple[int, int], str], problem: str, fix: str
) -> _ir.ScheduleError:
    """A `ScheduleError` whose message is the problem, the marked grid, then the fix."""
    grid = _grid.error_grid(schedule, marks)
    return _ir.ScheduleError(f"{problem}\n{grid}\nFix: {fix}")
