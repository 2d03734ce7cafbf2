"""Schedules with a split backward (I = input grad, W = weight grad): ZB-H1, ZB-H2, ZBV, DualPipeV.

The weight-grad passes depend on nothing downstream, so they can wait and fill the idle
slots that a full backward would leave (Qi et al., "Zero Bubble Pipeline Parallelism",
2024). ZBV and DualPipeV put two stages on each rank in a V: rank r holds stages r and
2p-1-r, so the first and the last stage share rank 0.
"""

import collections
import dataclasses
from collections.abc import Sequence
from typing import ClassVar

from jaxpp.schedules import _builders, _ir

K = _ir.Kind


@dataclasses.dataclass(frozen=True, slots=True)
class ZeroBubble(_builders._Builder):
    """ZB-H1: 1F1B with the backward split; rank r delays its first W by r steps.

    Rank r runs `p-r` forwards, then `r` pairs (I, F), then repeats (I, W, F). Peak
    activations are at most p (as 1F1B's rank 0); with F=I=W the bubble is about a third
    of 1F1B's.

    Example:
        >>> s = ZeroBubble(2).build(3)
        >>> [str(a) for a in s.actions[1]]
        ['1F0', '1I0', '1F1', '1I1', '1W0', '1F2', '1I2', '1W1', '1W2']
    """

    name: ClassVar[str] = "zb-h1"

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        p = self.num_ranks
        queues = {
            kind: collections.deque(_ir.Action(rank, kind, mb) for mb in range(m))
            for kind in (K.FORWARD, K.INPUT_GRAD, K.WEIGHT_GRAD)
        }
        out = [queues[K.FORWARD].popleft() for _ in range(min(p - rank, m))]
        for _ in range(rank):
            for kind in (K.INPUT_GRAD, K.FORWARD):
                if queues[kind]:
                    out.append(queues[kind].popleft())
        cycle = (K.INPUT_GRAD, K.WEIGHT_GRAD, K.FORWARD)
        while any(queues.values()):
            for kind in cycle:
                if queues[kind]:
                    out.append(queues[kind].popleft())
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class ZeroBubbleH2(_builders._Builder):
    """ZB-H2: a greedy fill with a memory limit of `2p-1` activations on every rank.

    The builder simulates the pipeline with unit costs (F = I = W = 1): whenever a rank is
    free it runs, in this priority, a ready I, a ready F if it holds fewer than `2p-1`
    activations (F run, W not yet), else its oldest pending W. The extra warm-up forwards
    fill the start-up bubble and the deferred W passes fill the drain: with F = I = W the
    only idle time left is the `p-1` slots of the pipeline's fill (the paper's
    "parallelogram", which closes up across training steps), so the bubble goes to 0 as
    m grows. Peak activations `2p-1`, about twice 1F1B's.

    Example:
        >>> s = ZeroBubbleH2(2).build(3)
        >>> [str(a) for a in s.actions[0]]
        ['0F0', '0F1', '0F2', '0I0', '0W0', '0I1', '0W1', '0I2', '0W2']
    """

    name: ClassVar[str] = "zb-h2"

    def _all_rank_actions(self, m: int) -> Sequence[Sequence[_ir.Action]]:
        p = self.num_ranks
        return greedy_fill(p, m, (2 * p - 1,) * p)


def greedy_fill(
    num_ranks: int, num_microbatches: int, limits: Sequence[int]
) -> tuple[tuple[_ir.Action, ...], ...]:
    """Orders one-stage-per-rank actions by simulating unit-cost passes greedily.

    Each free rank runs a ready I, else a ready F while under its activation limit, else
    its oldest pending W, else waits for the next pass to finish somewhere.

    Args:
        num_ranks: ranks = stages (stage r on rank r).
        num_microbatches: microbatches.
        limits: per rank, the most activations (F run, W not yet) it may hold; >= 1.

    Returns:
        Per rank, its actions in the order it runs them.

    Example:
        >>> [[str(a) for a in rank] for rank in greedy_fill(2, 1, (1, 1))]
        [['0F0', '0I0', '0W0'], ['1F0', '1I0', '1W0']]
    """
    p, m = num_ranks, num_microbatches
    never = float("inf")
    f_end = [[never] * m for _ in range(p)]  # when F(rank, mb) ends
    i_end = [[never] * m for _ in range(p)]
    next_f, next_i, held, free_at = [0] * p, [0] * p, [0] * p, [0] * p
    pending_w: list[collections.deque[int]] = [collections.deque() for _ in range(p)]
    orders: list[list[_ir.Action]] = [[] for _ in range(p)]
    remaining = 3 * p * m
    time = 0
    while remaining:
        for rank in range(p):
            if free_at[rank] > time:
                continue
            mb = next_i[rank]
            if (
                mb < next_f[rank]
                and f_end[rank][mb] <= time
                and (rank == p - 1 or i_end[rank + 1][mb] <= time)
            ):
                next_i[rank] += 1
                pending_w[rank].append(mb)
                i_end[rank][mb] = time + 1
                action = _ir.Action(rank, K.INPUT_GRAD, mb)
            elif (
                next_f[rank] < m
                and held[rank] < limits[rank]
                and (rank == 0 or f_end[rank - 1][next_f[rank]] <= time)
            ):
                mb = next_f[rank]
                next_f[rank] += 1
                held[rank] += 1
                f_end[rank][mb] = time + 1
                action = _ir.Action(rank, K.FORWARD, mb)
            elif pending_w[rank]:
                held[rank] -= 1
                action = _ir.Action(rank, K.WEIGHT_GRAD, pending_w[rank].popleft())
            else:
                continue
            orders[rank].append(action)
            free_at[rank] = time + 1
            remaining -= 1
        later = [t for t in free_at if t > time]
        assert later, "greedy_fill cannot progress; bug in jaxpp"
        time = min(later)
    return tuple(tuple(o) for o in orders)


@dataclasses.dataclass(frozen=True, slots=True)
class ZBV(_builders._Builder):
    """ZB-V: two stages per rank in a V (rank r holds stages r and 2p-1-r), split backward.

    Rank r runs `2(p-r)-1` forwards of its first stage, `r` pairs (F second, F first),
    `p-r` triples (F, I, W) of its second stage, then the steady state F I W on each
    stage in turn, then drains I passes and W passes. With F = I = W the bubble goes to 0
    as m grows, at 1F1B's activation memory (2p half-size activations on rank 0).
    `m < 2p-1` works by building for `2p-1` and leaving out the extra microbatches.

    Example:
        >>> s = ZBV(4, ranks=2).build(2)
        >>> s.placement, [str(a) for a in s.actions[1]][:4]
        ((0, 1, 1, 0), ['1F0', '2F0', '1F1', '2F1'])
    """

    name: ClassVar[str] = "zbv"
    _stages_per_rank: ClassVar[int | None] = 2

    def placement(self) -> tuple[int, ...]:
        """V placement: stage s on rank s for the first half, `2p-1-s` for the second."""
        return v_placement(self.num_ranks)

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        p = self.num_ranks
        n = max(m, 2 * p - 1)
        first, second = rank, 2 * p - 1 - rank
        count: dict[tuple[int, K], int] = collections.defaultdict(int)
        out: list[_ir.Action] = []

        def add(stage: int, kind: K) -> None:
            out.append(_ir.Action(stage, kind, count[(stage, kind)]))
            count[(stage, kind)] += 1

        for _ in range(2 * (p - rank) - 1):
            add(first, K.FORWARD)
        for _ in range(rank):
            add(second, K.FORWARD)
            add(first, K.FORWARD)
        for _ in range(p - rank):
            for kind in (K.FORWARD, K.INPUT_GRAD, K.WEIGHT_GRAD):
                add(second, kind)
        while count[(second, K.FORWARD)] < count[(first, K.FORWARD)] or (
            count[(first, K.FORWARD)] < n
        ):
            if count[(first, K.FORWARD)] < n:
                add(first, K.FORWARD)
            add(first, K.INPUT_GRAD)
            add(first, K.WEIGHT_GRAD)
            for kind in (K.FORWARD, K.INPUT_GRAD, K.WEIGHT_GRAD):
                add(second, kind)
        for _ in range(rank):
            add(first, K.INPUT_GRAD)
            add(second, K.INPUT_GRAD)
        for _ in range(p - rank):
            add(first, K.INPUT_GRAD)
            add(first, K.WEIGHT_GRAD)
        for stage in (second, first):
            while count[(stage, K.WEIGHT_GRAD)] < count[(stage, K.INPUT_GRAD)]:
                add(stage, K.WEIGHT_GRAD)
        return [a for a in out if a.mb < m]


@dataclasses.dataclass(frozen=True, slots=True)
class DualPipeV(_builders._Builder):
    """DualPipeV (DeepSeek's DualPipe cut in half): V placement, F/B of two microbatches paired.

    Per rank r (stages r and 2p-1-r, called 0 and 1): F0 x 2(p-r-1); (F0 F1) x (r+1);
    (I1 W1 F1) x (p-r-1); then the main loop (F0 B1 F1 B0) x (m-2p+r+1) where DualPipe
    overlaps each F with the B beside it; (B1 F1 B0) x (p-r-1); (B1 B0) x (r+1), the
    second half split into I; (W I0) x (p-r-1); then the remaining W passes, oldest first.
    Here an overlapped pair is two actions in a row. Needs `m >= 2p - 1`.

    Example:
        >>> s = DualPipeV(4, ranks=2).build(4)
        >>> [str(a) for a in s.actions[1]][:6]
        ['1F0', '2F0', '1F1', '2F1', '1F2', '2B0']
    """

    name: ClassVar[str] = "dualpipev"
    _stages_per_rank: ClassVar[int | None] = 2

    def placement(self) -> tuple[int, ...]:
        """V placement: stage s on rank s for the first half, `2p-1-s` for the second."""
        return v_placement(self.num_ranks)

    def min_microbatches(self) -> int:
        """DualPipeV's main loop needs `2 * ranks - 1` microbatches."""
        return 2 * self.num_ranks - 1

    def _rank_actions(self, rank: int, m: int) -> Sequence[_ir.Action]:
        p = self.num_ranks
        s0, s1 = rank, 2 * p - 1 - rank
        next_f = {s0: 0, s1: 0}
        next_b = {s0: 0, s1: 0}
        weights: collections.deque[_ir.Action] = collections.deque()
        out: list[_ir.Action] = []

        def forward(stage: int) -> None:
            out.append(_ir.Action(stage, K.FORWARD, next_f[stage]))
            next_f[stage] += 1

        def backward(stage: int, *, split: bool = False) -> None:
            mb = next_b[stage]
            next_b[stage] += 1
            if split:
                out.append(_ir.Action(stage, K.INPUT_GRAD, mb))
                weights.append(_ir.Action(stage, K.WEIGHT_GRAD, mb))
            else:
                out.append(_ir.Action(stage, K.BACKWARD, mb))

        for _ in range(2 * (p - rank - 1)):
            forward(s0)
        for _ in range(rank + 1):
            forward(s0)
            forward(s1)
        for _ in range(p - rank - 1):
            backward(s1, split=True)
            out.append(weights.popleft())
            forward(s1)
        for _ in range(m - 2 * p + rank + 1):
            forward(s0)
            backward(s1)
            forward(s1)
            backward(s0)
        for _ in range(p - rank - 1):
            backward(s1)
            forward(s1)
            backward(s0)
        steps = rank + 1
        split = False
        for i in range(steps):
            if i == steps // 2 and rank % 2 == 1:
                split = True
            backward(s1, split=split)
            if i == steps // 2 and rank % 2 == 0:
                split = True
            backward(s0, split=split)
        for _ in range(p - rank - 1):
            out.append(weights.popleft())
            backward(s0, split=True)
        out.extend(weights)
        return out


def v_placement(num_ranks: int) -> tuple[int, ...]:
    """Stage -> rank for a V over `num_ranks` ranks: 0, 1, ..., p-1, p-1, ..., 1, 0.

    Example:
        >>> v_placement(3)
        (0, 1, 2, 2, 1, 0)
    """
    return tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))
