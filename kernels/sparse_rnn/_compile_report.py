"""Compiles the persistent forward kernel's variants for sm_90 on a machine without a GPU.

A development check, not used by the package: `jax.export` runs the Pallas lowering to Triton
IR only; this goes on through a separately installed Triton (`pip install --target DIR triton`)
to PTX and `ptxas -v`, and reports registers, spills, shared memory and the gather load widths
per variant (kernels/sparse_rnn/NOTES.md has a table from it). The Triton of the pip wheel is
newer than jaxlib's, so the numbers approximate what XLA's Triton builds on the GPU.

    python -m jaxpp.kernels.sparse_rnn._compile_report --triton /tmp/tt --hidden 2304 --slots 704
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from jaxpp.kernels.sparse_rnn import _kernel

# name -> KernelConfig overrides; the same names as benchmarks/sparse_rnn_bench.py VARIANTS.
VARIANTS = {
    "v3": {},
    "pf": dict(prefetch=True),
    "f16": dict(state_dtype="float16"),
    "f16_pf": dict(state_dtype="float16", prefetch=True),
    "f16_pf_nw8": dict(state_dtype="float16", prefetch=True, num_warps=8),
    "bf16_pf": dict(state_dtype="bfloat16", prefetch=True),
    "f16_u2": dict(state_dtype="float16", unroll=2),
    "f16_pf_u2": dict(state_dtype="float16", prefetch=True, unroll=2),
    "f16_pf_u2_nw8": dict(state_dtype="float16", prefetch=True, unroll=2, num_warps=8),
    "f16_u4": dict(state_dtype="float16", unroll=4),
}


def triton_ir(cfg: _kernel.KernelConfig, *, backward: bool = False) -> str:
    """A persistent kernel's Triton IR (text), via `jax.export` for an H100."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = {}
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured["ir"] = result.module.operation.get_asm(enable_debug_info=False)
        return result

    spec, f32 = jax.ShapeDtypeStruct, jnp.float32
    h, g, b, t = cfg.hidden, cfg.gates, cfg.batch, cfg.steps
    words = spec(
        (cfg.blocks * g * (cfg.slots // _kernel.CHUNK) * cfg.units, _kernel.CHUNK), jnp.int32
    )
    state = spec(((t + 1) * h, b), f32)
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    if backward:
        twords = spec(
            (cfg.blocks * (cfg.transpose_slots // _kernel.CHUNK) * cfg.units, 32), jnp.int32
        )
        fn = lambda gr, x, m, hb, cb, tw: _kernel.backward_persistent(cfg, gr, x, m, hb, cb, tw)  # noqa: E731
        args = (spec((t * h, b), f32), spec((t * g * h, b), f32), spec((t * g * h, b), f32))
        args += (state, state, twords)
    else:
        fn = lambda x, w, hb, cb: _kernel.forward_persistent(cfg, x, w, hb, cb)  # noqa: E731
        args = (spec((t * g * h, b), f32), words, state, state)
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    # Attribute spellings that the newer Triton parser does not accept (they do not change
    # layouts or register allocation).
    return re.sub(r" (evictionPolicy = evict_last|isVolatile = true)", "", captured["ir"])


def compile_report(ir_text: str, num_warps: int, triton_dir: str) -> dict:
    """Compiles Triton IR for sm_90a with the Triton in `triton_dir`; returns the counts."""
    sys.path.insert(0, triton_dir)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton  # noqa: PLC0415 - the separately installed compiler
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.ttir"
        path.write_text(ir_text)
        kernel = triton.compile(
            str(path),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=num_warps, num_stages=1),
        )
        ptx = pathlib.Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        ptxas = pathlib.Path(triton_dir) / "triton/backends/nvidia/bin/ptxas-blackwell"
        out = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(ptx) + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = subprocess.run(
            [str(ptxas.parent / "cuobjdump"), "-sass", str(ptx) + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    loads = {}
    for op in re.findall(r"LDG\.E[.A-Z0-9_]*", sass):
        loads[op] = loads.get(op, 0) + 1
    return dict(
        registers=int(re.search(r"Used (\d+) registers", out).group(1)),
        spill_bytes=int(re.search(r"(\d+) bytes spill stores", out).group(1)),
        shared_bytes=kernel.metadata.shared,
        loads=dict(sorted(loads.items())),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--triton", required=True, help="folder of `pip install --target`")
    parser.add_argument("--hidden", type=int, default=2304)
    parser.add_argument("--slots", type=int, default=704, help="padded non-zeros per row")
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--backward", action="store_true", help="the backward kernel instead")
    args = parser.parse_args()
    base = _kernel.KernelConfig(
        cell="lstm", hidden=args.hidden, gates=4, blocks=args.blocks,
        units=args.hidden // args.blocks, slots=args.slots, transpose_slots=4 * args.slots,
        batch=4, steps=8, num_warps=16,
    )  # fmt: skip
    for name in args.variants.split(","):
        cfg = dataclasses.replace(base, **VARIANTS[name])
        report = compile_report(triton_ir(cfg, backward=args.backward), cfg.num_warps, args.triton)
        kind = "backward" if args.backward else "forward"
        print(f"{kind} H={args.hidden} slots={args.slots} {name:12s} {report}", flush=True)


if __name__ == "__main__":
    main()
