"""The `jaxpp` command line: `jaxpp schedule ...`, `jaxpp train ...`, `jaxpp launch ...`.

Example:
    >>> main(["--help"])  # doctest: +SKIP
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the `jaxpp` command line and returns its exit code."""
    parser = argparse.ArgumentParser(prog="jaxpp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for register in _command_registrars():
        register(commands)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _command_registrars() -> list:
    """The subcommands; each module adds its parser and sets `run`."""
    registrars = []
    try:
        from jaxpp import _cli_schedule
    except ImportError:  # written by the schedules work; absent until then
        pass
    else:
        registrars.append(_cli_schedule.register)
    try:
        from jaxpp import _cli_train
    except ImportError:
        pass
    else:
        registrars.append(_cli_train.register)
    try:
        from jaxpp import _cli_launch
    except ImportError:
        pass
    else:
        registrars.append(_cli_launch.register)
    try:
        from jaxpp import _cli_bench
    except ImportError:
        pass
    else:
        registrars.append(_cli_bench.register)
    return registrars


if __name__ == "__main__":
    sys.exit(main())
