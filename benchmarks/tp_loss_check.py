"""Which part of an SPMD layout changes its first-step loss on a GPU: a bisect.

Session 8 measured `spmd/tp4/acc4/noremat@overlap` on the 8B preset (4x H200) at a first-step
loss of 8.41 against the single-device reference's 11.2175 (FSDP rows match it; the same
layout on 8 virtual CPU devices matches the reference exactly). This script runs the
layout's first train step with one thing changed at a time (the XLA flag preset, the
attention kernel, the accumulation loop, the tensor-parallel width; FSDP as a control), each
in its own process (XLA reads its flags once per process), on a shallower copy of the preset
(`--layers`), and prints every loss against the one-device reference of the same model:

    python benchmarks/tp_loss_check.py --model 8b --layers 2 --devices 4 --out /tmp/tp.json

A variant is `CONFIG:ATTENTION` (`spmd/tp4/acc4/noremat@overlap:xla`), optionally with a
third field naming flags of the config's preset to leave out, `+`-separated substrings
(`spmd/tp4/acc4/noremat@overlap:auto:pipelined_all_reduce`); the default list is below.
`--reference-loss X` (a one-device loss measured before, at the same depth) skips the two
reference processes, for full-depth runs (`--layers 0`) where each compile takes minutes.
`--mem-fraction F` sets XLA_PYTHON_CLIENT_MEM_FRACTION in every child.

What it found (sessions 9-10, 4x H200, jax 0.11.2): at 2 layers every variant matched; at full
depth `spmd/tp4/acc4/noremat@overlap` gives 11.2175 (right) under the default fraction 0.75
and 8.41171 (wrong: 3/4 of it, as if one of the 4 accumulated microbatch losses were lost)
under 0.9. At 0.9 the same step is right without the preset (`spmd/tp4/acc4/noremat:auto`)
and right with the preset minus `--xla_gpu_enable_pipelined_all_reduce`; the `:xla` variant
does not fit at full depth. Each full-depth compile takes ~200 s; the reproducer:

    python benchmarks/tp_loss_check.py --model 8b --layers 0 --reference-loss 11.2175 \
        --mem-fraction 0.9 --timeout 270 --variants spmd/tp4/acc4/noremat@overlap:auto,\
    spmd/tp4/acc4/noremat@overlap:auto:pipelined_all_reduce

On a machine without a GPU it runs on virtual CPU devices (the GPU's XLA flags are then
ignored): `--model tiny --layers 1 --devices 4`.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

DEFAULT_VARIANTS = (
    # The attention kernel alone ("auto": Mosaic on Hopper) against XLA's, on one device's
    # shard of a microbatch [batch, seq, heads, head_dim]: TP4's (8 of 32 heads, 8
    # sequences; no GPU test had covered more than 2 sequences) and FSDP4's (matched).
    "attention:8x2048x8x128",
    "attention:2x2048x32x128",
    "spmd/tp4/acc4/noremat@overlap:auto",  # session 8's wrong row, shallower
    "spmd/tp4/acc4/noremat:auto",  # without the XLA flag preset
    "spmd/tp4/acc4/noremat@overlap:xla",  # without the Pallas attention kernel
    "spmd/tp4/acc1/noremat@overlap:auto",  # without the accumulation loop
    "spmd/tp4/acc4/noremat:xla",  # neither flags nor kernel
    "spmd/tp2/acc4/noremat@overlap:auto",  # two-way tensor parallelism
    "spmd/fsdp4/acc4/noremat@overlap:auto",  # control: matched at 8B
)
RTOL = 0.02  # the bench's gate (`jaxpp._bench._run.run_config`)
ATTENTION_RTOL = 1e-2  # the kernel's GPU tests' forward bound (bf16 inputs, f32 reference)


def _fields(variant: str) -> tuple[str, str, tuple[str, ...]]:
    """`CONFIG:ATTENTION[:DROP+DROP]` -> (config or "reference"/"attention", attention,
    substrings of the preset flags to leave out)."""
    name, attention, *rest = variant.split(":")
    return name, attention, tuple(rest[0].split("+")) if rest else ()


def _problem(model: str, layers: int):
    from jaxpp._bench import _configs, _run

    preset = _configs.PRESETS[model]
    if layers:
        preset = dataclasses.replace(preset, num_layers=layers)
    return _run.Problem(preset=preset)


def one(model: str, layers: int, variant: str) -> dict:
    """The first-step loss of `variant` ("reference:ATTENTION": one device, forward only),
    or for "attention:BxTxHxD" the attention kernel's relative error against XLA's."""
    import jax

    from jaxpp._bench import _configs, _run

    name, attention, _ = _fields(variant)
    start = time.perf_counter()
    result = {}
    if name == "attention":
        result["attention_error"] = _attention_error(tuple(int(n) for n in attention.split("x")))
    elif name == "reference":
        result["loss"] = _run.reference_loss(_problem(model, layers), attention=attention)
    else:
        config, problem = _configs.parse_config(name), _problem(model, layers)
        step, state, batch = _run.build(config, problem, attention=attention, accumulate="scan")
        _, loss = step(state, batch)
        result["loss"] = float(loss)
    return dict(
        variant=variant, **result, seconds=round(time.perf_counter() - start, 1),
        platform=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    )  # fmt: skip


def _attention_error(shape: tuple[int, ...]) -> float:
    """Relative error of the "auto" attention (causal) against XLA's in float32, on random
    bf16 inputs of `shape` [batch, seq, heads, head_dim]."""
    import jax
    import jax.numpy as jnp

    from jaxpp.kernels.attention import dot_product_attention

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    ours = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))(*f32)
    diff = jnp.linalg.norm((ours.astype(jnp.float32) - ref).ravel())
    return float(diff / jnp.linalg.norm(ref.ravel()))


def run_all(args) -> list[dict]:
    """Each variant (and the two references) in its own process, under `args.timeout` each;
    `args.out` is rewritten after every one (a cut-off run keeps what it measured)."""
    from jaxpp import _cli_bench
    from jaxpp._bench import _configs

    env = _cli_bench.child_environment()
    # Only the CPU backend reads this flag: on a GPU machine the GPUs are the devices.
    env = _cli_bench.with_xla_flags(
        env, (f"--xla_force_host_platform_device_count={args.devices}",)
    )
    if args.mem_fraction is not None:  # XLA:GPU's memory limit changes what it compiles
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.mem_fraction)
    variants = args.variants.split(",")
    if args.reference_loss is None:
        variants = ["reference:auto", "reference:xla", *variants]
    rows = []
    for variant in variants:
        if rows:
            write(args, rows)
        name, _, dropped = _fields(variant)
        plain = name in ("reference", "attention")
        flags = () if plain else _configs.parse_config(name).xla_flags
        flags = tuple(f for f in flags if not any(d in f for d in dropped))
        command = [sys.executable, __file__, "--one", variant, "--model", args.model]
        command += ["--layers", str(args.layers)]
        try:
            done = subprocess.run(
                command, env=_cli_bench.with_xla_flags(env, flags), capture_output=True,
                text=True, timeout=args.timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            rows.append(dict(variant=variant, error=f"no loss within --timeout {args.timeout} s"))
            print(f"{variant}: timed out after {args.timeout} s", flush=True)
            continue
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            rows.append(dict(variant=variant, error=f"exit {done.returncode}: {' / '.join(tail)}"))
            print(f"{variant}: failed ({rows[-1]['error'][:300]})", flush=True)
            continue
        rows.append(json.loads(found[-1]))
        value = rows[-1].get("loss", rows[-1].get("attention_error"))
        print(f"{variant}: {value:.6g} ({rows[-1]['seconds']} s)", flush=True)
    return rows


def table(rows: list[dict], reference: float | None = None) -> str:
    """Every variant's loss against the one-device reference with the same attention (or
    against `reference` for all)."""
    refs = {_fields(r["variant"])[1]: r["loss"] for r in rows if "loss" in r
            and r["variant"].startswith("reference:")}  # fmt: skip
    if reference is not None:
        refs = {"auto": reference, "xla": reference}
    lines = [
        "| variant | first-step loss | reference | rel. diff | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["variant"].startswith("reference:"):
            continue
        if "attention_error" in r:  # the kernel alone: its output against XLA's
            err = r["attention_error"]
            verdict = "matches" if err <= ATTENTION_RTOL else "WRONG"
            lines.append(f"| {r['variant']} (vs XLA) | - | - | {err:.2e} | {verdict} |")
            continue
        ref = refs.get(_fields(r["variant"])[1])
        if "loss" not in r or ref is None:
            lines.append(f"| {r['variant']} | - | - | - | {r.get('error', 'no reference')[:120]} |")
            continue
        diff = abs(r["loss"] - ref) / abs(ref)
        verdict = "matches" if diff <= RTOL else "WRONG"
        lines.append(f"| {r['variant']} | {r['loss']:.6g} | {ref:.6g} | {diff:.2e} | {verdict} |")
    return "\n".join(lines)


def write(args, rows: list[dict]) -> str:
    """The table of `rows`; with `args.out`, also the JSON of every row and the table."""
    text = table(rows, args.reference_loss)
    if args.out:
        meta = dict(model=args.model, layers=args.layers, date=time.strftime("%Y-%m-%d %H:%M"),
                    reference_loss=args.reference_loss)  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(dict(**meta, rows=rows, table=text), f, indent=1)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8b", choices=("tiny", "2b", "8b"))
    parser.add_argument("--layers", type=int, default=2, help="0: the preset's own depth")
    parser.add_argument("--devices", type=int, default=4, help="virtual CPU devices off a GPU")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per variant")
    parser.add_argument("--out", default=None, help="JSON of every row")
    parser.add_argument(
        "--mem-fraction", type=float, default=None,
        help="XLA_PYTHON_CLIENT_MEM_FRACTION of every child (default: this process's)",
    )  # fmt: skip
    parser.add_argument(
        "--reference-loss", type=float, default=None,
        help="a one-device loss measured before (same depth): skips the reference processes",
    )  # fmt: skip
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.layers, args.one)), flush=True)
        return 0
    rows = run_all(args)
    text = write(args, rows)
    print(text)
    return 1 if "WRONG" in text or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
