"""Tests for the built-in schedule builders: validity, closed forms, memory, errors, goldens."""

import pathlib

import pytest

from jaxpp.schedules import (
    BUILTINS,
    ZBV,
    Costs,
    DualPipeV,
    Eager1F1B,
    GPipe,
    Interleaved1F1B,
    Kind,
    LoopedBFS,
    ScheduleBuilder,
    Std1F1B,
    ZeroBubble,
    ZeroBubbleH2,
    format_schedule,
    get_builder,
    parse,
    simulate,
    validate,
)

GOLDEN = pathlib.Path(__file__).parent / "golden"
UNIT_SPLIT = Costs(forward=1, backward=2, input_grad=1, weight_grad=1)
_PER_RANK = {
    "zbv": (2,),
    "dualpipev": (2,),
    "interleaved-1f1b": (1, 2, 3, 4),
    "looped-bfs": (1, 2, 3, 4),
}


def _bubble_time(sim) -> float:
    """Idle time per rank (bubble fraction x makespan)."""
    return sim.bubble * sim.makespan


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builder_grid_validates_or_raises_documented_error(name):
    cls = BUILTINS[name]
    for ranks in range(1, 9):
        for per_rank in _PER_RANK.get(name, (1,)):
            builder = cls(ranks * per_rank, ranks=ranks)
            assert isinstance(builder, ScheduleBuilder)
            assert (builder.num_stages, builder.num_ranks, builder.name) == (
                ranks * per_rank,
                ranks,
                name,
            )
            for m in range(1, 33):
                if m < builder.min_microbatches():
                    with pytest.raises(
                        ValueError, match=f"Fix: use num_microbatches >= {2 * ranks - 1}"
                    ):
                        builder.build(m)
                    continue
                schedule = validate(builder.build(m))
                assert schedule.placement == builder.placement()
                assert schedule.num_microbatches == m


def test_dualpipev_min_microbatches_is_documented():
    assert DualPipeV(8).min_microbatches() == 7
    with pytest.raises(ValueError, match="needs at least 7 microbatches, got 6"):
        DualPipeV(8).build(6)


@pytest.mark.parametrize("cls", [GPipe, Std1F1B])
@pytest.mark.parametrize(("p", "m"), [(2, 3), (4, 8), (4, 6), (5, 16), (8, 8)])
def test_bubble_gpipe_and_1f1b_match_closed_form(cls, p, m):
    sim = simulate(cls(p).build(m))
    assert sim.bubble == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(
    ("p", "v", "m"),
    [(2, 2, 4), (4, 2, 8), (4, 3, 16), (4, 4, 4), (8, 2, 16), (4, 2, 7), (8, 3, 13)],
)
def test_bubble_interleaved_matches_closed_form_for_any_m_at_least_p(p, v, m):
    sim = simulate(Interleaved1F1B(p * v, ranks=p).build(m))
    assert sim.bubble == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize(("p", "m"), [(4, 8), (4, 16), (8, 32)])
def test_bubble_zb_h1_about_a_third_of_1f1b(p, m):
    zb = simulate(ZeroBubble(p).build(m), UNIT_SPLIT)
    one_f_one_b = simulate(Std1F1B(p).build(m), UNIT_SPLIT)
    assert _bubble_time(one_f_one_b) == pytest.approx(3 * (p - 1))
    assert _bubble_time(zb) == pytest.approx((p - 1), rel=0.1)


@pytest.mark.parametrize(
    "make", [lambda p: ZeroBubbleH2(p), lambda p: ZBV(2 * p), lambda p: DualPipeV(2 * p)]
)
def test_bubble_zero_bubble_schedules_vanish_as_microbatches_grow(make):
    p = 4
    bubbles = [simulate(make(p).build(m), UNIT_SPLIT).bubble for m in (8, 16, 32, 64)]
    assert all(later < earlier for earlier, later in zip(bubbles, bubbles[1:], strict=False))
    assert bubbles[-1] < 0.03


def test_bubble_zbv_beats_1f1b_at_equal_memory():
    p, m = 4, 16
    zbv = simulate(
        ZBV(2 * p).build(m), Costs(forward=0.5, backward=1, input_grad=0.5, weight_grad=0.5)
    )
    one = simulate(Std1F1B(p).build(m), UNIT_SPLIT)
    assert zbv.bubble < one.bubble / 3
    # ZBV's activations are half-stages: 2p of them weigh as much as 1F1B's p.
    assert max(zbv.peak_activations) == 2 * p


@pytest.mark.parametrize(("p", "m"), [(4, 8), (3, 2), (6, 12)])
def test_peak_activations_1f1b_rank_r_holds_p_minus_r(p, m):
    sim = simulate(Std1F1B(p).build(m))
    assert sim.peak_activations == tuple(float(min(p - r, m)) for r in range(p))


@pytest.mark.parametrize(("p", "m"), [(4, 8), (3, 2)])
def test_peak_activations_gpipe_holds_m(p, m):
    assert simulate(GPipe(p).build(m)).peak_activations == (float(m),) * p


def test_peak_activations_eager_1f1b_rank_r_holds_2p_minus_2r_minus_1():
    p, m = 4, 16
    sim = simulate(Eager1F1B(p).build(m))
    assert sim.peak_activations == tuple(float(2 * (p - r) - 1) for r in range(p))


def test_peak_activations_zb_h2_is_2p_minus_1_and_zb_h1_is_p():
    p, m = 4, 16
    assert max(simulate(ZeroBubbleH2(p).build(m)).peak_activations) == 2 * p - 1
    assert max(simulate(ZeroBubble(p).build(m)).peak_activations) == p


def test_looped_bfs_runs_every_forward_before_any_backward():
    schedule = LoopedBFS(8, ranks=4).build(4)
    for row in schedule.actions:
        kinds = [a.kind for a in row]
        assert kinds == sorted(kinds, key=lambda k: k is not Kind.FORWARD)


def test_v_placement_puts_first_and_last_stage_on_rank_0():
    for cls in (ZBV, DualPipeV):
        assert cls(8).placement() == (0, 1, 2, 3, 3, 2, 1, 0)
        assert cls(8).num_ranks == 4


def test_split_backward_schedules_use_i_and_w():
    for builder in (ZeroBubble(4), ZeroBubbleH2(4), ZBV(8), DualPipeV(8)):
        assert builder.build(8).uses_split_backward
    for builder in (
        GPipe(4),
        Std1F1B(4),
        Eager1F1B(4),
        Interleaved1F1B(8, ranks=4),
        LoopedBFS(8, ranks=4),
    ):
        assert not builder.build(8).uses_split_backward


@pytest.mark.parametrize(
    ("make", "fix"),
    [
        (lambda: Std1F1B(4, ranks=2), r"Fix: Std1F1B\(2, ranks=2\)"),
        (lambda: ZBV(7), r"Fix: use a multiple of 2 stages, e.g. ZBV\(6\)"),
        (lambda: ZBV(8, ranks=3), r"Fix: ZBV\(6, ranks=3\)"),
        (lambda: Interleaved1F1B(6, ranks=4), r"Fix: use a multiple of 4 stages"),
        (lambda: GPipe(0), "must be an int >= 1"),
        (lambda: LoopedBFS(4, ranks=0), "must be an int >= 1"),
    ],
)
def test_builder_bad_shape_raises_with_fix(make, fix):
    with pytest.raises(ValueError, match=fix):
        make()


def test_build_bad_microbatch_count_raises():
    with pytest.raises(ValueError, match="num_microbatches=0 must be an int >= 1"):
        Std1F1B(2).build(0)


def test_builders_are_frozen_hashable_values():
    assert Std1F1B(4) == Std1F1B(4, ranks=4)
    assert len({ZBV(8), ZBV(8, ranks=4), GPipe(4)}) == 2
    with pytest.raises(AttributeError):
        Std1F1B(4).num_stages = 3  # type: ignore[misc]


def test_get_builder_finds_names_and_class_names():
    assert get_builder("1f1b", 4) == Std1F1B(4)
    assert get_builder("Interleaved1F1B", 8, ranks=4) == Interleaved1F1B(8, ranks=4)
    assert len(BUILTINS) == 9


def test_get_builder_typo_lists_valid_names():
    with pytest.raises(ValueError, match=r"Did you mean 'zbv'\? Fix: use one of gpipe, 1f1b"):
        get_builder("zvb", 8)


@pytest.mark.parametrize(
    ("filename", "builder"),
    [
        ("1f1b_p4_m8.txt", Std1F1B(4)),
        ("interleaved-1f1b_p4_v2_m8.txt", Interleaved1F1B(8, ranks=4)),
        ("zb-h1_p4_m8.txt", ZeroBubble(4)),
        ("zbv_p4_m8.txt", ZBV(8)),
        ("dualpipev_p4_m8.txt", DualPipeV(8)),
    ],
)
def test_golden_schedule_text_matches_builder(filename, builder):
    golden = (GOLDEN / filename).read_text()
    schedule = builder.build(8)
    assert format_schedule(schedule) == golden
    assert parse(golden) == schedule
