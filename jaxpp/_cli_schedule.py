"""`jaxpp schedule ...`: show, simulate, convert and compare pipeline schedules.

Example:
    >>> from jaxpp.cli import main
    >>> main(["schedule", "compare", "--stages", "2", "--microbatches", "4"])  # doctest: +ELLIPSIS
    p=2 ranks, m=4 microbatches, ...
    schedule          stages  makespan  bubble peak act peak mem
    gpipe                  2     15.00   20.0%        4        4
    ...
    0
"""

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable

from jaxpp.schedules import (
    _builders,
    _cluster,
    _cluster_model,
    _ir,
    _registry,
    _render,
    _simulate,
    _text,
    _validate,
)

# Builders that hold two stages per rank whatever --virtual says, and those that use it.
_V_SHAPED = frozenset({"zbv", "dualpipev"})
_VIRTUAL = frozenset({"interleaved-1f1b", "looped-bfs"})
_COST_KEYS = {
    "f": "forward",
    "forward": "forward",
    "b": "backward",
    "backward": "backward",
    "i": "input_grad",
    "input_grad": "input_grad",
    "w": "weight_grad",
    "weight_grad": "weight_grad",
    "t": "transfer",
    "transfer": "transfer",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `schedule` command and its sub-commands to the `jaxpp` parser."""
    parser = subparsers.add_parser(
        "schedule", help="show, simulate, convert and compare pipeline schedules"
    )
    commands = parser.add_subparsers(dest="schedule_command", required=True)

    show = commands.add_parser("show", help="print a built-in schedule's grid and timeline")
    show.add_argument("name", help=f"one of: {', '.join(_registry.BUILTINS)}")
    _add_shape_arguments(show)
    _add_output_arguments(show)
    show.set_defaults(run=_guarded(_run_show))

    simulate = commands.add_parser(
        "simulate",
        help="validate and simulate a schedule file; with --cluster, predict step times at scale",
    )
    simulate.add_argument(
        "file",
        metavar="FILE|NAME",
        type=pathlib.Path,
        help="a .txt (jaxpp format) or .csv file; with --cluster also a built-in name",
    )
    simulate.add_argument(
        "--costs",
        type=_parse_costs_or_json,
        default=_simulate.Costs(),
        help=_COSTS_HELP + "; or measured.json (jaxpp-cluster-costs/1) with --cluster",
    )
    simulate.add_argument(
        "--cluster",
        type=_parse_cluster,
        help="nodes=64,gpus_per_node=8,ib=400Gbps[,nvlink=900GBps,ib_latency=5us,...]: "
        "predict DP/FSDP/TP/PP step times at 8.. GPUs from --costs measured.json",
    )
    simulate.add_argument(
        "--overlap",
        type=float,
        default=0.0,
        help="with --cluster: fraction of DP communication hidden behind compute (default 0)",
    )
    _add_output_arguments(simulate)
    simulate.set_defaults(run=_guarded(_run_simulate))

    convert = commands.add_parser(
        "convert", help="convert between the jaxpp text format and torch CSV (by suffix)"
    )
    convert.add_argument("source", type=pathlib.Path)
    convert.add_argument("target", type=pathlib.Path)
    convert.set_defaults(run=_guarded(_run_convert))

    compare = commands.add_parser(
        "compare", help="bubble and peak memory of every built-in schedule"
    )
    _add_shape_arguments(compare)
    compare.set_defaults(run=_guarded(_run_compare))


_COSTS_HELP = (
    "per-pass durations, e.g. f=1,b=2,i=1,w=1,t=0.1 (t = transfer latency); "
    "b alone sets i = w = b/2"
)


def _add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stages", type=int, required=True, help="pipeline depth p (number of ranks)"
    )
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument(
        "--virtual",
        type=int,
        default=2,
        help="stages per rank for interleaved-1f1b and looped-bfs (default 2); "
        "zbv and dualpipev always use 2, the others 1",
    )
    parser.add_argument("--costs", type=_parse_costs, default=_simulate.Costs(), help=_COSTS_HELP)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--png", type=pathlib.Path, help="also draw a Gantt chart (.png/.svg)")
    parser.add_argument("--trace", type=pathlib.Path, help="also write a Chrome/Perfetto trace")


def _parse_costs(text: str) -> _simulate.Costs:
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        field = _COST_KEYS.get(key.strip().lower())
        if field is None or not value:
            raise argparse.ArgumentTypeError(
                f"cannot read cost {item!r}; write key=value with keys f, b, i, w, t "
                f"(e.g. f=1,b=2,w=1)"
            )
        try:
            values[field] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cost {item!r}: {value!r} is not a number") from None
    if "backward" in values and not {"input_grad", "weight_grad"} & values.keys():
        values["input_grad"] = values["weight_grad"] = values["backward"] / 2
    try:
        return _simulate.Costs(**values)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parse_costs_or_json(text: str) -> _simulate.Costs | pathlib.Path:
    if text.strip().lower().endswith(".json"):
        return pathlib.Path(text.strip())
    return _parse_costs(text)


def _parse_cluster(text: str) -> _cluster.Cluster:
    try:
        return _cluster.parse_cluster(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Prints user errors (bad names, bad files, bad schedules) instead of a traceback."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError) as error:
            print(f"jaxpp schedule: error: {error}", file=sys.stderr)
            return 1

    return guarded


def _builder_for(name: str, ranks: int, virtual: int) -> _builders.ScheduleBuilder:
    key = _registry.builder_class(name).name
    per_rank = 2 if key in _V_SHAPED else virtual if key in _VIRTUAL else 1
    return _registry.get_builder(key, ranks * per_rank, ranks=ranks)


def _scaled(costs: _simulate.Costs, builder: _builders.ScheduleBuilder) -> _simulate.Costs:
    """Per-stage costs when `costs` are per rank's share of the model (stages split it)."""
    share = builder.num_ranks / builder.num_stages
    return dataclasses.replace(
        costs,
        forward=costs.forward * share,
        backward=costs.backward * share,
        input_grad=costs.input_grad * share,
        weight_grad=costs.weight_grad * share,
    )


def _report(sim: _simulate.Simulation, args: argparse.Namespace) -> None:
    print(_render.render_timeline(sim))
    per_rank = " ".join(f"{100 * b:.1f}%" for b in sim.bubble_per_rank)
    print(f"bubble per rank {per_rank}")
    if args.png is not None:
        _render.save_gantt(sim, args.png)
        print(f"wrote {args.png}")
    if args.trace is not None:
        args.trace.write_text(json.dumps(_render.to_chrome_trace(sim)))
        print(f"wrote {args.trace}")


def _run_show(args: argparse.Namespace) -> int:
    builder = _builder_for(args.name, args.stages, args.virtual)
    schedule = builder.build(args.microbatches)
    sim = _simulate.simulate(schedule, _scaled(args.costs, builder))
    print(
        f"{builder.name}: {builder.num_stages} stages on {builder.num_ranks} ranks, "
        f"{args.microbatches} microbatches"
    )
    print(_render.render_grid(schedule))
    print()
    _report(sim, args)
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    measured = isinstance(args.costs, pathlib.Path)
    if args.cluster is not None or measured:
        return _run_what_if(args)
    schedule = _load(args.file)
    sim = _simulate.simulate(_validate.validate(schedule), args.costs)
    print(
        f"{args.file}: {schedule.num_stages} stages on {schedule.num_ranks} ranks, "
        f"{schedule.num_microbatches} microbatches: valid"
    )
    _report(sim, args)
    return 0


def _run_what_if(args: argparse.Namespace) -> int:
    """`simulate --cluster ... --costs measured.json`: predictions at cluster scale."""
    if args.cluster is None or not isinstance(args.costs, pathlib.Path):
        raise ValueError(
            "--cluster and --costs measured.json go together: the cluster what-if needs "
            "measured per-layer costs and a link model. Fix: add "
            + ("--cluster nodes=N,gpus_per_node=G,ib=400Gbps." if args.cluster is None else
               "--costs measured.json (schema: help(jaxpp.schedules.costs_from_dict)).")
        )  # fmt: skip
    costs = _cluster.load_costs(args.costs)
    cluster = args.cluster
    if args.file.suffix.lower() in (".txt", ".csv") or args.file.exists():
        schedule = _validate.validate(_load(args.file))
        _print_file_layouts(schedule, costs, cluster, args.overlap)
        names = _cluster_model.DEFAULT_SCHEDULES
    else:
        names = (_registry.builder_class(str(args.file)).name,)
    result = _cluster_model.what_if(costs, cluster, schedules=names, overlap=args.overlap)
    print(f"what-if with PP schedules {', '.join(names)}:")
    print(_cluster_model.format_what_if(result))
    return 0


def _print_file_layouts(schedule, costs, cluster, overlap) -> None:
    """The file's own schedule at every tp that fits, dp from the global batch."""
    p, m = schedule.num_ranks, schedule.num_microbatches
    print(
        f"{p} ranks, {schedule.num_stages} stages, {m} microbatches: valid; on {cluster.describe()}"
    )
    per_step = m * costs.microbatch_size
    if costs.global_batch % per_step:
        raise ValueError(
            f"the schedule's {m} microbatches x {costs.microbatch_size} sequences do not "
            f"divide global_batch={costs.global_batch}. Fix: a schedule with a microbatch "
            "count that does."
        )
    dp = costs.global_batch // per_step
    tp = 1
    while tp <= cluster.gpus_per_node and tp * p * dp <= cluster.num_gpus:
        if cluster.gpus_per_node % tp == 0:
            for order in _cluster_model.ORDERS[: 2 if dp > 1 else 1]:
                layout = _cluster_model.Layout(tp=tp, pp=p, dp=dp, schedule=schedule, order=order)
                x = _cluster_model.predict(layout, costs, cluster, overlap=overlap)
                print(
                    f"  {layout.num_gpus:>5} GPUs tp{tp} pp{p} dp{dp} {order}: step "
                    f"{x.step_s:.4g} s, {x.tokens_per_s:,.0f} tok/s, bubble "
                    f"{100 * x.bubble:.1f}%, exposed comm {x.exposed_comm_s * 1e3:.3g} ms, "
                    f"{x.memory_bytes / 1e9:.1f} GB/GPU{'' if x.fits else ' (does not fit)'}"
                )
        tp *= 2
    if tp == 1:
        print(f"  needs {p * dp} GPUs (pp {p} x dp {dp}); the cluster has {cluster.num_gpus}")
    print()


def _run_convert(args: argparse.Namespace) -> int:
    schedule = _load(args.source)
    if args.target.suffix.lower() == ".csv":
        args.target.write_text(_text.to_csv(schedule))
    else:
        args.target.write_text(_text.format_schedule(schedule))
    print(f"wrote {args.target} ({schedule.num_ranks} ranks, {schedule.num_stages} stages)")
    return 0


def _load(path: pathlib.Path) -> _ir.Schedule:
    text = path.read_text()
    return _text.from_csv(text) if path.suffix.lower() == ".csv" else _text.parse(text)


def _run_compare(args: argparse.Namespace) -> int:
    p, m = args.stages, args.microbatches
    header = (
        f"{'schedule':<17} {'stages':>6} {'makespan':>9} {'bubble':>7} "
        f"{'peak act':>8} {'peak mem':>8}"
    )
    print(
        f"p={p} ranks, m={m} microbatches, costs per rank-share f={args.costs.forward:g} "
        f"b={args.costs.backward:g} i={args.costs.input_grad:g} w={args.costs.weight_grad:g} "
        f"t={args.costs.transfer:g}; peak mem = peak activations x ranks/stages"
    )
    print(header)
    for name in _registry.BUILTINS:
        builder = _builder_for(name, p, args.virtual)
        try:
            schedule = builder.build(m)
        except ValueError as error:
            print(f"{name:<17} {builder.num_stages:>6}   n/a: {str(error).split('. Fix')[0]}")
            continue
        sim = _simulate.simulate(schedule, _scaled(args.costs, builder))
        peak = max(sim.peak_activations)
        memory = peak * builder.num_ranks / builder.num_stages
        print(
            f"{name:<17} {builder.num_stages:>6} {sim.makespan:>9.2f} "
            f"{100 * sim.bubble:>6.1f}% {peak:>8g} {memory:>8g}"
        )
    return 0
