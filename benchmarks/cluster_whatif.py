"""Cluster what-if: predicted step time of DP, FSDP, TP and PP layouts at 8..1024 GPUs.

Reads a `jaxpp-cluster-costs/1` JSON of measured per-layer costs (schema:
`help(jaxpp.schedules.costs_from_dict)`) and prints, for each GPU count, the best fitting
layout of each family, the crossover where the best PP layout overtakes the best SPMD
layout, and every assumption.

    python benchmarks/cluster_whatif.py benchmarks/results/cluster_costs_example.json \
        --cluster nodes=128,gpus_per_node=8,ib=400Gbps --overlap 0.5

The shipped example JSON is NOT a measurement; it is an illustrative GPT-8B-like input.
Measured inputs come from a `jaxpp bench pipeline` results file: `--from-bench FILE
--config NAME` takes that jaxpp row's per-stage task times and optimizer time, first
predicts every measured row of the file (the issue's 10% check: jaxpp rows from their own
costs, SPMD rows in their exact layout from NAME's per-layer costs; a table of measured,
predicted, error and each prediction's terms), then sweeps the cluster:

    python benchmarks/cluster_whatif.py --from-bench \
        benchmarks/results/pipeline_2026-11-21/bench_2b_2xh200_partial.json \
        --config jaxpp/1f1b/pp2/mb16/noremat --cluster nodes=128,gpus_per_node=8,ib=400Gbps
"""

import argparse
import json
import pathlib
import sys
import time

from jaxpp.schedules import costs_from_dict, format_what_if, load_costs, parse_cluster, what_if


def main(argv: list[str] | None = None) -> int:
    """Prints the what-if table for a costs JSON; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "costs",
        type=pathlib.Path,
        nargs="?",
        default=pathlib.Path(__file__).parent / "results" / "cluster_costs_example.json",
    )
    parser.add_argument("--cluster", default="nodes=128,gpus_per_node=8,ib=400Gbps")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument(
        "--schedules", default="1f1b,interleaved-1f1b,zb-h1,zbv", help="comma-separated"
    )
    parser.add_argument(
        "--gpus",
        help="comma-separated GPU counts (e.g. 2,4 to compare with measured runs); "
        "default powers of two from 8 to the cluster size",
    )
    parser.add_argument("--from-bench", type=pathlib.Path, help="jaxpp bench results JSON")
    parser.add_argument("--config", help="with --from-bench: the measured jaxpp row")
    args = parser.parse_args(argv)
    if args.from_bench is not None:
        if not args.config:
            parser.error("--from-bench needs --config NAME (a jaxpp row of that file).")
        from jaxpp._bench import _whatif

        results = json.loads(args.from_bench.read_text())
        checks = _whatif.validate_all(results, costs_from=args.config, overlap=args.overlap)
        print(
            f"measured rows vs the model (DP overlap {args.overlap:g}, one node of each "
            "row's GPUs):"
        )
        print(_whatif.format_validations(checks))
        print()
        costs = costs_from_dict(_whatif.cluster_costs(results, args.config))
        args.costs = args.from_bench
    else:
        costs = load_costs(args.costs)
    cluster = parse_cluster(args.cluster)
    started = time.perf_counter()
    gpus = None if args.gpus is None else tuple(int(g) for g in args.gpus.split(","))
    result = what_if(
        costs,
        cluster,
        gpu_counts=gpus,
        schedules=tuple(args.schedules.split(",")),
        overlap=args.overlap,
    )
    print(f"costs: {args.costs}")
    print(format_what_if(result))
    print(f"(model evaluated in {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
