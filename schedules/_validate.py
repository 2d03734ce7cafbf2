"""`validate`: the full check that a schedule is complete, well placed, and can run."""

from jaxpp.schedules import _ir, _simulate


def validate(schedule: _ir.Schedule) -> _ir.Schedule:
    """Checks that `schedule` is complete, each stage on one rank, and free of deadlock.

    Every (stage, microbatch) needs exactly one F and either one B or one I and one W;
    every action must be on its stage's rank; each rank runs its list in order, and some
    such run must satisfy the dependency rules (see `jaxpp.schedules` README).

    Args:
        schedule: the schedule to check.

    Returns:
        The same schedule, so `validate(parse(text))` reads naturally.

    Raises:
        ScheduleError: the first problem, with the rank x step grid, the offending action
            marked, and the fix.

    Example:
        >>> from jaxpp.schedules import parse
        >>> validate(parse("stages 1 microbatches 1\\nrank 0: 0B0 0F0"))
        Traceback (most recent call last):
        ...
        jaxpp.schedules._ir.ScheduleError: deadlock: rank 0 step 0: 0B0 needs 0F0, ...
    """
    _simulate.run_in_time(schedule, _simulate.Costs())
    return schedule
