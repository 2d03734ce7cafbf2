"""`jaxpp bench pipeline`: pipelined training (jaxpp) vs the best SPMD layout (jax.jit).

Every configuration trains the same GPT step from the same parameters and batch; its
first-step loss must match the single-device reference before it is timed (median of
`--steps` steps after `--warmup`). Results go to `--out` (JSON, rewritten after every
configuration, so a cut-off run keeps what it measured), with a markdown table (.md)
and a bar chart (.png) beside it. Names of configurations: see `jaxpp._bench._configs`.

Memory: every configuration gets a predicted peak per device (`jaxpp._bench._memory`,
shown by `--list`); one predicted not to fit is skipped with a `predicted OOM: X GiB > Y
GiB` row instead of compiling (`--no-memory-gate` runs it anyway). SPMD steps are compiled
before they run and skipped too if XLA's own `memory_analysis()` exceeds the limit; rows
record that estimate and the measured peaks. The limit is what JAX may allocate: by
default 0.75 of the GPU (105 GiB of an H200; XLA's rematerialization aims at 0.95 of it),
so the commands below set `XLA_PYTHON_CLIENT_MEM_FRACTION=0.9` (126 GiB) for both sides.

Observability: every process prints timestamped, flushed phase lines (seconds since the
call began), and rows keep them in `phase_seconds`:

    [+41.2s] jaxpp/zb-h1/pp4/mb32/noremat: compile+first step ...
    [+118.9s] jaxpp/zb-h1/pp4/mb32/noremat: compile+first step 77.7 s

Phases: setup (startup = Python and imports of a child, backend, ceilings, reference),
then per configuration init (state and batch placed), compile (SPMD) or trace (the jaxpp
compiler; XLA compiles its task programs during "compile+first step"), first step,
warm-up, steps, profile. `--isolate` relays its children's lines as they come. With
one-device ranks "compile+first step" begins with phase "precompile" (every task program
compiled ahead, one thread per rank): a progress line every 30 s (programs done per
rank), then a summary line (per rank seconds/programs, the slowest program), kept in the
row's `precompile` (a `timeout` row keeps the last such line in `precompile_progress`):

    [+71.0s] jaxpp/zb-h1/pp4/mb32/noremat: precompile: 9/24 programs after 30 s; r0 3/6, ...
    [+112.5s] jaxpp/zb-h1/pp4/mb32/noremat: precompile: 24 programs, 71.4 s wall, 4 threads;
        slowest 1W@1 20.3 s; per rank: r0 52.0 s/6, r1 71.2 s/6, ...

A child stopped by `--config-timeout` or SIGTERM first gets SIGUSR1 and prints every
thread's stack (faulthandler, up to 3 s, relayed into the log), so a `timeout` row (phase
e.g. "compile+first step > precompile") comes with where each thread was.

Fixed costs: `--isolate` children share a JAX persistent compilation cache (`--cache-dir`,
default /tmp/jaxpp-bench-cache; jax puts XLA:GPU's per-fusion autotune cache in its
`xla_gpu_per_fusion_autotune_cache_dir` subfolder), so a program compiled by one child
(a stage's forward task is the same under 1F1B and ZB-H1) or an earlier call is loaded,
not compiled. On 8 CPU devices (narrow 40-layer GPT, zb-h1/pp4/mb32, a loaded machine)
compile+first step took 16.5-24.6 s without the cache and 5.5-7.8 s with it warm, and
1F1B after ZB-H1 6.6 s vs 12.4 s. The reference loss and ceilings are measured once per
results file and reused by later calls with the same `--out` (same model, seed and
attention); `--reference-loss` and `--ceilings` give them for a fresh file.
`--config-timeout S` stops a child after S seconds with a `timeout` row naming the phase
it was in; SIGTERM to the parent (the driver's `timeout`) does the same for the running one.

On the GPU machine: the device tool allows 10 minutes per command and about 30 minutes
per session, and a machine left idle goes cold (its /tmp, with the cache, is lost). On
that machine `jaxpp` is not installed: `source benchmarks/gpu_env.sh` in the repository
root, then run `python3 -m jaxpp.cli bench ...` from outside it (`cd /tmp`: the root's bare
`./jaxpp` would shadow the package tree; `--isolate` children already run in an empty
folder). `benchmarks/pipeline_gpu_run.sh bench` does all that, keeps results and cache in
/tmp across calls on the same warm machine, copies the results to $OUT (the traces as one
traces.tgz), and carries the compilation cache across machines: it unpacks
`benchmarks/.bench_cache/bench_cache.tgz.*` (an ignored path; 15 MiB parts, since the
device tool returns files of at most 16 MiB) into the cache first if present, copies
`benchmarks/.bench_cache/results/*.json` (earlier calls' rows) into its results, and
packs the cache into `$OUT/bench_cache.tgz.00, .01, ...` at the end (only XLA's autotune
subfolder if the whole is over 45 MiB). Between calls the lead copies
`$files_at/bench_cache.tgz.*` and `$files_at/bench_*xgpu.json` (into `results/`) to
`benchmarks/.bench_cache/` and passes `carry=["benchmarks/.bench_cache"]`.

Measured (4x H200, 8B; `benchmarks/results/pipeline_2026-11-22_s10/callA_4xh200/` holds every
row so far): spmd/fsdp4/acc4/noremat@overlap 39,648 tokens/s (1.653 s), without @overlap
37,963; spmd/tp4/acc4/noremat@overlap 36,947 (1.774 s; at fraction 0.75, below);
jaxpp/dualpipev/pp4/mb16/noremat 35,939 (0.906x), zbv mb16 35,635 (0.899x), zb-h1 mb16 35,126
(0.886x), zb-h1 mb32 32,217, interleaved-1f1b mb32 31,868, 1f1b mb32 30,872; zbv/pp2-dp2/mb16
ran out of memory (the estimate then said 112.6 GiB; refitted since: 150.5),
zb-h1/pp2-tp2/mb16 did not finish compiling ahead within 248 s (10 of 12 programs),
spmd/fsdp2-tp2/acc4/noremat@overlap did not finish compiling within 246 s. **TP4 under
`@overlap` at fraction 0.9 computes a wrong first-step loss** (8.41171 vs 11.2175, one of the 4
accumulated microbatch losses lost); at 0.9 it is right without the preset and right with the
preset minus `--xla_gpu_enable_pipelined_all_reduce` (session 10, `tp_loss_check.py`), so
XLA:GPU's pipelined all-reduce under that memory limit is what breaks it. Measured
(2x H200, 2B; `results/pipeline_2026-11-22_s7/call3_2xh200/` holds every row):
spmd/fsdp2/acc2/noremat@overlap 85,107 (0.770 s); jaxpp/dualpipev/pp2/mb8/noremat 72,926
(0.857x), zbv mb8 72,774, zb-h1 mb8 70,653, mb16 rows 66,651-67,673, zbv mb4 with remat 61,960
(session 10, `results/pipeline_2026-11-22_s10/callC_2xh200/`), zbv mb32 59,116; the
scanned SPMD layouts (`-scan`) ran 1.31x slower than unrolled (fsdp2-scan 1.011 s, dp2-scan
1.279, tp2-scan 1.365): do not use them as baselines. Costs per configuration: SPMD init 8-15
s + compile 100 s (2B) / 167-212 s (8B) unrolled + steps 10-20 s; jaxpp init 10-25 s + trace
5-15 s + precompile 56-124 s (one-device ranks; pp2-dp2 201 s compiling ahead with
`JAXPP_PRECOMPILE=all`) + steps and profile 15-35 s.

What is left to measure (calls of <= 9.5 min; predicted GiB per device in brackets, limit
126 at fraction 0.9, 105 at 0.75), each a call of its own on nvidia-h200-x4 (8B):

    # every bench call starts with (the device tool carries no environment between calls):
    export BENCH_MODEL=8b BENCH_DEVICES=4 BENCH_LIMIT=540 BENCH_CONFIG_TIMEOUT=300
    export BENCH_ARGS="--steps 10 --warmup 1 --reference-loss 11.2175"
    # before the first call: cp benchmarks/results/pipeline_2026-11-22_s10/callA_4xh200/
    #   bench_8b_4xgpu.json benchmarks/.bench_cache/results/   (so the table holds all rows)
    # after each call: cp $files_at/bench_cache.tgz.* and $files_at/bench_8b_4xgpu.json into
    # benchmarks/.bench_cache/ (the JSON into results/), carry=["benchmarks/.bench_cache"]
    # the last SPMD TP baseline, at fraction 0.75 (TP rows under @overlap are wrong at 0.9:
    # README "Session 10"); its compile alone took over 246 s:
    C=spmd/fsdp2-tp2/acc4/noremat@overlap  # [82.4]
    BENCH_MEM_FRACTION=0.75 BENCH_CONFIG_TIMEOUT=540 BENCH_CONFIGS=$C \
        bash benchmarks/pipeline_gpu_run.sh bench
    # the 2-stage jaxpp candidates:
    C=jaxpp/zbv/pp2-fsdp2/mb16/noremat  # [91.6]
    JAXPP_PRECOMPILE=all BENCH_CONFIGS=$C bash benchmarks/pipeline_gpu_run.sh bench
    C=jaxpp/zb-h1/pp2-tp2/mb16/noremat  # [90.3]; compiled 10 of 12 programs in 248 s
    BENCH_CONFIG_TIMEOUT=540 JAXPP_PRECOMPILE=all BENCH_CONFIGS=$C \
        bash benchmarks/pipeline_gpu_run.sh bench

On nvidia-h200-x2 (2B; BENCH_MODEL=2b BENCH_DEVICES=2, --reference-loss 10.90778), the rows
still missing: the unrolled DP baseline (and TP, at BENCH_MEM_FRACTION=0.75) and the rest of
jaxpp's schedules (one call, ~500 s): spmd/dp2/acc2/noremat@overlap, spmd/tp2/acc2/noremat@overlap,
jaxpp/interleaved-1f1b/pp2/mb8/noremat, jaxpp/1f1b/pp2/mb8/noremat; then bigger microbatches
(mb32 -> mb16 -> mb8 gained 12% and 8%): jaxpp/zbv/pp2/mb4/noremat [~110] (its remat twin
ran 61,960 tokens/s in session 10, 0.851x ZBV mb8 without remat: the recompute costs more than
the larger microbatch wins). In every call read each row's `precompile_misses` (0 expected),
measured peak against the estimate, and each SPMD row's `collectives`. The same by hand,
without the driver:

    source benchmarks/gpu_env.sh && cd /tmp && export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
    python3 -m jaxpp.cli bench pipeline --model 8b --devices 4 --isolate \
        --config-timeout 260 --out /tmp/jaxpp-bench-results/bench_8b_4xgpu.json \
        --configs spmd/fsdp4/acc4/noremat@overlap,jaxpp/zbv/pp4/mb16/noremat

With more device time, sweep by flags instead (`--only spmd|jaxpp`, `--schedules`,
`--layouts`, `--microbatches`, `--accumulations`, `--remat on|off|off,on`).
Start with `--list` to see (and time-budget) the configurations, and `--configs a,b` to
rerun single ones. On a machine without a GPU it runs on 8 virtual CPU devices:

    jaxpp bench pipeline --model tiny --devices 4 \
        --configs spmd/fsdp4/acc1/noremat,jaxpp/1f1b/pp4/mb4/noremat

Example:
    >>> from jaxpp.cli import main
    >>> main(["bench", "pipeline", "--help"])  # doctest: +SKIP
"""

import argparse
import dataclasses
import faulthandler
import os
import pathlib
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

_REMAT = {"on": (True,), "off": (False,), "off,on": (False, True), "on,off": (False, True)}
CACHE_ENV = "JAXPP_BENCH_CACHE_DIR"
DUMP_SIGNAL = signal.SIGUSR1  # makes an --isolate child print every thread's stack
DUMP_SECONDS = 3.0  # how long the parent waits for that dump before ending the child
# The preset fields the reference loss depends on (not the sweep's microbatch counts).
_REFERENCE_FIELDS = (
    "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff", "vocab_size", "seq_len",
    "global_batch", "dtype",
)  # fmt: skip


def _default_cache_dir() -> str:
    default = pathlib.Path(tempfile.gettempdir(), "jaxpp-bench-cache")
    return os.environ.get(CACHE_ENV) or str(default)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `bench` command (sub-command `pipeline`) to the `jaxpp` parser."""
    bench = subparsers.add_parser("bench", help="throughput benchmarks", description="benchmarks")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    parser = kinds.add_parser(
        "pipeline",
        help="jaxpp schedules vs SPMD jax.jit layouts on the GPT",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--model", choices=("tiny", "2b", "8b"), default="tiny")
    parser.add_argument("--devices", type=int, default=None, help="default: all visible")
    parser.add_argument("--only", choices=("spmd", "jaxpp"), default=None)
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated configuration names, e.g. spmd/fsdp4-scan/acc4/noremat@overlap,"
        "jaxpp/zbv/pp2-dp2/mb16/noremat (forms: jaxpp._bench._configs)",
    )
    parser.add_argument("--schedules", default=None, help="jaxpp schedules (default: all five)")
    parser.add_argument("--layouts", default=None, help="e.g. fsdp4,dp2-tp2 or pp4,pp2-tp2")
    parser.add_argument("--microbatches", default=None, help="jaxpp microbatch counts, e.g. 8,16")
    parser.add_argument("--accumulations", default=None, help="SPMD accumulation counts, e.g. 1,4")
    parser.add_argument("--remat", choices=tuple(_REMAT), default="off,on")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--attention", default="auto", help="jaxpp.kernels.attention impl")
    parser.add_argument(
        "--accumulate",
        choices=("scan", "treduce"),
        default="scan",
        help="SPMD gradient accumulation: lax.scan (one compiled body) or treduce (unrolled)",
    )
    parser.add_argument("--out", default=None, help="results JSON (.md and .png beside it)")
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the configurations with their predicted peak memory, run none",
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="usable memory per device (GiB) for the OOM gate; default: what JAX reports "
        "(bytes_limit), for --list --device-kind x XLA_PYTHON_CLIENT_MEM_FRACTION (0.75)",
    )
    parser.add_argument(
        "--device-kind", choices=("h200", "h100"), default="h200", help="for --list"
    )
    parser.add_argument(
        "--no-memory-gate",
        action="store_true",
        help="run configurations even when predicted not to fit (default: skip them)",
    )
    parser.add_argument(
        "--isolate", action="store_true", help="each configuration in its own process"
    )
    parser.add_argument(
        "--config-timeout",
        type=float,
        default=None,
        metavar="S",
        help="with --isolate: stop a configuration's process after S seconds and record a "
        "`timeout` row naming the phase it was in, then go on",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="JAX persistent compilation cache (XLA:GPU's per-fusion autotune cache goes in "
        f"its subfolder); 'off' disables. Default with --isolate: ${CACHE_ENV} or "
        f"{_default_cache_dir()}, shared by the children; without: off",
    )
    parser.add_argument(
        "--reference-loss",
        type=float,
        default=None,
        help="the single-device first-step loss, if known (default: from --out when it "
        "holds one for the same model, seed and attention, else measured once)",
    )
    parser.add_argument(
        "--ceilings",
        default=None,
        metavar="TFLOPS,GBPS",
        help="bf16 matmul TFLOP/s and memory GB/s of the device, if known (default: from "
        "--out when measured on the same device kind, else measured once)",
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help=argparse.SUPPRESS
    )  # measure the reference loss and ceilings into --out, run nothing (used by --isolate)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Runs `jaxpp bench pipeline` with parsed arguments; returns the exit code."""
    from jaxpp._bench import _configs

    dump_stacks_on_signal()

    try:
        configs = _select(args, _configs)
    except ValueError as e:
        args.parser.error(str(e))
    out = args.out or f"benchmarks/results/bench_{args.model}_{args.devices or 'all'}dev.json"
    if args.memory_gib is not None and args.memory_gib <= 0:
        args.parser.error(f"--memory-gib {args.memory_gib} must be > 0.")
    if args.config_timeout is not None and not args.isolate:
        args.parser.error(
            "--config-timeout needs --isolate (a configuration is stopped by ending its "
            "process). Fix: add --isolate --devices N."
        )
    if args.config_timeout is not None and args.config_timeout <= 0:
        args.parser.error(f"--config-timeout {args.config_timeout} must be > 0 seconds.")
    try:
        args.ceilings_given = _ceilings(args.ceilings)
    except ValueError as e:
        args.parser.error(str(e))
    if args.list:
        _list(args, configs)
        return 0
    if not configs:
        args.parser.error("no configuration fits the flags. Fix: check --list and relax them.")
    if args.isolate:
        return _run_isolated(args, configs, out)
    for config in configs:  # (the reference and ceilings alone need no preset)
        if missing_xla_flags(config) and not args.prepare_only:
            args.parser.error(
                f"{config.name} runs with the XLA flag preset {config.xla!r}, which this process "
                f"was started without (XLA reads its flags once per process). Fix: add --isolate "
                f"(each configuration in its own process, with its flags)."
            )
    from jaxpp import _cli_train

    _cli_train.configure_devices(max(8, args.devices or 0))
    return _run_here(args, configs, out)


def dump_stacks_on_signal(environ: dict[str, str] | None = None) -> bool:
    """In an `--isolate` child (`SPAWNED_ENV` set): `DUMP_SIGNAL` prints every thread's
    stack to stderr, which the parent relays, so a configuration it stops comes with where
    it was. Returns whether it registered (False outside a child).

    Example:
        >>> dump_stacks_on_signal({})
        False
    """
    from jaxpp._bench import _phases

    environ = os.environ if environ is None else environ
    if not environ.get(_phases.SPAWNED_ENV):
        return False
    faulthandler.register(DUMP_SIGNAL, all_threads=True)
    return True


def _list(args: argparse.Namespace, configs: tuple) -> None:
    """One line per configuration: name, predicted peak GiB per device, fits or not."""
    from jaxpp._bench import _configs, _memory

    preset = _configs.PRESETS[args.model]
    if args.memory_gib is not None:
        limit, origin = args.memory_gib * _memory.GIB, "--memory-gib"
    else:
        limit = _memory.usable_bytes(args.device_kind)
        origin = f"{args.device_kind} x XLA_PYTHON_CLIENT_MEM_FRACTION"
    print(f"# predicted peak memory per device; limit {limit / _memory.GIB:.1f} GiB ({origin})")
    width = max(len(c.name) for c in configs)
    for config in configs:
        found = _memory.estimate(config, preset)
        verdict = "fits" if found.total <= limit else "predicted OOM"
        print(f"{config.name:<{width}}  {found.total / _memory.GIB:6.1f} GiB  {verdict}")


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"{flag} {text!r}: expected comma-separated integers, e.g. 8,16."
        ) from None
    if min(values) < 1:
        raise ValueError(f"{flag} {text!r}: counts must be >= 1.")
    return values


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def _select(args: argparse.Namespace, _configs) -> tuple:
    preset = _configs.PRESETS[args.model]
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices {args.devices} must be >= 1.")
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps {args.steps} and --warmup {args.warmup} must be >= 1.")
    if args.isolate and args.devices is None:
        raise ValueError("--isolate needs --devices N (the parent process does not start JAX).")
    num_devices = args.devices
    if num_devices is None:
        from jaxpp import _cli_train

        _cli_train.configure_devices()
        import jax

        num_devices = jax.device_count()
    if args.configs:
        configs = tuple(_configs.parse_config(n) for n in _names(args.configs))
        for config in configs:
            problem = _configs.fit_problem(config, preset, num_devices)
            if problem:
                raise ValueError(
                    f"configuration {config.name} cannot run the {preset.name} model: {problem}. "
                    f"Fix: see `jaxpp bench pipeline --model {preset.name} --devices "
                    f"{num_devices} --list` for the ones that can."
                )
        return configs
    return _configs.sweep(
        preset,
        num_devices,
        only=args.only,
        schedules=_names(args.schedules) or _configs.SCHEDULES,
        microbatches=_ints(args.microbatches, "--microbatches"),
        accumulations=_ints(args.accumulations, "--accumulations"),
        remat=_REMAT[args.remat],
        layouts=_names(args.layouts),
    )


def _run_isolated(args: argparse.Namespace, configs: tuple, out: str) -> int:
    """Runs each configuration as `jaxpp bench pipeline --configs NAME` in a new process.

    The children run in an empty directory (`python -m jaxpp.cli` from a folder holding
    a bare `./jaxpp`, such as the repository root on the GPU machine, would import that
    instead of the package tree), with `--out` made absolute and, when this process
    imported jaxpp from a package tree, that tree first on PYTHONPATH. They share one
    compilation cache (`--cache-dir`), and their output is relayed line by line as it
    comes. A first child measures the reference loss and ceilings unless `--out` (or the
    flags) already hold them. A child that runs past `--config-timeout`, or is still
    running when this process gets SIGTERM (`timeout` around the whole call), is ended
    and gets a `timeout` row naming the phase it was in.
    """
    from jaxpp._bench import _phases, _report

    origin = time.time()
    clock = _phases.PhaseClock("bench", origin=origin)
    out = str(pathlib.Path(out).resolve())
    cache = args.cache_dir or _default_cache_dir()
    common = [
        sys.executable, "-m", "jaxpp.cli", "bench", "pipeline", "--model", args.model,
        "--devices", str(args.devices), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--attention", args.attention, "--accumulate", args.accumulate, "--out", out,
        "--cache-dir", cache,
    ]  # fmt: skip
    if args.memory_gib is not None:
        common += ["--memory-gib", str(args.memory_gib)]
    if args.no_memory_gate:
        common.append("--no-memory-gate")
    if args.reference_loss is not None:
        common += ["--reference-loss", repr(args.reference_loss)]
    if args.ceilings is not None:
        common += ["--ceilings", args.ceilings]
    env = child_environment()
    env[_phases.ORIGIN_ENV] = repr(origin)
    env["PYTHONUNBUFFERED"] = "1"
    clock.say(f"{len(configs)} configuration(s), cache {cache}, out {out}")
    stop = _StopOnSignal()
    previous = signal.signal(signal.SIGTERM, stop.handle)
    failed = 0
    try:
        with tempfile.TemporaryDirectory(prefix="jaxpp-bench-") as cwd:
            if _needs_prepare(args, out):
                prepare = [*common, "--configs", configs[0].name, "--prepare-only"]
                child = _run_child(prepare, env=env, cwd=cwd, timeout=None, stop=stop)
                if child.returncode:
                    clock.say(f"reference/ceilings failed (exit {child.returncode}) in "
                              f"{child.phase}")  # fmt: skip
                    return 1
            else:
                clock.say("reference loss and ceilings: reused (from --out or the flags)")
            for config in configs:
                if stop.stopped:
                    break
                command = command_for(common, config.name)
                started = time.perf_counter()
                child = _run_child(command, env=with_xla_flags(env, config.xla_flags), cwd=cwd,
                                   timeout=args.config_timeout, stop=stop)  # fmt: skip
                elapsed = time.perf_counter() - started
                clock.say(f"{config.name} exit {child.returncode} after {elapsed:.1f} s; "
                          f"{_cache_size(cache)}")  # fmt: skip
                row = None
                if child.stopped_in is not None and child.verdict is not None:
                    # Ended while finishing (tables, plot) after it wrote its row: keep it.
                    clock.say(f"{config.name}: ended after its verdict ({child.verdict}) while "
                              f"finishing; its row stands")  # fmt: skip
                elif child.stopped_in is not None:
                    why = "--config-timeout" if not stop.stopped else "SIGTERM to the bench"
                    limit = f" {args.config_timeout:g} s" if not stop.stopped else ""
                    error = f"stopped by {why}{limit} after {elapsed:.1f} s"
                    error += f", in phase {child.stopped_in}"
                    row = _child_row(config, "timeout", child.stopped_in, child, error)
                elif child.returncode < 0:  # killed (e.g. out of host memory): no row
                    error = f"process died by signal {-child.returncode} in phase {child.phase}"
                    row = _child_row(config, "failed", child.phase, child, error)
                if row is not None:
                    _report.add_row(out, row, preset=args.model)
                failed += child.returncode != 0
    except _Stopped:  # between two children: nothing to end
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    _finish(args, out)
    return 1 if failed or stop.stopped else 0


def command_for(common: list[str], name: str) -> list[str]:
    """The command line of the child that runs configuration `name`.

    Example:
        >>> command_for(["python"], "spmd/dp2/acc1/noremat")
        ['python', '--configs', 'spmd/dp2/acc1/noremat']
    """
    return [*common, "--configs", name]


class _StopOnSignal:
    """SIGTERM handler of the `--isolate` parent: raises `_Stopped` once, remembers it."""

    def __init__(self) -> None:
        self.stopped = False

    def handle(self, signum: int, frame: object) -> None:
        if not self.stopped:
            self.stopped = True
            raise _Stopped(f"signal {signum}")


class _Stopped(Exception):
    """The `--isolate` parent was asked to stop (SIGTERM)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Child:
    returncode: int
    phase: str  # the phase it was in last ("after X" between phases, "A > B" nested)
    phase_seconds: dict
    stopped_in: str | None  # the phase it was in when ended by a timeout or SIGTERM
    precompile: str | None = None  # its last "precompile: ..." line (progress or summary)
    verdict: str | None = None  # "ok", "wrong", "failed" or "skipped" once it wrote its row


def _child_row(config, status: str, phase: str | None, child, error: str) -> dict:
    """The result row of a child that did not finish: `status`, the phase it was in."""
    row = {
        "name": config.name,
        "kind": config.kind,
        "status": status,
        "phase": phase,
        "phase_seconds": child.phase_seconds,
        "error": error,
    }
    if child.precompile is not None:
        row["precompile_progress"] = child.precompile
    return row


class _PhaseTracker:
    """The phase a child is in, from its phase lines; a phase started while another of
    the same label is open is nested in it ("compile+first step > precompile").

    Example:
        >>> from jaxpp._bench import _phases
        >>> tracker = _PhaseTracker()
        >>> for text in ("c: compile+first step ...", "c: precompile ...", "c: precompile 2 s"):
        ...     tracker.see(_phases.parse_line(f"[+1.0s] {text}"))
        >>> tracker.phase, tracker.seconds
        ('compile+first step > after precompile', {'precompile': 2.0})
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[tuple[str, str]] = []  # (label, phase), outermost first
        self._done: str | None = None  # the last phase that ended inside the open ones

    @property
    def phase(self) -> str:
        names = [p for _, p in self._open]
        if self._done is not None:
            names.append(f"after {self._done}")
        return " > ".join(names) or "startup"

    def see(self, found) -> None:
        """Takes one parsed phase line (`_phases.PhaseLine`)."""
        if found.seconds is None:  # a start
            if self._open and self._open[-1][0] != found.label:
                self._open = []
            self._open.append((found.label, found.phase))
            self._done = None
            return
        self.seconds[found.phase] = found.seconds
        key = (found.label, found.phase)
        if key in self._open:
            del self._open[self._open.index(key) :]
        self._done = found.phase


def _run_child(
    command: list[str], *, env: dict, cwd: str, timeout: float | None, stop: _StopOnSignal
) -> _Child:
    """Runs `command`, relaying its output as it comes; ends it (its whole process group)
    after `timeout` seconds or on `_Stopped`, after asking it for its threads' stacks
    (`DUMP_SIGNAL`) and relaying them."""
    from jaxpp._bench import _phases

    env = {**env, _phases.SPAWNED_ENV: repr(time.time())}
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    tracker, stopped_in, precompile, verdict, ended = _PhaseTracker(), None, None, None, False
    try:
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise TimeoutError
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                ended = True
                break
            sys.stdout.write(line)
            sys.stdout.flush()
            found = _phases.parse_line(line)
            if found is not None:
                tracker.see(found)
            precompile = _phases.precompile_text(line) or precompile
            verdict = _phases.verdict(line) or verdict
        returncode = process.wait()
    except (TimeoutError, _Stopped):
        stopped_in = tracker.phase
        returncode, ended = _stop_child(process, lines)
    if not ended:
        _relay(lines, until=time.monotonic() + 5)
    reader.join(timeout=5)
    process.stdout.close()
    return _Child(returncode, tracker.phase, tracker.seconds, stopped_in, precompile, verdict)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _relay(lines: queue.Queue, *, until: float, quiet: float | None = None) -> bool:
    """Relays `lines` until the time `until`, their end (returns True), or, with `quiet`,
    `quiet` seconds without a line once one came."""
    seen = False
    while (left := until - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, quiet) if seen and quiet else left)
        except queue.Empty:
            if seen and quiet:
                return False
            continue
        if line is None:
            return True
        seen = True
        sys.stdout.write(line)
        sys.stdout.flush()
    return False


def _stop_child(process: subprocess.Popen, lines: queue.Queue) -> tuple[int, bool]:
    """Asks the child for its threads' stacks and relays them (up to `DUMP_SECONDS`), then
    ends it (`_end`); returns its exit status and whether its output ended. A SIGTERM to
    this process meanwhile (at most one `_Stopped`) does not cut it short."""
    ended = False
    try:
        os.kill(process.pid, DUMP_SIGNAL)
        ended = _relay(lines, until=time.monotonic() + DUMP_SECONDS, quiet=0.5)
    except ProcessLookupError:
        pass
    except _Stopped:
        pass
    try:
        return _end(process), ended
    except _Stopped:
        return _end(process), ended


def _end(process: subprocess.Popen) -> int:
    """Ends `process` and its children: SIGTERM, then SIGKILL after 5 s (with the stack
    dump before it, within the `timeout --kill-after=10` of the GPU driver)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def _needs_prepare(args: argparse.Namespace, out: str) -> bool:
    """Whether a first child must measure the reference loss or ceilings for `out`."""
    from jaxpp._bench import _configs, _report, _run

    data = _report.load(out, preset=args.model)
    problem = _run.Problem(preset=_configs.PRESETS[args.model])
    has_reference = args.reference_loss is not None or (
        _reusable_reference(data, problem.preset, problem.seed, args.attention) is not None
    )
    has_ceilings = args.ceilings is not None or "ceilings" in data
    return not (has_reference and has_ceilings)


def _reusable_reference(data: dict, preset, seed: int, attention: str) -> float | None:
    """The reference loss in a results file if it was measured for this model (all preset
    fields), seed and attention implementation, else None.

    Example:
        >>> from jaxpp._bench import _configs
        >>> tiny = _configs.PRESETS["tiny"]
        >>> model = {k: getattr(tiny, k) for k in tiny.__slots__ if k != "name"}
        >>> data = {"reference_loss": 4.2, "seed": 0, "attention": "xla", "model": model}
        >>> _reusable_reference(data, tiny, 0, "xla"), _reusable_reference(data, tiny, 1, "xla")
        (4.2, None)
    """
    model = data.get("model", {})
    same_model = all(model.get(k) == getattr(preset, k) for k in _REFERENCE_FIELDS)
    same = same_model and data.get("seed", 0) == seed and data.get("attention") == attention
    return data.get("reference_loss") if same else None


def _ceilings(text: str | None) -> dict | None:
    """`--ceilings TFLOPS,GBPS` as the ceilings dict of the results file.

    Example:
        >>> _ceilings("800,4300")
        {'matmul_bf16_tflops': 800.0, 'hbm_bytes_per_s': 4300000000000.0}
    """
    if text is None:
        return None
    try:
        tflops, gbps = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"--ceilings {text!r}: expected two numbers, bf16 matmul TFLOP/s and memory GB/s, "
            f"e.g. --ceilings 807,4287."
        ) from None
    if tflops <= 0 or gbps <= 0:
        raise ValueError(f"--ceilings {text!r}: both must be > 0.")
    return {"matmul_bf16_tflops": tflops, "hbm_bytes_per_s": gbps * 1e9}


def _cache_size(cache: str) -> str:
    files = [p for p in pathlib.Path(cache).rglob("*") if p.is_file()]
    return f"cache {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.0f} MiB"


def child_environment(environ: dict | None = None) -> dict[str, str]:
    """The environment of an `--isolate` child: `environ` (default `os.environ`), with the
    directory holding this process's `jaxpp` first on PYTHONPATH when that directory is a
    whole package tree (`jaxpp/schedules` inside it, as `benchmarks/gpu_env.sh` builds).

    An editable or regular install is left to the child's own import system: its root
    (the repository) holds a bare `jaxpp/` that must not shadow the install.

    Example:
        >>> "PATH" in child_environment({"PATH": "/bin"})
        True
    """
    import jaxpp

    env = dict(os.environ if environ is None else environ)
    package = pathlib.Path(jaxpp.__file__).parent
    if (package / "schedules" / "__init__.py").exists():
        paths = [str(package.parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def with_xla_flags(env: dict[str, str], flags: tuple[str, ...]) -> dict[str, str]:
    """`env` with `flags` appended to its XLA_FLAGS (a child runs a configuration's preset).

    Example:
        >>> with_xla_flags({"XLA_FLAGS": "--a=1"}, ("--b=2",))["XLA_FLAGS"]
        '--a=1 --b=2'
        >>> with_xla_flags({}, ()) == {}
        True
    """
    if not flags:
        return env
    return {**env, "XLA_FLAGS": " ".join(filter(None, (env.get("XLA_FLAGS", ""), *flags)))}


def missing_xla_flags(config, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The flags of `config`'s preset that this process's XLA_FLAGS lack.

    Example:
        >>> from jaxpp._bench import _configs
        >>> config = _configs.parse_config("spmd/dp2/acc1/noremat@overlap")
        >>> len(missing_xla_flags(config, {})) > 0, missing_xla_flags(config, {
        ...     "XLA_FLAGS": " ".join(config.xla_flags)})
        (True, ())
    """
    given = set((os.environ if environ is None else environ).get("XLA_FLAGS", "").split())
    return tuple(f for f in config.xla_flags if f not in given)


def _run_here(args: argparse.Namespace, configs: tuple, out: str) -> int:
    from jaxpp._bench import _phases

    origin = _phases.origin()
    setup = _phases.PhaseClock(_phases.SETUP, origin=origin)
    spawned = os.environ.get(_phases.SPAWNED_ENV)
    if spawned:  # an --isolate child: Python start and imports so far
        setup.record("startup", time.time() - float(spawned))
    import jax

    if args.cache_dir and args.cache_dir != "off":
        # XLA:GPU's per-fusion autotune results go to its subfolder (jax's default
        # jax_persistent_cache_enable_xla_caches), shared by every process using it.
        pathlib.Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    with setup.phase("backend"):
        device = jax.devices()[0]

    from jaxpp._bench import _configs, _memory, _report, _run
    from jaxpp.kernels import tuning

    preset = _configs.PRESETS[args.model]
    problem = _run.Problem(preset=preset)
    previous = _report.load(out, preset=preset.name)
    rows = list(previous.get("results", ()))
    # The ceilings and the reference come from the file when an earlier run of this
    # preset on this device measured them (with --isolate, a first process does), so
    # their memory does not count in a configuration's peak.
    same_device = previous.get("environment", {}).get("device") == device.device_kind
    ceilings = args.ceilings_given or (previous.get("ceilings") if same_device else None)
    if ceilings is None and device.platform == "gpu":
        with setup.phase("ceilings"):
            ceilings = dataclasses.asdict(tuning.measure_ceilings())
    tflops = None if ceilings is None else ceilings["matmul_bf16_tflops"]
    # Same model, seed, batch and attention: reuse it.
    reference = _reusable_reference(previous, preset, problem.seed, args.attention)
    source = previous.get("reference_source", "measured") if reference is not None else None
    if args.reference_loss is not None:
        tolerance = 1e-4 if preset.dtype == "float32" else 2e-2
        if (
            reference is not None
            and source == "measured"
            and not _close(args.reference_loss, reference, tolerance)
        ):
            args.parser.error(
                f"--reference-loss {args.reference_loss} differs from the reference "
                f"{reference:.6g} measured into {out}. Fix: drop --reference-loss (the file's "
                f"value is used), or pass another --out."
            )
        if reference is None or source != "measured":
            reference, source = args.reference_loss, "--reference-loss"

    def measure_reference() -> float:
        with setup.phase("reference"):
            return _run.reference_loss(problem, attention=args.attention)

    # Measured when first needed: a run whose configurations are all predicted not to fit
    # spends no device time on it.
    if reference is None and args.prepare_only:
        reference, source = measure_reference(), "measured"
    extra = {
        "model": {
            "preset": preset.name,
            **{k: getattr(preset, k) for k in preset.__slots__ if k != "name"},
            "params": _params(problem),
            "flops_per_token": _flops(problem),
        },
        "seed": problem.seed,
        "ceilings": ceilings,
        "reference_loss": reference,
        "reference_source": source,
        "attention": args.attention,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    if args.prepare_only:
        _report.write(out, rows, **extra)
        setup.say(f"reference loss {reference:.6g} ({source}), ceilings {ceilings}: {out}")
        return 0
    if args.memory_gib is not None:
        limit = args.memory_gib * _memory.GIB
    else:
        limit = _run.memory_limit(jax.devices()[: max(c.num_devices for c in configs)])
    extra["memory_limit_bytes"] = limit
    failed = 0
    for config in configs:
        clock = _phases.PhaseClock(config.name, origin=origin)
        predicted = _memory.estimate(config, preset)
        oom = None if limit is None else _memory.oom_problem(config, preset, limit)
        try:
            if oom and not args.no_memory_gate:
                raise _run.PredictedOOMError(oom)
            if reference is None:
                reference, source = measure_reference(), "measured"
                extra["reference_loss"], extra["reference_source"] = reference, source
            row = _run.run_config(
                config, problem, reference=reference, steps=args.steps, warmup=args.warmup,
                matmul_tflops=tflops, attention=args.attention, accumulate=args.accumulate,
                trace_path=pathlib.Path(out).parent / "traces" / f"{_file_name(config.name)}.json",
                memory_limit=None if args.no_memory_gate else limit, clock=clock,
            )  # fmt: skip
        except _run.PredictedOOMError as e:
            row = {"name": config.name, "kind": config.kind, "status": "skipped", "error": str(e)}
        except _run.CorrectnessError as e:
            row, failed = {"name": config.name, "kind": config.kind, "status": "wrong"}, failed + 1
            row["error"] = str(e)
        except Exception as e:  # noqa: BLE001 (an OOM or lowering failure fails this row only)
            row, failed = {"name": config.name, "kind": config.kind, "status": "failed"}, failed + 1
            row["error"] = f"{type(e).__name__}: {e}"
        if config.xla:
            row["xla_flags"] = list(config.xla_flags)
        # XLA:GPU compiles differently under a different memory limit (session 9: SPMD TP4 at
        # 8B computed a wrong loss at 0.9 and the right one at 0.75), so each row says its own.
        row["mem_fraction"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        if row["status"] != "ok":
            row["phase"] = clock.current
            row.update(clock.details)  # e.g. how far the compile-ahead got
        # This process's shared setup (start-up, backend, reference) goes with its first row.
        row["phase_seconds"] = {**setup.seconds, **clock.seconds}
        setup.seconds.clear()
        row["predicted_memory"] = {
            **{f.name: getattr(predicted, f.name) for f in dataclasses.fields(predicted)},
            "total": predicted.total,
        }
        rows = _report.merge_rows(rows, row)
        _report.write(out, rows, **extra)
        status = row["status"]
        if status == "ok":
            clock.say(f"ok, {row['tokens_per_s']:.0f} tokens/s, step {row['step_s']:.3f} s")
        else:
            where = f" in phase {row['phase']}" if row.get("phase") else ""
            clock.say(f"{status}{where}: {row['error'].splitlines()[0][:300]}")
    _finish(args, out)
    return 1 if failed else 0


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * abs(b)


def _finish(args: argparse.Namespace, out: str) -> None:
    from jaxpp._bench import _report

    path = pathlib.Path(out)
    if not path.exists():
        return
    data = _report.load(path, preset=args.model)
    rows = data.get("results", [])
    env = data.get("environment", {})
    title = f"GPT {args.model}: {env.get('device_count')} x {env.get('device')}, {env.get('date')}"
    print(_report.markdown_table(rows))
    spmd, jaxpp = _report.best(rows, "spmd"), _report.best(rows, "jaxpp")
    if spmd and jaxpp:
        ratio = jaxpp["tokens_per_s"] / spmd["tokens_per_s"]
        print(f"best jaxpp {jaxpp['name']} / best SPMD {spmd['name']}: {ratio:.3f}x tokens/s")
    if any(r.get("status") == "ok" for r in rows):
        chart = _report.bar_chart(rows, path.with_suffix(".png"), title=title)
        print(f"wrote {path}, {path.with_suffix('.md')}, {chart}")


def _file_name(name: str) -> str:
    return name.replace("/", "_")


def _params(problem) -> int:
    from jaxpp.models import gpt

    return gpt.param_count(problem.model_config())


def _flops(problem) -> float:
    from jaxpp.models import gpt

    return gpt.train_flops_per_token(problem.model_config(), problem.preset.seq_len)
