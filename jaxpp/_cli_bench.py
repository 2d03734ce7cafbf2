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

On the GPU machine: the device tool allows 10 minutes per command and about 30 minutes
per session, and one ~8B configuration costs about 2-3 minutes (compile, 12 steps, one
profiled step), so run a focused subset, three configurations per command. Rows with the
same `--out` merge; `--isolate` runs each configuration in its own process, so memory
peaks are per configuration and an OOM fails only that row. On that machine `jaxpp` is
not installed: `source benchmarks/gpu_env.sh` in the repository root, then run
`python3 -m jaxpp.cli bench ...` (for `jaxpp bench ...`) from outside it (`cd /tmp`: the
root's bare `./jaxpp` would shadow the package tree; `--isolate` children already run in
an empty folder). The plan, strongest predicted-to-fit candidates first (`--list` with
the same flags shows each one's predicted GiB):

    source benchmarks/gpu_env.sh && cd /tmp && export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
    # nvidia-h200-x4, the ~8B model (limit 126 GiB; predicted GiB per device in brackets)
    RES=$OLDPWD/benchmarks/results/bench_8b_4xh200.json
    # SPMD: FSDP with accumulation [84, 114], DP x TP [103]
    python3 -m jaxpp.cli bench pipeline --model 8b --devices 4 --isolate --out $RES --configs \
        spmd/fsdp4/acc4/noremat,spmd/dp2-tp2/acc8/noremat,spmd/fsdp4/acc2/noremat
    # SPMD: TP and FSDP x TP [90, 82], FSDP with remat and no accumulation [45]
    python3 -m jaxpp.cli bench pipeline --model 8b --devices 4 --isolate --out $RES --configs \
        spmd/tp4/acc4/noremat,spmd/fsdp2-tp2/acc4/noremat,spmd/fsdp4/acc1/remat
    # jaxpp: zero-bubble schedules at 32 microbatches of one sequence [96, 93, 99]
    python3 -m jaxpp.cli bench pipeline --model 8b --devices 4 --isolate --out $RES --configs \
        jaxpp/zbv/pp4/mb32/noremat,jaxpp/zb-h1/pp4/mb32/noremat,jaxpp/dualpipev/pp4/mb32/noremat
    # jaxpp: 1F1B and interleaved [93, 102, 118 (tight)]
    python3 -m jaxpp.cli bench pipeline --model 8b --devices 4 --isolate --out $RES --configs \
        jaxpp/1f1b/pp4/mb32/noremat,jaxpp/interleaved-1f1b/pp4/mb32/noremat,jaxpp/1f1b/pp4/mb16/noremat
    # nvidia-h200-x2, the ~2B model; RES=$OLDPWD/benchmarks/results/bench_2b_2xh200.json
    # SPMD [90, 71, 78]
    python3 -m jaxpp.cli bench pipeline --model 2b --devices 2 --isolate --out $RES --configs \
        spmd/dp2/acc2/noremat,spmd/fsdp2/acc2/noremat,spmd/tp2/acc2/noremat
    # jaxpp [55, 53, 59]; then zbv/pp2/mb8 [75], interleaved-1f1b/pp2/mb16 [56]
    python3 -m jaxpp.cli bench pipeline --model 2b --devices 2 --isolate --out $RES --configs \
        jaxpp/zbv/pp2/mb16/noremat,jaxpp/zb-h1/pp2/mb16/noremat,jaxpp/dualpipev/pp2/mb16/noremat
    # one H100 (no pipeline): calibrate the memory estimate on SPMD, 2B on one GPU
    # (limit 71.6 GiB; predicted [54, 66, 47]; rows record XLA's estimate and the peaks)
    python3 -m jaxpp.cli bench pipeline --model 2b --devices 1 --isolate --configs \
        spmd/dp1/acc16/noremat,spmd/dp1/acc8/noremat,spmd/dp1/acc8/remat \
        --out $OLDPWD/benchmarks/results/bench_2b_1xh100.json

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
import os
import pathlib
import subprocess
import sys
import tempfile

_REMAT = {"on": (True,), "off": (False,), "off,on": (False, True), "on,off": (False, True)}


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
    parser.add_argument("--configs", default=None, help="comma-separated configuration names")
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
        "--prepare-only", action="store_true", help=argparse.SUPPRESS
    )  # measure the reference loss and ceilings into --out, run nothing (used by --isolate)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Runs `jaxpp bench pipeline` with parsed arguments; returns the exit code."""
    from jaxpp._bench import _configs

    try:
        configs = _select(args, _configs)
    except ValueError as e:
        args.parser.error(str(e))
    out = args.out or f"benchmarks/results/bench_{args.model}_{args.devices or 'all'}dev.json"
    if args.memory_gib is not None and args.memory_gib <= 0:
        args.parser.error(f"--memory-gib {args.memory_gib} must be > 0.")
    if args.list:
        _list(args, configs)
        return 0
    if not configs:
        args.parser.error("no configuration fits the flags. Fix: check --list and relax them.")
    if args.isolate:
        return _run_isolated(args, configs, out)
    from jaxpp import _cli_train

    _cli_train.configure_devices(max(8, args.devices or 0))
    return _run_here(args, configs, out)


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
    imported jaxpp from a package tree, that tree first on PYTHONPATH.
    """
    out = str(pathlib.Path(out).resolve())
    common = [
        sys.executable, "-m", "jaxpp.cli", "bench", "pipeline", "--model", args.model,
        "--devices", str(args.devices), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--attention", args.attention, "--accumulate", args.accumulate, "--out", out,
    ]  # fmt: skip
    if args.memory_gib is not None:
        common += ["--memory-gib", str(args.memory_gib)]
    if args.no_memory_gate:
        common.append("--no-memory-gate")
    env = child_environment()
    with tempfile.TemporaryDirectory(prefix="jaxpp-bench-") as cwd:
        print("== reference loss and ceilings", flush=True)
        prepare = [*common, "--configs", configs[0].name, "--prepare-only"]
        if subprocess.run(prepare, env=env, cwd=cwd, check=False).returncode:
            return 1
        failed = 0
        for config in configs:
            command = [*common, "--configs", config.name]
            print(f"== {config.name}", flush=True)
            failed += subprocess.run(command, env=env, cwd=cwd, check=False).returncode != 0
    _finish(args, out)
    return 1 if failed else 0


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


def _run_here(args: argparse.Namespace, configs: tuple, out: str) -> int:
    import jax

    from jaxpp._bench import _configs, _memory, _report, _run
    from jaxpp.kernels import tuning

    preset = _configs.PRESETS[args.model]
    problem = _run.Problem(preset=preset)
    previous = _report.load(out, preset=preset.name)
    rows = list(previous.get("results", ()))
    # The ceilings and the reference come from the file when an earlier run of this
    # preset on this device measured them (with --isolate, a first process does), so
    # their memory does not count in a configuration's peak.
    device = jax.devices()[0]
    same_device = previous.get("environment", {}).get("device") == device.device_kind
    ceilings = previous.get("ceilings") if same_device else None
    if ceilings is None and device.platform == "gpu":
        ceilings = dataclasses.asdict(tuning.measure_ceilings())
    tflops = None if ceilings is None else ceilings["matmul_bf16_tflops"]
    reference = previous.get("reference_loss")  # same preset, seed and batch: reuse it
    if previous.get("attention") != args.attention:
        reference = None
    # Measured when first needed: a run whose configurations are all predicted not to fit
    # spends no device time on it.
    if reference is None and args.prepare_only:
        reference = _run.reference_loss(problem, attention=args.attention)
    extra = {
        "model": {
            "preset": preset.name,
            **{k: getattr(preset, k) for k in preset.__slots__ if k != "name"},
            "params": _params(problem),
            "flops_per_token": _flops(problem),
        },
        "ceilings": ceilings,
        "reference_loss": reference,
        "attention": args.attention,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    if args.prepare_only:
        _report.write(out, rows, **extra)
        print(f"reference loss {reference:.6g}, ceilings {ceilings}: {out}", flush=True)
        return 0
    if args.memory_gib is not None:
        limit = args.memory_gib * _memory.GIB
    else:
        limit = _run.memory_limit(jax.devices()[: max(c.num_devices for c in configs)])
    extra["memory_limit_bytes"] = limit
    failed = 0
    for config in configs:
        print(f"{config.name} ...", end=" ", flush=True)
        predicted = _memory.estimate(config, preset)
        oom = None if limit is None else _memory.oom_problem(config, preset, limit)
        try:
            if oom and not args.no_memory_gate:
                raise _run.PredictedOOMError(oom)
            if reference is None:
                reference = _run.reference_loss(problem, attention=args.attention)
                extra["reference_loss"] = reference
            row = _run.run_config(
                config, problem, reference=reference, steps=args.steps, warmup=args.warmup,
                matmul_tflops=tflops, attention=args.attention, accumulate=args.accumulate,
                trace_path=pathlib.Path(out).parent / "traces" / f"{_file_name(config.name)}.json",
                memory_limit=None if args.no_memory_gate else limit,
            )  # fmt: skip
        except _run.PredictedOOMError as e:
            row = {"name": config.name, "kind": config.kind, "status": "skipped", "error": str(e)}
        except _run.CorrectnessError as e:
            row, failed = {"name": config.name, "kind": config.kind, "status": "wrong"}, failed + 1
            row["error"] = str(e)
        except Exception as e:  # noqa: BLE001 (an OOM or lowering failure fails this row only)
            row, failed = {"name": config.name, "kind": config.kind, "status": "failed"}, failed + 1
            row["error"] = f"{type(e).__name__}: {e}"
        row["predicted_memory"] = {
            **{f.name: getattr(predicted, f.name) for f in dataclasses.fields(predicted)},
            "total": predicted.total,
        }
        rows = _report.merge_rows(rows, row)
        _report.write(out, rows, **extra)
        status = row["status"]
        print(f"{row['tokens_per_s']:.0f} tokens/s" if status == "ok" else status, flush=True)
        if status != "ok":
            print(f"  {row['error'].splitlines()[0][:300]}", flush=True)
    _finish(args, out)
    return 1 if failed else 0


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
