"""`jaxpp launch`: runs a program as N local processes of one `jax.distributed` run.

Example:
    >>> from jaxpp.cli import main
    >>> main(["launch", "--help"])  # doctest: +SKIP
"""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `launch` command to the `jaxpp` parser."""
    parser = subparsers.add_parser(
        "launch",
        help="run a program as N local processes (jax.distributed, loopback coordinator)",
        description=__doc__.splitlines()[0],
        epilog="example: jaxpp launch -n 4 -- python train.py --steps 10",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="processes")
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        help="virtual CPU devices (no GPU: default 1) or GPUs (default: all, split evenly)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds without a heartbeat before a process counts as lost (default 30)",
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--no-prefix", action="store_true", help="do not prefix output lines with [process id]"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- program and arguments")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs `jaxpp launch` with parsed arguments; returns the exit code."""
    from jaxpp.runtime import _coordination, _launch

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        return _launch.launch(
            command,
            num_processes=args.num_processes,
            devices_per_process=args.devices_per_process,
            timeout_s=args.timeout or _coordination.DEFAULT_TIMEOUT_S,
            port=args.port,
            prefix_output=not args.no_prefix,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"jaxpp launch: error: {error}")
        return 2
