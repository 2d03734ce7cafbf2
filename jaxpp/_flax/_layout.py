"""Stage layouts: how many layers each pipeline stage holds, from text or an even split.

Grammar (whitespace is ignored):

    layout := ["E"] stage ("|" stage)* ["L"]
    stage  := ("t" | "t" COUNT)*          e.g. "ttt" or "t3" (three layers)

`E` is the embedding (before the first layer, so in the first stage), `t` one
repeated layer, `|` a stage boundary, `L` the head (after the last layer, so in
the last stage). A stage may hold only `E` or only `L`; a stage with nothing in
it is an error. `"E tt|tt|tt|tt L"` is 4 stages of 2 layers.
"""

import dataclasses
import re

_TOKEN = re.compile(r"\s*(?:(?P<embed>E)|(?P<head>L)|(?P<bar>\|)|(?P<layer>t)(?P<count>\d*))")
GRAMMAR = '["E"] stage ("|" stage)* ["L"], stage := ("t" | "t<count>")*, e.g. "E tt|tt L"'


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Layers per pipeline stage; `str()` gives the layout text back.

    Example:
        >>> layout = parse_layout("E tt|t3 L")
        >>> layout.stage_sizes, layout.num_stages, layout.num_layers, layout.boundaries
        ((2, 3), 2, 5, (2,))
        >>> str(layout)
        'E tt|ttt L'
    """

    stage_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.stage_sizes or any(n < 0 for n in self.stage_sizes):
            raise ValueError(f"Layout: stage_sizes={self.stage_sizes} must be non-negative ints.")
        for stage, size in enumerate(self.stage_sizes):
            if size == 0 and 0 < stage < len(self.stage_sizes) - 1:
                raise ValueError(
                    f"layout {self}: stage {stage} is empty (no layers, not the first stage "
                    f"with the embedding nor the last with the head). Fix: remove a '|' or "
                    f"move a 't' into it."
                )
        if sum(self.stage_sizes) == 0:
            raise ValueError(f"layout {self}: has no layers ('t'). Fix: e.g. 'E tt|tt L'.")

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.stage_sizes)

    @property
    def num_layers(self) -> int:
        """Total number of layers over all stages."""
        return sum(self.stage_sizes)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """For each stage but the last, how many layers run before its end."""
        ends, total = [], 0
        for size in self.stage_sizes[:-1]:
            total += size
            ends.append(total)
        return tuple(ends)

    def __str__(self) -> str:
        return "E " + "|".join("t" * n for n in self.stage_sizes) + " L"


def parse_layout(text: str) -> Layout:
    """Parses a layout string such as `"E tt|tt|tt|tt L"` (see the module grammar).

    Args:
        text: the layout.

    Returns:
        The `Layout`.

    Raises:
        ValueError: for unknown characters, `E`/`L` out of place, an empty stage or no layers.

    Example:
        >>> parse_layout("E | t4 | L").stage_sizes
        (0, 4, 0)
    """
    sizes, position, seen_head = [0], 0, False
    text_stripped = text.rstrip()
    while position < len(text_stripped):
        match = _TOKEN.match(text_stripped, position)
        if match is None:
            bad = text_stripped[position:].lstrip()[:1]
            raise ValueError(
                f"layout {text!r}: unexpected {bad!r} at position {position}. Grammar: {GRAMMAR}."
            )
        if seen_head:
            raise ValueError(f"layout {text!r}: 'L' (the head) must come last. Fix: move it.")
        if match["embed"]:
            if position != 0:
                raise ValueError(
                    f"layout {text!r}: 'E' (the embedding) must come first. Fix: move it."
                )
        elif match["head"]:
            seen_head = True
        elif match["bar"]:
            sizes.append(0)
        else:
            count = int(match["count"]) if match["count"] else 1
            if count < 1:
                raise ValueError(f"layout {text!r}: 't{match['count']}' must count >= 1 layer.")
            sizes[-1] += count
        position = match.end()
    stages = tuple(sizes)
    if stages[0] == 0 and "E" not in text and len(stages) > 1:
        raise ValueError(f"layout {text!r}: stage 0 is empty. Fix: remove the leading '|'.")
    if stages[-1] == 0 and "L" not in text and len(stages) > 1:
        raise ValueError(f"layout {text!r}: the last stage is empty. Fix: remove the final '|'.")
    return Layout(stages)


def even_layout(num_layers: int, num_stages: int) -> Layout:
    """Splits `num_layers` over `num_stages` as evenly as possible (earlier stages get extras).

    Raises:
        ValueError: if there are fewer layers than stages.

    Example:
        >>> str(even_layout(5, 2))
        'E ttt|tt L'
    """
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1.")
    if num_layers < num_stages:
        raise ValueError(
            f"cannot split {num_layers} layers into {num_stages} stages: a stage would be "
            f"empty. Fix: use num_stages <= {num_layers}, or a layout string such as "
            f"'E | {'t' * num_layers} | L' to give the embedding and head their own stages."
        )
    base, extra = divmod(num_layers, num_stages)
    return Layout(tuple(base + (stage < extra) for stage in range(num_stages)))
