"""GPT train-step time with one process per stage group vs one process for all devices.

Run the same script both ways on the same devices and compare the JSON files:

    jaxpp launch -n 2 -- python benchmarks/distributed_train.py --stages 2 \
        --out benchmarks/results/distributed_train_2proc.json      # DistributedExecutor
    python benchmarks/distributed_train.py --stages 2 \
        --out benchmarks/results/distributed_train_1proc.json      # LocalExecutor

On a cluster, run it under `srun` (see `benchmarks/sbatch_distributed.sh`): every
process calls `jaxpp.runtime.initialize()`, which finds its peers through SLURM,
Open MPI or the `JAXPP_*` variables. Every process feeds the same (seeded) batches;
process 0 prints progress and writes the JSON.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

from jaxpp import runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attention", default="auto", help="jaxpp.kernels.attention impl")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON results (process 0)")
    parser.add_argument(
        "--transfers",
        choices=("auto", "async", "inline", "device_put"),
        default="auto",
        help="DistributedExecutor: the default (auto: device_put on GPUs, permute on CPUs), "
        "permute transfers in line or on a transfer thread, or cross-process jax.device_put",
    )
    args = parser.parse_args(argv)
    os.environ["JAXPP_ASYNC_TRANSFERS"] = "1" if args.transfers == "async" else "0"
    method = {"auto": "auto", "device_put": "device_put"}.get(args.transfers, "permute")
    os.environ["JAXPP_TRANSFER"] = method

    runtime.initialize()
    import jaxpp
    from jaxpp import _trainer
    from jaxpp._flax import _linen
    from jaxpp.models import gpt, synthetic

    config = _trainer.TrainConfig(
        num_stages=args.stages,
        num_microbatches=args.microbatches,
        schedule=args.schedule,
        steps=args.warmup + args.steps,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        num_layers=args.layers,
        d_model=args.d_model,
        num_heads=args.heads,
        vocab_size=args.vocab,
        attention=args.attention,
    )
    schedule = _trainer.resolve_schedule(config.schedule, config.num_stages, args.microbatches)
    num_ranks = schedule.num_ranks
    model = _linen.pipeline_linen(gpt.GPT(config.model_config()), num_stages=config.num_stages)
    optimizer = _trainer.make_optimizer(learning_rate=config.learning_rate, steps=config.steps)
    language = synthetic.MarkovLanguage(vocab_size=config.vocab_size, seed=config.seed)
    data = synthetic.SyntheticBatches(
        language=language, batch_size=config.batch_size, seq_len=config.seq_len, seed=0
    )
    step_fn = _trainer.make_train_step(
        model, optimizer, schedule=schedule, num_microbatches=config.num_microbatches
    )
    if jax.process_count() > 1:
        mesh = runtime.stage_mesh(num_ranks)
    else:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_ranks]), ("stages",))
    step = jaxpp.mpmd_jit_with_loop(step_fn, mpmd_mesh=jaxpp.MpmdMesh(mesh, "stages"))
    state = _trainer.init_state(model, optimizer, jax.random.key(0), data.batch_at(0))
    main_process = jax.process_index() == 0
    seconds, losses, dispatch = [], [], []
    for index, batch in data.iterate(start=0):
        if index >= config.steps:
            break
        start = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(runtime.fetch(metrics["loss"]))  # waits for the step everywhere
        if index >= args.warmup:
            seconds.append(time.perf_counter() - start)
            dispatch.append(step.last_stats.dispatch_seconds)
            by_kind = dict(step.last_stats.dispatch_by_kind)  # the last timed step's
        losses.append(loss)
        if main_process:
            print(f"step {index + 1}/{config.steps} loss {loss:.4f}", flush=True)
    executor = type(step.last_compiled.executor).__name__
    if executor == "DistributedExecutor":
        chosen = step.last_compiled.executor
        how = "async" if chosen.async_transfers else "inline"
        executor += f" ({how} {chosen.transfer_method} transfers)"
    # Transfer stall: the part of the real step that the schedule, fed with the measured
    # task times (each task waited for, transfers not counted), does not explain.
    median = statistics.median(seconds)
    profile = step.profile(state, batch)
    predicted = profile.predicted_step_seconds
    result = {
        "executor": executor,
        "processes": jax.process_count(),
        "devices": [str(d) for d in mesh.devices.flat],
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "host": platform.node(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "median_step_seconds": median,
        "predicted_step_seconds": predicted,
        # Host time to issue one step's work; close to the step time = dispatch-bound.
        "median_dispatch_seconds": statistics.median(dispatch),
        "last_dispatch_by_kind": by_kind,
        "transfer_stall_share": max(0.0, median - predicted) / median,
        "measured_bubble": profile.bubble(median),
        "simulated_bubble": profile.simulation.bubble,
        "step_seconds": seconds,
        "losses": losses,
    }
    if main_process:
        print(
            f"{executor} on {jax.process_count()} process(es): median step "
            f"{median * 1e3:.1f} ms, predicted from task times {predicted * 1e3:.1f} ms, "
            f"transfer stall {result['transfer_stall_share']:.1%}, host dispatch "
            f"{result['median_dispatch_seconds'] * 1e3:.1f} ms ("
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in by_kind.items())
            + ")",
            flush=True,
        )
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
