"""`jaxpp train`: trains the example GPT on the synthetic language, pipelined or with jax.jit.

On a machine without an NVIDIA GPU it runs on 8 virtual CPU devices (it sets
`JAX_PLATFORMS=cpu` and `--xla_force_host_platform_device_count=8` unless already set).
With `-n N` it runs as N processes, like `jaxpp launch -n N -- jaxpp train ...`.

Example:
    >>> from jaxpp.cli import main
    >>> main(["train", "--help"])  # doctest: +SKIP
"""

import argparse
import os
import pathlib
import sys

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `train` command to the `jaxpp` parser."""
    parser = subparsers.add_parser(
        "train",
        help="train the example GPT on synthetic data",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages (default 4)")
    parser.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    parser.add_argument(
        "--schedule", default="1f1b", help="a built-in schedule name or a schedule file (.txt/.csv)"
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads")
    parser.add_argument("--scan-layers", action="store_true", help="one nn.scan over the blocks")
    parser.add_argument("--remat", action="store_true", help="recompute block activations")
    parser.add_argument("--tie-embeddings", action="store_true")
    parser.add_argument(
        "--attention", default="auto", help="jaxpp.kernels.attention implementation"
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--warmup", type=int, default=10, help="warmup steps (cosine)")
    parser.add_argument("--clip", type=float, default=1.0, help="global-norm clip; 0 disables")
    parser.add_argument("--executor", choices=("pipeline", "jit"), default="pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--checkpoint-dir", default=None, help="save checkpoints here (orbax, asynchronous)"
    )
    parser.add_argument(
        "--save-every", type=int, default=0, help="save every N steps (default: at the end)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint, if any"
    )
    launch = parser.add_argument_group("several processes (as jaxpp launch)")
    launch.add_argument(
        "-n", "--num-processes", type=int, default=1, help="local processes (default 1)"
    )
    launch.add_argument(
        "--devices-per-process", type=int, default=None, help="CPU devices or GPUs per process"
    )
    launch.add_argument(
        "--timeout", type=float, default=None, help="seconds before a silent process is lost"
    )
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Runs `jaxpp train` with parsed arguments; returns the exit code."""
    if args.num_processes > 1 and "JAXPP_PROCESS_ID" not in os.environ:
        return _relaunch(args)
    configure_devices()
    from jaxpp import _trainer
    from jaxpp.runtime import _coordination

    _coordination.initialize()  # a no-op unless launched as one of several processes

    try:
        config = _trainer.TrainConfig(
            num_stages=args.stages,
            num_microbatches=args.microbatches,
            schedule=args.schedule,
            steps=args.steps,
            dtype=args.dtype,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            num_layers=args.layers,
            d_model=args.d_model,
            num_heads=args.heads,
            vocab_size=args.vocab,
            num_kv_heads=args.kv_heads,
            scan_layers=args.scan_layers,
            remat=args.remat,
            tie_embeddings=args.tie_embeddings,
            attention=args.attention,
            learning_rate=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup,
            clip_norm=args.clip or None,
            executor=args.executor,
            seed=args.seed,
            log_every=args.log_every,
            checkpoint_dir=args.checkpoint_dir,
            save_every=args.save_every,
            resume=args.resume,
        )
        _trainer.train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"jaxpp train: error: {error}")
        return 2
    return 0


def _relaunch(args: argparse.Namespace) -> int:
    """`jaxpp train -n N ...`: runs this command as N processes under `jaxpp launch`."""
    from jaxpp.runtime import _coordination, _launch

    forwarded = []
    for action in args.parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in _LAUNCH_DESTS or value is None:
            continue
        if action.nargs == 0:  # a switch
            if value is True:
                forwarded.append(action.option_strings[-1])
        else:
            forwarded += [action.option_strings[-1], str(value)]
    try:
        return _launch.launch(
            [sys.executable, "-m", "jaxpp.cli", "train", *forwarded],
            num_processes=args.num_processes,
            devices_per_process=args.devices_per_process,
            timeout_s=args.timeout or _coordination.DEFAULT_TIMEOUT_S,
        )
    except ValueError as error:
        print(f"jaxpp train: error: {error}")
        return 2


_LAUNCH_DESTS = frozenset({"help", "num_processes", "devices_per_process", "timeout"})


def configure_devices(num_cpu_devices: int = 8) -> None:
    """Without an NVIDIA GPU: JAX on the CPU with `num_cpu_devices` virtual devices.

    Leaves settings the user made alone; call it before JAX creates its backends.
    """
    if _has_nvidia_gpu():
        return
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_platforms", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={num_cpu_devices}".strip()


def _has_nvidia_gpu() -> bool:
    return pathlib.Path("/dev/nvidiactl").exists() or pathlib.Path("/dev/nvidia0").exists()
