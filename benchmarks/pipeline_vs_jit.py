"""Step time of the GPT train step: pipelined over N GPUs vs `jax.jit` on one GPU.

The same step function (treduce over microbatches, AdamW update) runs both ways:
under `jaxpp.mpmd_jit_with_loop` on a mesh of N ranks, and under `jax.jit` on
device 0, where treduce is a sequential loop. Prints a table and writes JSON.

    python benchmarks/pipeline_vs_jit.py --out results/pipeline_vs_jit.json
"""

import argparse
import datetime
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpp
import jaxpp.flax
from jaxpp import schedules
from jaxpp.models import gpt


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--stages", type=int, default=None, help="default: one per device")
    p.add_argument("--schedules", default="1f1b", help="comma-separated built-in names")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="auto", help="jaxpp.kernels.attention implementation")
    p.add_argument("--out", default=None)
    return p.parse_args()


def _time_steps(step, state, batch, steps: int) -> tuple[list[float], list[float], object]:
    """Step times, host dispatch times (jaxpp steps only) and the last loss."""
    for _ in range(3):  # compile and warm up
        state, loss = step(state, batch)
    jax.block_until_ready((state, loss))
    times, dispatch = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = step(state, batch)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - t0)
        stats = getattr(step, "last_stats", None)
        if stats is not None:
            dispatch.append(stats.dispatch_seconds)
    return times, dispatch, loss


def main() -> None:
    args = _parse()
    devices = jax.devices()
    num_stages = args.stages or len(devices)
    dtype = jnp.dtype(args.dtype)
    config = gpt.GPTConfig(
        vocab_size=args.vocab,
        num_layers=args.layers,
        d_model=args.d_model,
        num_heads=args.heads,
        d_ff=4 * args.d_model,
        max_seq_len=args.seq_len,
        dtype=dtype,
        param_dtype=jnp.float32,
        attention=args.attention,
    )
    model = jaxpp.flax.pipeline(gpt.GPT(config), num_stages=num_stages)
    shape = (args.microbatches, args.microbatch_size, args.seq_len + 1)
    tokens = jax.random.randint(jax.random.key(1), shape, 0, args.vocab)
    batch = {"tokens": tokens}
    params = model.init(jax.random.key(0), tokens[0, :, :-1])["params"]
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    state = (params, optimizer.init(params))
    tokens_per_step = args.microbatches * args.microbatch_size * args.seq_len

    def train_step(state, batch, *, schedule):
        # The model is cut into as many stages as the schedule has (the parameter tree
        # is the same for every cut).
        stages = schedule.num_stages
        loss_fn = gpt.make_loss_fn(jaxpp.flax.pipeline(gpt.GPT(config), num_stages=stages))
        params, opt_state = state
        losses, grads = jaxpp.treduce(
            lambda mb: jax.value_and_grad(loss_fn)(params, mb), batch, schedule=schedule
        )
        grads = jax.tree.map(lambda g: g / args.microbatches, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), losses.mean()

    rows = []
    # Baseline: the same step under jax.jit on one device.
    base_step = jax.jit(functools.partial(train_step, schedule=jaxpp.Std1F1B(num_stages)))
    on0 = jax.device_put((state, batch), devices[0])
    times, _, jit_loss = _time_steps(base_step, *on0, args.steps)
    base = statistics.median(times)
    rows.append({"config": "jax.jit, 1 device", "step_s": base, "loss": float(jit_loss)})
    del on0

    mesh_devices = np.array(devices[:num_stages]).reshape(num_stages, 1)
    mesh = jaxpp.MpmdMesh(jax.sharding.Mesh(mesh_devices, ("stages", "data")), "stages")
    for name in args.schedules.split(","):
        builder = schedules.get_builder(name, num_stages)
        if builder.num_ranks != num_stages:  # two stages per rank (interleaved, V shapes)
            builder = schedules.get_builder(name, 2 * num_stages, ranks=num_stages)
        step = jaxpp.mpmd_jit_with_loop(
            functools.partial(train_step, schedule=builder), mpmd_mesh=mesh
        )
        times, dispatch, loss = _time_steps(step, state, batch, args.steps)
        median = statistics.median(times)
        # Same step, same number of updates: the losses must agree before speed counts.
        tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
        if not np.isclose(float(loss), float(jit_loss), rtol=tolerance):
            raise SystemExit(f"{name}: loss {float(loss)} differs from jax.jit's {float(jit_loss)}")
        profile = step.profile(state, batch)
        rows.append(
            {
                "config": f"jaxpp {name}, {num_stages} ranks",
                "step_s": median,
                "loss": float(loss),
                "speedup_vs_jit": base / median,
                "predicted_step_s": profile.predicted_step_seconds,
                "dispatch_s": statistics.median(dispatch),
                "measured_bubble": profile.bubble(median),
                "simulated_bubble": profile.simulation.bubble,
                "peak_activations": list(step.last_stats.peak_activations),
            }
        )

    result = {
        "benchmark": "pipeline_vs_jit",
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "device": devices[0].device_kind,
        "num_devices": len(devices),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "model": {
            "layers": args.layers,
            "d_model": args.d_model,
            "heads": args.heads,
            "seq_len": args.seq_len,
            "vocab": args.vocab,
            "params": gpt.param_count(config),
            "dtype": args.dtype,
            "attention": args.attention,
        },
        "microbatches": args.microbatches,
        "microbatch_size": args.microbatch_size,
        "tokens_per_step": tokens_per_step,
        "steps_timed": args.steps,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(
        f"\n{'config':32} {'step ms':>9} {'tokens/s':>10} {'vs jit':>7} {'bubble':>7} "
        f"{'predicted':>9} {'dispatch':>9}"
    )
    for row in rows:
        line = (
            f"{row['config']:32} {row['step_s'] * 1e3:9.1f} "
            f"{tokens_per_step / row['step_s']:10.0f} {row.get('speedup_vs_jit', 1.0):7.2f}"
        )
        if "measured_bubble" in row:
            line += (
                f" {row['measured_bubble']:7.1%} {row['predicted_step_s'] * 1e3:9.1f}"
                f" {row['dispatch_s'] * 1e3:9.1f}"
            )
        print(line)


if __name__ == "__main__":
    main()
