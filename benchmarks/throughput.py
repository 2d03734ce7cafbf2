"""The throughput race: jaxpp schedules vs SPMD `jax.jit` layouts on the GPT.

A thin wrapper over `jaxpp bench pipeline` (same flags; see `jaxpp._cli_bench` for the
commands to run on 2x and 4x H200):

    python benchmarks/throughput.py --model 8b --devices 4 --isolate --only spmd \
        --out benchmarks/results/bench_8b_4xh200.json
"""

import sys

from jaxpp import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "pipeline", *sys.argv[1:]]))
