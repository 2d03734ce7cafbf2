"""Layout strings: parsing, printing, even splits, and the errors for bad layouts."""

import pytest

from jaxpp.flax import Layout, even_layout, parse_layout


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("E tt|tt|tt|tt L", (2, 2, 2, 2)),
        ("tt|t", (2, 1)),
        ("E t3 | t2t L", (3, 3)),
        ("E | tttt | L", (0, 4, 0)),
        ("  E\ttt|tt  L  ", (2, 2)),
        ("tttt", (4,)),
    ],
)
def test_parse_layout_valid_text_gives_stage_sizes_and_round_trips(text, sizes):
    layout = parse_layout(text)
    assert layout.stage_sizes == sizes
    assert parse_layout(str(layout)) == layout


def test_layout_boundaries_count_layers_before_each_stage_end():
    assert parse_layout("E | t|ttt | L").boundaries == (0, 1, 4)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("E tt||tt L", r"stage 1 is empty.*Fix: remove a '\|'"),
        ("E tx L", r"unexpected 'x' at position 3.*Grammar"),
        ("tt E", r"'E' \(the embedding\) must come first"),
        ("E tt L t", r"'L' \(the head\) must come last"),
        ("|tt", r"stage 0 is empty.*Fix: remove the leading"),
        ("tt|", r"the last stage is empty.*Fix: remove the final"),
        ("E L", r"has no layers"),
        ("t0", r"must count >= 1 layer"),
    ],
)
def test_parse_layout_bad_text_raises_naming_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_layout(text)


def test_even_layout_spreads_extras_over_the_first_stages():
    assert even_layout(7, 3).stage_sizes == (3, 2, 2)
    assert even_layout(4, 4).stage_sizes == (1, 1, 1, 1)


def test_even_layout_more_stages_than_layers_raises_with_fix():
    with pytest.raises(ValueError, match=r"cannot split 2 layers into 3 stages.*Fix"):
        even_layout(2, 3)


def test_layout_negative_size_raises():
    with pytest.raises(ValueError, match="must be non-negative"):
        Layout((2, -1))
