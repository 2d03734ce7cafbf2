"""The builder protocol and the 1F1B family: GPipe, 1F1B, Eager 1F1B, interleaved, looped BFS.

Every builder is a frozen dataclass `Builder(num_stages, *, ranks=None)` whose
`build(num_microbatches)` returns a `Schedule`. Stage `s` sits on rank `s % ranks`
(looped placement) unless the builder says otherwise (the V schedules).
"""

import dataclasses
from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

from jaxpp.schedules import _ir

K = _ir.Kind


@runtime_checkable
class ScheduleBuilder(Protocol):
    """What every schedule builder offers (the built-ins and user-written ones).

    Example:
        >>> from jaxpp.schedules import Std1F1B
        >>> isinstance(Std1F1B(4), ScheduleBuilder)
        True
    """

    @property
    def num_stages(self) -> int: ...

    @property
    def num_ranks(self) -> int: ...

    @property
    def name(self) -> str: ...

    def build(self, num_microbatches: int) -> _ir.Schedule: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Builder:
    """Shared checks: stage count, rank count, microbatch count, placement."""

    num_stages: int
    ranks: int | None = dataclasses.field(default=None, kw_only=True)

    name: ClassVar[str] = ""
    # Stages each rank holds: a fixed number, or None for "any divisor" (then ranks
    # defaults to num_stages / 2 for an even stage count: two virtual stages per rank,
    # what "interleaved" means; an odd count defaults to one stage per rank).
    _stages_per_rank: ClassVar[int | None] = 1

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if (
            not isinstance(self.num_stages, int)
            or isinstance(self.num_stages, bool)
            or (self.num_stages < 1)
        ):
            raise ValueError(f"{cls}: num_stages={self.num_stages!r} must be an int >= 1.")
        per_rank = self._stages_per_rank
        if self.ranks is None:
            if per_rank is not None and self.num_stages % per_rank:
                raise ValueError(
                    f"{cls}({self.num_stages}): {self.num_stages} stages cannot be split "
                    f"{per_rank} per rank. Fix: use a multiple of {per_rank} stages, e.g. "
                    f"{cls}({per_rank * max(1, self.num_stages // per_rank)})."
                )
            if per_rank is None:
                default = self.num_stages // 2 if self.num_stages % 2 == 0 else self.num_stages
            else:
                default = self.num_stages // per_rank
            object.__setattr__(self, "ranks", default)
        ranks = self.ranks
        if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
            raise ValueError(f"{cls}: ranks={ranks!r} must be an int >= 1.")
        if per_rank is not None and self.num_stages != per_rank * ranks:
            raise ValueError(
                f"{cls}({self.num_stages}, ranks={ranks}): this schedule puts exactly "
                f"{per_rank} stage(s) on each rank, so it needs num_stages = {per_rank} * ranks. "
                f"Fix: {cls}({per_rank * ranks}, ranks={ranks})."
            )
        if self.num_stages % ranks:
            raise ValueError(
                f"{cls}({self.num_stages}, ranks={ranks}): {self.num_stages} stages do not "
                f"split evenly over {ranks} ranks. Fix: use a multiple of {ranks} stages, "
                f"e.g. {cls}({ranks * max(1, self.num_stages // ranks)}, ranks={ranks})."
            )

    @property
    def num_ranks(self) -> int:
        """The number of ranks (pipeline depth)."""
        return self.ranks  # type: ignore[return-value]  # set in __post_init__

    @property
    def virtual_stages(self) -> int:
        """Stages per rank."""
        return self.num_stages // self.num_ranks

    def placement(self) -> tuple[int, ...]:
        """`placement[stage]` = rank; looped (`stage % ranks`) unless overridden."""
        return tuple(stage % self.num_ranks for stage in range(self.num_stages))

    def min_microbatches(self) -> int:
        """The fewest microbatches this schedule can run."""
        return 1

    def build(self, num_microbatches: int) -> _ir.Schedule:
        """Builds the schedule for `num_microbatches` microbatches.

        Raises:
            ValueError: if the count is below what the schedule supports; the message says
                the minimum and the fix.
        """
        m = num_microbatches
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"{type(self).__name__}: num_microbatches={m!r} must be an int >= 1.")
        least = self.min_microbatches()
        if m < least:
            raise ValueError(
                f"{self!r} needs at least {least} microbatches, got {m}. Fix: use "
                f"num_microbatches >= {least}, or a schedule without this limit (e.g. "
                f"Std1F1B or GPipe)."
            )
        actions = tuple(tuple(row) for row in self._all_rank_actions(m))
        return _ir.Schedule(self.num_stages, m, self.placement(), actions)

    def _all_rank_actions(self, m: int) -> Sequence[Sequence[_ir.Action]]:
        return [self._rank_actions(rank, m) for rank in range(self.num_ranks)]

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        raise NotImplementedError


def _one_f_one_b(
    rank: int,
    num_ranks: int,
    virtual: int,
    round_sizes: Sequence[int],
    warmup: int,
) -> list[_ir.Action]:
    """Warm-up forwards, then (F, B) pairs, then the remaining backwards.

    Forwards go round by round; within a round, local stage 0 for every microbatch of the
    round, then local stage 1, ...; backwards the same with local stages reversed.
    """
    forwards, backwards = [], []
    first = 0
    for size in round_sizes:
        mbs = range(first, first + size)
        first += size
        for local in range(virtual):
            forwards.extend(_ir.Action(local * num_ranks + rank, K.FORWARD, mb) for mb in mbs)
        for local in reversed(range(virtual)):
            backwards.extend(_ir.Action(local * num_ranks + rank, K.BACKWARD, mb) for mb in mbs)
    warmup = min(warmup, len(forwards))
    out = forwards[:warmup]
    for forward, backward in zip(forwards[warmup:], backwards, strict=False):
        out += [forward, backward]
    out += backwards[len(forwards) - warmup :]
    return out


def round_sizes(num_microbatches: int, num_ranks: int) -> tuple[int, ...]:
    """Splits microbatches into rounds of at least `num_ranks` (the first ones one larger).

    Example:
        >>> round_sizes(10, 4), round_sizes(8, 4), round_sizes(3, 4)
        ((5, 5), (4, 4), (3,))
    """
    rounds = max(1, num_microbatches // num_ranks)
    base, extra = divmod(num_microbatches, rounds)
    return tuple(base + (i < extra) for i in range(rounds))


@dataclasses.dataclass(frozen=True, slots=True)
class GPipe(_Builder):
    """GPipe: every forward, then every backward; each rank holds all `m` activations.

    Example:
        >>> s = GPipe(2).build(2)
        >>> [str(a) for a in s.actions[0]]
        ['0F0', '0F1', '0B0', '0B1']
    """

    name: ClassVar[str] = "gpipe"

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        return [_ir.Action(rank, K.FORWARD, mb) for mb in range(m)] + [
            _ir.Action(rank, K.BACKWARD, mb) for mb in range(m)
        ]


@dataclasses.dataclass(frozen=True, slots=True)
class Std1F1B(_Builder):
    """1F1B (PipeDream-flush): rank r runs p-r forwards, then alternates B and F.

    Peak in-flight activations on rank r: `min(p - r, m)`.

    Example:
        >>> s = Std1F1B(2).build(3)
        >>> [str(a) for a in s.actions[0]]
        ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
    """

    name: ClassVar[str] = "1f1b"

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        return _one_f_one_b(rank, self.num_ranks, 1, (m,), self.num_ranks - rank - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class Eager1F1B(_Builder):
    """Eager 1F1B (JaxPP): like 1F1B, but rank r first runs `2(p-r)-1` forwards.

    The extra in-flight forwards let transfers overlap compute; peak activations on rank r
    are `min(2(p-r)-1, m)`.

    Example:
        >>> s = Eager1F1B(2).build(4)
        >>> [str(a) for a in s.actions[0]]
        ['0F0', '0F1', '0F2', '0B0', '0F3', '0B1', '0B2', '0B3']
    """

    name: ClassVar[str] = "eager-1f1b"

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        return _one_f_one_b(rank, self.num_ranks, 1, (m,), 2 * (self.num_ranks - rank - 1))


@dataclasses.dataclass(frozen=True, slots=True)
class Interleaved1F1B(_Builder):
    """Interleaved 1F1B (Megatron virtual stages): v = stages/ranks looped stages per rank.

    Microbatches go in rounds of about `ranks` (`round_sizes`); rank r warms up with
    `(v-1) * round + 2(p-1-r)` forwards. Any `m >= 1` works; for `m >= p` (a multiple of
    p or not) and F=1, B=2 the bubble is `(p-1)/(v*m+p-1)`. With v = 1 this is `Std1F1B`.
    Without `ranks`, an even stage count gets two stages per rank (`Interleaved1F1B(8)`
    runs on 4 ranks), as does `LoopedBFS`.

    Example:
        >>> s = Interleaved1F1B(4, ranks=2).build(2)
        >>> [str(a) for a in s.actions[1]]
        ['1F0', '1F1', '3F0', '3B0', '3F1', '3B1', '1B0', '1B1']
    """

    name: ClassVar[str] = "interleaved-1f1b"
    _stages_per_rank: ClassVar[int | None] = None

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        p, v = self.num_ranks, self.virtual_stages
        if v == 1:
            return _one_f_one_b(rank, p, 1, (m,), p - rank - 1)
        rounds = round_sizes(m, p)
        warmup = (v - 1) * rounds[0] + 2 * (p - 1 - rank)
        return _one_f_one_b(rank, p, v, rounds, warmup)


@dataclasses.dataclass(frozen=True, slots=True)
class LoopedBFS(_Builder):
    """Looped breadth-first: each rank runs all forwards of its first stage, then its next
    stage, ..., then all backwards, last stage first. Holds `v*m` activations.

    Example:
        >>> s = LoopedBFS(4, ranks=2).build(2)
        >>> [str(a) for a in s.actions[0]]
        ['0F0', '0F1', '2F0', '2F1', '2B0', '2B1', '0B0', '0B1']
    """

    name: ClassVar[str] = "looped-bfs"
    _stages_per_rank: ClassVar[int | None] = None

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        stages = range(rank, self.num_stages, self.num_ranks)
        out = [_ir.Action(s, K.FORWARD, mb) for s in stages for mb in range(m)]
        return out + [_ir.Action(s, K.BACKWARD, mb) for s in reversed(stages) for mb in range(m)]
