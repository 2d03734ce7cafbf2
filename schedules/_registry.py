"""The built-in schedules by name, and `get_builder`."""

import difflib
import types

from jaxpp.schedules import _builders, _zero_bubble

BUILTINS: types.MappingProxyType[str, type[_builders._Builder]] = types.MappingProxyType(
    {
        cls.name: cls
        for cls in (
            _builders.GPipe,
            _builders.Std1F1B,
            _builders.Eager1F1B,
            _builders.Interleaved1F1B,
            _builders.LoopedBFS,
            _zero_bubble.ZeroBubble,
            _zero_bubble.ZeroBubbleH2,
            _zero_bubble.ZBV,
            _zero_bubble.DualPipeV,
        )
    }
)


def get_builder(name: str, num_stages: int, ranks: int | None = None) -> _builders.ScheduleBuilder:
    """The built-in builder called `name` (or its class name), for `num_stages` stages.

    Args:
        name: a key of `BUILTINS` (e.g. "1f1b", "zbv") or a class name ("Std1F1B").
        num_stages: number of stages.
        ranks: number of ranks; the builder's default when None.

    Raises:
        ValueError: unknown name; the message lists the valid ones.

    Example:
        >>> get_builder("interleaved-1f1b", 8, ranks=4)
        Interleaved1F1B(num_stages=8, ranks=4)
        >>> get_builder("ZBV", 8).num_ranks
        4
    """
    return builder_class(name)(num_stages, ranks=ranks)


def builder_class(name: str) -> type[_builders._Builder]:
    """The built-in builder class called `name` (a `BUILTINS` key or a class name).

    Raises:
        ValueError: unknown name; the message lists the valid ones.

    Example:
        >>> builder_class("1F1B").__name__, builder_class("Std1F1B").name
        ('Std1F1B', '1f1b')
    """
    key = name.strip().lower()
    by_class = {cls.__name__.lower(): cls for cls in BUILTINS.values()}
    cls = BUILTINS.get(key) or by_class.get(key)
    if cls is None:
        close = difflib.get_close_matches(key, [*BUILTINS, *by_class], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown schedule {name!r}.{hint} Fix: use one of {', '.join(BUILTINS)}.")
    return cls
