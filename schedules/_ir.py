"""The schedule IR: `Kind`, `Action`, `Schedule` and `ScheduleError`.

A schedule says, for each rank, the ordered list of actions it runs; an action is one
pass (`F`, `B`, `I` or `W`) of one stage on one microbatch. `Schedule.__post_init__`
checks only types and ranges; `validate` checks completeness and dependencies.
"""

import dataclasses
import enum
import re


class ScheduleError(ValueError):
    """A schedule (or its text) is malformed, incomplete, or cannot run.

    The message names the problem, the offending value and where it is, and the fix;
    schedule-level errors include the rank x step grid with the offending action marked.
    """


class Kind(enum.StrEnum):
    """The pass an action runs.

    `BACKWARD` is the full backward (input and weight gradients together); a schedule
    that splits the backward uses `INPUT_GRAD` then `WEIGHT_GRAD` instead.

    Example:
        >>> Kind("I"), str(Kind.WEIGHT_GRAD)
        (<Kind.INPUT_GRAD: 'I'>, 'W')
    """

    FORWARD = "F"
    BACKWARD = "B"
    INPUT_GRAD = "I"
    WEIGHT_GRAD = "W"


_ACTION_RE = re.compile(r"\s*(\d+)\s*([A-Za-z]+)\s*(\d+)\s*")


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Action:
    """One pass of one stage on one microbatch; written `<stage><kind><mb>`, e.g. `3I0`.

    Attributes:
        stage: the pipeline stage, `0 <= stage < num_stages`.
        kind: which pass (`Kind`; a one-letter string is accepted and converted).
        mb: the microbatch index, `0 <= mb < num_microbatches`.

    Example:
        >>> a = Action(3, "I", 0)
        >>> str(a), a.kind is Kind.INPUT_GRAD
        ('3I0', True)
    """

    stage: int
    kind: Kind
    mb: int

    def __post_init__(self) -> None:
        stage, mb = self.stage, self.mb
        if type(stage) is int and type(mb) is int and stage >= 0 and mb >= 0:
            if type(self.kind) is Kind:
                return  # the common case, kept cheap
        for name in ("stage", "mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ScheduleError(
                    f"Action {name}={value!r} must be an int >= 0. "
                    f"Fix: write e.g. Action(stage=0, kind=Kind.FORWARD, mb=0)."
                )
        if not isinstance(self.kind, Kind):
            try:
                object.__setattr__(self, "kind", Kind(self.kind))
            except ValueError:
                valid = ", ".join(k.value for k in Kind)
                raise ScheduleError(
                    f"Action kind={self.kind!r} is not one of {valid}. "
                    f"Fix: use Kind.FORWARD/BACKWARD/INPUT_GRAD/WEIGHT_GRAD or its letter."
                ) from None

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.mb}"


def parse_action(text: str) -> Action:
    """Parses one action written `<stage><kind><mb>`.

    Args:
        text: e.g. "3I0" (stage 3, input-grad, microbatch 0).

    Returns:
        The `Action`.

    Raises:
        ScheduleError: if malformed; the message shows a valid form.

    Example:
        >>> parse_action("3I0")
        Action(stage=3, kind=<Kind.INPUT_GRAD: 'I'>, mb=0)
    """
    match = _ACTION_RE.fullmatch(text)
    if match is None or match.group(2).upper() not in {k.value for k in Kind}:
        raise ScheduleError(
            f"cannot read action {text!r}. Fix: write <stage><kind><mb> with kind one of "
            f"F, B, I, W, e.g. '0F1' or '3I0'."
        )
    return Action(int(match.group(1)), Kind(match.group(2).upper()), int(match.group(3)))


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """Stage placement plus each rank's ordered actions.

    Lists are accepted and stored as tuples. Only types and ranges are checked here;
    `validate(schedule)` checks that it is complete and can run.

    Attributes:
        num_stages: number of pipeline stages.
        num_microbatches: number of microbatches.
        placement: `placement[stage]` is the rank that runs that stage.
        actions: `actions[rank]` is that rank's actions in the order it runs them.

    Example:
        >>> s = Schedule(2, 1, (0, 1), ((Action(0, "F", 0), Action(0, "B", 0)),
        ...                              (Action(1, "F", 0), Action(1, "B", 0))))
        >>> s.num_ranks, s.stages_of(1), s.uses_split_backward
        (2, (1,), False)
    """

    num_stages: int
    num_microbatches: int
    placement: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        for name in ("num_stages", "num_microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ScheduleError(f"Schedule {name}={value!r} must be an int >= 1.")
        placement = tuple(self.placement)
        actions = tuple(tuple(rank_actions) for rank_actions in self.actions)
        object.__setattr__(self, "placement", placement)
        object.__setattr__(self, "actions", actions)
        if not actions:
            raise ScheduleError("Schedule has no ranks. Fix: give at least one rank's actions.")
        if len(placement) != self.num_stages:
            raise ScheduleError(
                f"placement {placement} has {len(placement)} entries for "
                f"{self.num_stages} stages. Fix: give one rank per stage."
            )
        for stage, rank in enumerate(placement):
            if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < len(actions):
                raise ScheduleError(
                    f"placement[{stage}]={rank!r} is not a rank in 0..{len(actions) - 1}. "
                    f"Fix: place every stage on one of the {len(actions)} ranks."
                )
        for rank, rank_actions in enumerate(actions):
            for step, action in enumerate(rank_actions):
                if not isinstance(action, Action):
                    raise ScheduleError(
                        f"rank {rank} step {step}: {action!r} is not an Action. "
                        f"Fix: use Action(stage, kind, mb) or parse_action('0F0')."
                    )
                if action.stage >= self.num_stages or action.mb >= self.num_microbatches:
                    raise ScheduleError(
                        f"rank {rank} step {step}: {action} is out of range for "
                        f"{self.num_stages} stages and {self.num_microbatches} microbatches. "
                        f"Fix: use stages 0..{self.num_stages - 1} and "
                        f"microbatches 0..{self.num_microbatches - 1}."
                    )

    @property
    def num_ranks(self) -> int:
        """The number of ranks (`len(actions)`)."""
        return len(self.actions)

    @property
    def uses_split_backward(self) -> bool:
        """Whether any action is an input-grad `I` or weight-grad `W`."""
        return any(
            a.kind in (Kind.INPUT_GRAD, Kind.WEIGHT_GRAD) for acts in self.actions for a in acts
        )

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages placed on `rank`, ascending."""
        return tuple(s for s, r in enumerate(self.placement) if r == rank)
