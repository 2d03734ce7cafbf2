"""Attention benchmark: our Mosaic kernel vs cuDNN, tokamax (mosaic) and XLA, one run.

Grid (bf16): 16k tokens in total (batch * seq), num_heads * head_dim = 2048, seq 1k-16k,
head dim 64/128/256, causal and not, plus GQA 32q/8kv at seq 4k, head dim 128. Every
timing goes through `jaxpp.kernels.tuning.benchmark` (CUPTI device time, median of 30
samples, fresh inputs, L2 flush, correctness gate against a float32 reference).

    python benchmarks/attention_bench.py --out results.json            # whole grid
    python benchmarks/attention_bench.py --head-dims 128 --seqs 4096   # a slice
    python benchmarks/attention_bench.py --plot results.json           # PNG + table

Hang-proof by default on a GPU (`--isolate`): this process never touches the GPU; it runs
the ceilings and then one child process per shape (all its modes and implementations),
prints each row's name before it starts, and kills a child whose row makes no progress
for `--row-timeout` seconds. That row is recorded with `"status": "timeout"`, its
implementation is skipped in the later shapes (`"status": "skipped"`), and a fresh
child takes the shape's remaining rows. Every row has a `status`: ok, error, timeout or
skipped. `--no-isolate` runs everything in this process (CPU smoke tests).

tokamax is optional (`--impls`); it imports `xprof.cli.tools` at load, which a stub
package made here satisfies when xprof is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import math
import os
import pathlib
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

TOKENS = 16384
WIDTH = 2048
SEQS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
IMPLS = ("ours", "cudnn", "tokamax", "xla")
# Variants of ours: forward-config overrides timed beside the default (on head dim 128).
VARIANTS = {
    "ours_pp": ({"pingpong": True}, {}),
    "ours_ov": ({}, {"overlap": True}),
    "ours_pp_ov": ({"pingpong": True}, {"overlap": True}),
    "ours_v1": ({"pingpong": False}, {"overlap": False}),
    # fused backward (dK, dV, dQ in one kernel, ordered float32 dQ adds; at head dim 256
    # with the default split_dkv: a fused dK + dQ kernel and the dV pass)
    "ours_fused": ({}, {"fused": True}),
    # forward: S of step j+1 issued beside P V of step j (FA3 intra-warpgroup overlap),
    # on top of ping-pong (the lazy O rescale is disabled: NaN and a hang in run 4, and
    # ours_next = lookahead + lazy + fused went with it; kernels/attention/NOTES.md)
    "ours_la": ({"pingpong": True, "lookahead": True}, {}),
}
# Variants that only support some head dims (others are skipped, not recorded as errors).
VARIANT_MAX_HEAD_DIM: dict[str, int] = {}
XLA_MAX_SEQ = 4096  # the XLA baseline materialises [B, N, T, S] logits
# A child still running this long after --budget is killed (its finished rows are kept,
# the rest recorded as skipped), so the JSON and the summary are written in time.
BUDGET_GRACE_S = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    batch: int
    seq: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool

    @property
    def name(self) -> str:
        gqa = f"/{self.num_kv_heads}kv" if self.num_kv_heads != self.num_heads else ""
        c = " causal" if self.causal else ""
        return f"b{self.batch} s{self.seq} h{self.num_heads}{gqa} d{self.head_dim}{c}"

    def forward_flops(self) -> float:
        f = 4.0 * self.batch * self.num_heads * self.seq * self.seq * self.head_dim
        return f / 2 if self.causal else f

    def forward_bytes(self) -> float:
        q = self.batch * self.seq * self.num_heads * self.head_dim * 2
        kv = self.batch * self.seq * self.num_kv_heads * self.head_dim * 2
        return 2.0 * q + 2.0 * kv  # q read, o written, k and v read


def grid(
    head_dims: tuple[int, ...],
    seqs: tuple[int, ...],
    gqa: bool,
    *,
    tokens: int = TOKENS,
    width: int = WIDTH,
) -> list[Shape]:
    shapes = []
    for head_dim in head_dims:
        for seq in seqs:
            for causal in (False, True):
                heads = max(1, width // head_dim)
                shapes.append(Shape(max(1, tokens // seq), seq, heads, heads, head_dim, causal))
    if gqa:
        for causal in (False, True):
            shapes.append(Shape(max(1, tokens // 4096), 4096, 32, 8, 128, causal))
    return shapes


def _ensure_xprof_stub() -> None:
    try:
        import xprof.cli.tools  # noqa: F401
    except ImportError:
        root = pathlib.Path(tempfile.mkdtemp(prefix="xprof_stub_"))
        (root / "xprof" / "cli").mkdir(parents=True)
        (root / "xprof" / "__init__.py").write_text("")
        (root / "xprof" / "cli" / "__init__.py").write_text("")
        (root / "xprof" / "cli" / "tools.py").write_text("get_kernel_stats_tool = None\n")
        sys.path.insert(0, str(root))


def implementations(
    names: tuple[str, ...], *, interpret: bool = False
) -> dict[str, Callable[..., Any]]:
    """name -> attention(q, k, v, causal) for the implementations that import here."""
    import jax

    from jaxpp.kernels.attention import dot_product_attention

    out: dict[str, Callable[..., Any]] = {}
    for name in names:
        if name == "ours":
            out[name] = lambda q, k, v, causal: dot_product_attention(
                q, k, v, causal=causal, implementation="mosaic", interpret=interpret
            )
        elif name == "triton":  # ours, Pallas Triton (not in the default list yet)
            out[name] = lambda q, k, v, causal: dot_product_attention(
                q, k, v, causal=causal, implementation="triton", interpret=interpret
            )
        elif name in VARIANTS:
            out[name] = _variant(*VARIANTS[name], interpret=interpret)
        elif name == "cudnn":
            out[name] = lambda q, k, v, causal: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation="cudnn"
            )
        elif name == "xla":
            out[name] = lambda q, k, v, causal: dot_product_attention(
                q, k, v, causal=causal, implementation="xla"
            )
        elif name == "tokamax":
            _ensure_xprof_stub()
            try:
                import tokamax
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                print(f"tokamax unavailable: {type(e).__name__}: {e}")
                continue
            out[name] = lambda q, k, v, causal: tokamax.dot_product_attention(
                q, k, v, is_causal=causal, implementation="mosaic"
            )
    return out


def _variant(
    forward: dict[str, Any], backward: dict[str, Any], *, interpret: bool
) -> Callable[..., Any]:
    import jax

    from jaxpp.kernels.attention import default_configs, dot_product_attention

    def attn(q, k, v, causal):
        fwd, bwd = default_configs(jax.devices()[0].device_kind, q.shape[-1])
        return dot_product_attention(
            q,
            k,
            v,
            causal=causal,
            implementation="mosaic",
            interpret=interpret,
            forward_config=dataclasses.replace(fwd, **forward),
            backward_config=dataclasses.replace(bwd, **backward),
        )

    return attn


def reference_forward(q, k, v, causal):
    """float32 attention, one kv-head group at a time (bounded memory)."""
    import jax
    import jax.numpy as jnp

    from jaxpp.kernels.attention import xla_attention

    group = q.shape[2] // k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def one(args):
        qh, kh, vh = args  # [B, T, G, H], [B, S, 1, H]
        return xla_attention(qh, kh, vh, causal=causal, scale=scale)

    qs = jnp.moveaxis(q.astype(jnp.float32).reshape(*q.shape[:2], k.shape[2], group, -1), 2, 0)
    ks = jnp.moveaxis(k.astype(jnp.float32), 2, 0)[:, :, :, None]
    vs = jnp.moveaxis(v.astype(jnp.float32), 2, 0)[:, :, :, None]
    out = jax.lax.map(one, (qs, ks, vs))  # [K, B, T, G, H]
    return jnp.moveaxis(out, 0, 2).reshape(q.shape)


def reference_vjp(q, k, v, do, causal):
    """float32 (out, dq, dk, dv), one kv-head group at a time."""
    import jax
    import jax.numpy as jnp

    from jaxpp.kernels.attention import xla_attention

    kvh, group = k.shape[2], q.shape[2] // k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def one(args):
        qh, kh, vh, doh = args
        out, pull = jax.vjp(
            lambda a, b, c: xla_attention(a, b, c, causal=causal, scale=scale), qh, kh, vh
        )
        return (out, *pull(doh))

    def split_q(x):
        return jnp.moveaxis(x.astype(jnp.float32).reshape(*x.shape[:2], kvh, group, -1), 2, 0)

    def split_kv(x):
        return jnp.moveaxis(x.astype(jnp.float32), 2, 0)[:, :, :, None]

    out, dq, dk, dv = jax.lax.map(one, (split_q(q), split_kv(k), split_kv(v), split_q(do)))
    merge_q = lambda x: jnp.moveaxis(x, 0, 2).reshape(q.shape)  # noqa: E731
    merge_kv = lambda x: jnp.moveaxis(x[:, :, :, 0], 0, 2)  # noqa: E731
    return merge_q(out), merge_q(dq), merge_kv(dk), merge_kv(dv)


def plan_rows(
    shapes: list[Shape],
    names: tuple[str, ...],
    modes: tuple[str, ...],
    *,
    xla_max_seq: int = XLA_MAX_SEQ,
    variant_head_dims: tuple[int, ...] = (128,),
) -> list[tuple[Shape, str, str]]:
    """The (shape, mode, impl) rows of a run, in run order (pure: no JAX)."""
    rows = []
    for shape in shapes:
        for mode in modes:
            for name in names:
                if name == "xla" and shape.seq > xla_max_seq:
                    continue
                if name in VARIANTS and shape.head_dim not in variant_head_dims:
                    continue
                if shape.head_dim > VARIANT_MAX_HEAD_DIM.get(name, shape.head_dim):
                    continue
                if name in VARIANTS and mode == "fwd" and not VARIANTS[name][0]:
                    continue  # a backward-only variant has the default forward
                rows.append((shape, mode, name))
    return rows


def _row_label(shape: Shape, mode: str, name: str) -> str:
    return f"{shape.name:32s} {mode:7s} {name:12s}"


def run_grid(
    shapes: list[Shape],
    impls: dict[str, Callable[..., Any]],
    samples: int,
    modes: tuple[str, ...],
    *,
    xla_max_seq: int = XLA_MAX_SEQ,
    variant_head_dims: tuple[int, ...] = (128,),
    save: Callable[[list[dict[str, Any]]], None] | None = None,
    only: set[tuple[str, str, str]] | None = None,
    row_timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Times the planned rows in this process; `only`: (shape name, mode, impl) to run.

    Each row's label is printed (and flushed) before it starts; with `row_timeout`, a
    row still running after it dumps every thread's Python stack to stderr.
    """
    rows: list[dict[str, Any]] = []
    caches: dict[tuple[str, str], dict[str, Any]] = {}  # float32 reference per shape, mode
    planned = plan_rows(
        shapes, tuple(impls), modes, xla_max_seq=xla_max_seq, variant_head_dims=variant_head_dims
    )
    for shape, mode, name in planned:
        if only is not None and (shape.name, mode, name) not in only:
            continue
        print(f"START {_row_label(shape, mode, name)}", flush=True)
        if row_timeout:
            faulthandler.dump_traceback_later(max(5.0, row_timeout - 10.0), exit=False)
        if (shape.name, mode) not in caches:
            caches.clear()  # one reference in device memory at a time
        cache = caches.setdefault((shape.name, mode), {})
        row = _bench_one(shape, mode, name, impls[name], samples, cache)
        faulthandler.cancel_dump_traceback_later()
        rows.append(row)
        status = row.get("error", "")[:80] or (
            f"{row['tflops']:7.1f} TFLOP/s  err {row['rel_error']:.1e}  spread {row['spread']:.2f}"
        )
        print(f"{_row_label(shape, mode, name)} {status}  ({row['wall_s']:.0f}s)", flush=True)
        if save is not None:
            save(rows)
    return rows


def _bench_one(
    shape: Shape,
    mode: str,
    name: str,
    attn: Callable[..., Any],
    samples: int,
    cache: dict[str, Any],
) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from jaxpp.kernels import tuning

    q_shape = (shape.batch, shape.seq, shape.num_heads, shape.head_dim)
    kv_shape = (shape.batch, shape.seq, shape.num_kv_heads, shape.head_dim)
    causal = shape.causal

    def make_fwd(key):
        kq, kk, kv = jax.random.split(key, 3)
        return (
            jax.random.normal(kq, q_shape, jnp.bfloat16),
            jax.random.normal(kk, kv_shape, jnp.bfloat16),
            jax.random.normal(kv, kv_shape, jnp.bfloat16),
        )

    def make_bwd(key):
        k1, k2 = jax.random.split(key)
        return (*make_fwd(k1), jax.random.normal(k2, q_shape, jnp.bfloat16))

    def fwd_bwd(q, k, v, do):
        out, pull = jax.vjp(lambda a, b, c: attn(a, b, c, causal), q, k, v)
        return (out, *pull(do))

    flops = shape.forward_flops() * (1.0 if mode == "fwd" else 3.5)
    nbytes = shape.forward_bytes() * (1.0 if mode == "fwd" else 3.0)
    if mode == "fwd":
        fn = jax.jit(lambda q, k, v: attn(q, k, v, causal))
        ref_fn = jax.jit(lambda q, k, v: reference_forward(q, k, v, causal))
        make = make_fwd
    else:
        fn = jax.jit(fwd_bwd)
        ref_fn = jax.jit(lambda q, k, v, do: reference_vjp(q, k, v, do, causal))
        make = make_bwd

    def ref(*args):  # the gate's inputs (seed 0) are the same for every implementation
        if "ref" not in cache:
            cache["ref"] = ref_fn(*args)
        return cache["ref"]

    row: dict[str, Any] = {
        "shape": dataclasses.asdict(shape),
        "name": shape.name,
        "mode": mode,
        "impl": name,
        "flops": flops,
        "bytes": nbytes,
    }
    start = time.time()
    try:
        m = tuning.benchmark(
            fn,
            make,
            reference=ref,
            rtol=2e-2,
            samples=samples,
            warmup=2,
            flops=flops,
            bytes_moved=nbytes,
        )
        row.update(m.to_dict())
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, the grid goes on
        row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        row["status"] = "error"
        traceback.print_exc(limit=3)
    row["wall_s"] = time.time() - start
    return row


def _impls_in(rows: list[dict[str, Any]]) -> list[str]:
    """Implementations with a timing in `rows`: the known order, then others (variants
    of older runs that were dropped since, e.g. ours_la_lazy)."""
    timed = {r["impl"] for r in rows if r.get("tflops")}
    known = (*IMPLS, "triton", *VARIANTS)
    return [i for i in known if i in timed] + sorted(timed - set(known))


def summarize(rows: list[dict[str, Any]]) -> str:
    """Geomean ratios of ours (and variants) vs each baseline per head dim and mode, a table."""
    by_key: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r.get("tflops"):
            by_key.setdefault((r["name"], r["mode"]), {})[r["impl"]] = r["tflops"]
    lines = [
        "| head dim | mode | vs cudnn | vs tokamax | vs xla | shapes |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int, str], dict[str, list[float]]] = {}
    for (name, mode), t in by_key.items():
        head_dim = int(name.split(" d")[1].split()[0])
        for ours in [i for i in _impls_in(rows) if i.startswith("ours")]:
            if ours not in t:
                continue
            g = groups.setdefault((ours, head_dim, mode), {})
            for base in ("cudnn", "tokamax", "xla"):
                if base in t:
                    g.setdefault(base, []).append(t[ours] / t[base])
    for (ours, head_dim, mode), g in sorted(groups.items()):
        cells = []
        for base in ("cudnn", "tokamax", "xla"):
            v = g.get(base)
            cells.append(f"{math.exp(sum(map(math.log, v)) / len(v)):.2f}x" if v else "-")
        n = max((len(v) for v in g.values()), default=0)
        label = f"{head_dim}" if ours == "ours" else f"{head_dim} ({ours})"
        lines.append(f"| {label} | {mode} | {' | '.join(cells)} | {n} |")
    columns = _impls_in(rows)
    lines.append("")
    lines.append("| shape | mode | " + " | ".join(columns) + " |")
    lines.append("|---|---|" + "---|" * len(columns))
    for (name, mode), t in by_key.items():
        cells = [f"{t[i]:.0f}" if i in t else "-" for i in columns]
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["shape"]["head_dim"] for r in rows if r.get("tflops")})
    panels = [(d, c, m) for d in dims for c in (False, True) for m in ("fwd", "fwd_bwd")]
    fig, axes = plt.subplots(len(dims), 4, figsize=(18, 3.7 * len(dims)), squeeze=False)
    impls = _impls_in(rows)
    for ax, (d, c, m) in zip(axes.flat, panels, strict=True):
        for impl in impls:
            pts = sorted(
                (r["shape"]["seq"], r["tflops"])
                for r in rows
                if r.get("tflops")
                and r["impl"] == impl
                and r["mode"] == m
                and r["shape"]["head_dim"] == d
                and r["shape"]["causal"] == c
                and r["shape"]["num_kv_heads"] == r["shape"]["num_heads"]
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"d{d} {'causal' if c else 'full'} {m}", fontsize=9)
        ax.set_xlabel("seq")
        ax.set_ylabel("TFLOP/s")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "."), "attention_bench.json")
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--no-gqa", action="store_true")
    parser.add_argument("--xla-max-seq", type=int, default=XLA_MAX_SEQ)
    parser.add_argument("--variant-head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test of the script")
    parser.add_argument("--plot", help="a results JSON: write its PNG and table, no run")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="child processes with per-row timeouts (default: on unless --interpret)",
    )
    parser.add_argument("--row-timeout", type=float, default=90.0, help="seconds per row")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds; no new shape after, and a child still running {BUDGET_GRACE_S:.0f} s "
        "after it is stopped",
    )
    parser.add_argument("--child-rows", help=argparse.SUPPRESS)  # JSON [[shape, mode, impl]]
    parser.add_argument("--ceilings-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot:
        data = json.loads(pathlib.Path(args.plot).read_text())
        png = pathlib.Path(args.plot).with_suffix(".png")
        plot(data["results"], png)
        print(summarize(data["results"]))
        return 0
    shapes = grid(
        tuple(args.head_dims),
        tuple(args.seqs),
        gqa=not args.no_gqa and 128 in args.head_dims,
        tokens=args.tokens,
        width=args.width,
    )
    grid_info = {"tokens": args.tokens, "width": args.width, "dtype": "bfloat16"}
    isolate = (not args.interpret) if args.isolate is None else args.isolate
    if isolate and args.child_rows is None and not args.ceilings_only:
        return _run_isolated(args, shapes, grid_info, argv)

    from jaxpp.kernels import tuning

    if args.ceilings_only:
        env = tuning.environment()
        print(json.dumps(env), flush=True)
        ceilings = tuning.measure_ceilings()
        print(ceilings, flush=True)
        pathlib.Path(args.out).write_text(
            json.dumps({"environment": env, "ceilings": dataclasses.asdict(ceilings)})
        )
        return 0
    if args.child_rows is not None:  # one child of an isolated run: rows only, plain JSON
        only = {tuple(r) for r in json.loads(args.child_rows)}
        impls = implementations(tuple(args.impls), interpret=args.interpret)

        def save_child(rows: list[dict[str, Any]]) -> None:
            pathlib.Path(args.out).write_text(json.dumps({"results": rows}))

        run_grid(
            shapes,
            impls,
            args.samples,
            tuple(args.modes),
            xla_max_seq=args.xla_max_seq,
            save=save_child,
            variant_head_dims=tuple(args.variant_head_dims),
            only=only,
            row_timeout=args.row_timeout,
        )
        return 0

    print(json.dumps(tuning.environment()), flush=True)
    ceilings = tuning.measure_ceilings()
    print(ceilings, flush=True)
    impls = implementations(tuple(args.impls), interpret=args.interpret)

    def save(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            if r.get("median_s"):
                r["t_sol_s"] = tuning.sol_time(r["flops"], r["bytes"], ceilings)
        tuning.write_results(
            args.out, results=rows, ceilings=ceilings, grid={**grid_info, "argv": sys.argv[1:]}
        )

    rows = run_grid(
        shapes,
        impls,
        args.samples,
        tuple(args.modes),
        xla_max_seq=args.xla_max_seq,
        save=save,
        variant_head_dims=tuple(args.variant_head_dims),
        row_timeout=args.row_timeout,
    )
    print(summarize(rows))
    return 0


def _run_isolated(
    args: argparse.Namespace,
    shapes: list[Shape],
    grid_info: dict[str, Any],
    argv: list[str] | None,
) -> int:
    """The parent of an isolated run: never touches the GPU; children time the rows."""
    start = time.time()
    budget_end = start + args.budget if args.budget else math.inf
    work = pathlib.Path(tempfile.mkdtemp(prefix="attention_bench_"))
    base = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__)]
    base += [a for a in (sys.argv[1:] if argv is None else argv)]
    environment: dict[str, Any] = {}
    ceilings: dict[str, float] | None = None
    ceil_out = work / "ceilings.json"
    status, _ = _run_child([*base, "--ceilings-only", "--out", str(ceil_out)], 90.0, None)
    if ceil_out.exists():
        data = json.loads(ceil_out.read_text())
        environment, ceilings = data["environment"], data["ceilings"]
    else:
        print(f"ceilings child: {status}; rows get no t_sol_s", flush=True)

    planned = plan_rows(
        shapes,
        tuple(args.impls),
        tuple(args.modes),
        xla_max_seq=args.xla_max_seq,
        variant_head_dims=tuple(args.variant_head_dims),
    )
    rows: list[dict[str, Any]] = []
    hung: dict[str, str] = {}  # impl -> the row where it timed out

    def record(shape: Shape, mode: str, name: str, status: str, error: str) -> None:
        print(f"{_row_label(shape, mode, name)} {status.upper()}: {error}", flush=True)
        rows.append(
            {
                "shape": dataclasses.asdict(shape),
                "name": shape.name,
                "mode": mode,
                "impl": name,
                "status": status,
                "error": error,
            }
        )

    for shape in shapes:
        todo = [(sh, m, n) for sh, m, n in planned if sh == shape]
        while todo:
            todo_now = []
            for sh, m, n in todo:
                if n in hung:
                    record(sh, m, n, "skipped", f"{n} timed out earlier ({hung[n]})")
                elif time.time() > budget_end:
                    record(sh, m, n, "skipped", "the run's --budget was spent")
                else:
                    todo_now.append((sh, m, n))
            if not todo_now:
                break
            out = work / f"rows_{len(rows)}.json"
            child_rows = json.dumps([[sh.name, m, n] for sh, m, n in todo_now])
            cmd = [*base, "--out", str(out), "--child-rows", child_rows, "--no-isolate"]
            status, started = _run_child(cmd, args.row_timeout, budget_end)
            done = json.loads(out.read_text())["results"] if out.exists() else []
            rows.extend(done)
            finished = {(r["name"], r["mode"], r["impl"]) for r in done}
            todo = [(sh, m, n) for sh, m, n in todo_now if (sh.name, m, n) not in finished]
            if not todo:
                break
            if status == "budget":  # stopped by the parent: nothing to blame
                for t in todo:
                    record(*t, "skipped", "the run's --budget was spent (child stopped)")
                break
            # the child stopped early: blame the row it had started, if it had one
            culprit = next(
                (t for t in todo if started and _row_label(*t).strip() == started), todo[0]
            )
            if status == "timeout":
                hung[culprit[2]] = f"{culprit[0].name} {culprit[1]}"
                record(*culprit, "timeout", f"no progress in {args.row_timeout:.0f} s (killed)")
            elif started is None:  # died before its first row: do not retry row by row
                for t in todo:
                    record(*t, "error", f"child process {status} before its first row")
                break
            else:
                record(*culprit, "error", f"child process {status}")
            todo = [t for t in todo if t != culprit]
        _write_merged(args.out, rows, ceilings, environment, grid_info)
    _write_merged(args.out, rows, ceilings, environment, grid_info)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "error", "timeout")}
    counts["skipped"] = sum(r.get("status") == "skipped" for r in rows)
    print(f"rows: {counts}  ({time.time() - start:.0f} s)", flush=True)
    print(summarize(rows))
    return 0


def _run_child(
    cmd: list[str], row_timeout: float, budget_end: float | None
) -> tuple[str, str | None]:
    """Runs a child, echoing its output; kills it when a row makes no progress in time.

    Returns (status, label of the row it had started last): status is "ok", "timeout",
    "budget" (still running `BUDGET_GRACE_S` after `budget_end`: killed) or "exit <code>".
    """
    hard_end = math.inf if budget_end is None else budget_end + BUDGET_GRACE_S
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: kill takes its helpers too
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    started: str | None = None
    deadline = time.time() + row_timeout + 60.0  # startup: imports, first compile
    while True:
        if time.time() >= hard_end:
            print(f"... --budget spent {BUDGET_GRACE_S:.0f} s ago: killing the child", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "budget", started
        try:
            line = lines.get(timeout=max(0.1, min(deadline, hard_end) - time.time()))
        except queue.Empty:
            if time.time() < deadline:
                continue  # hard_end: handled above
            print(f"... no progress for {row_timeout:.0f} s: killing the child", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", started
        if line is None:
            break
        print(line, end="", flush=True)
        if line.startswith("START "):
            started = line[len("START ") :].strip()
            deadline = time.time() + row_timeout
    code = proc.wait()
    return ("ok" if code == 0 else f"exit {code}"), started


def _write_merged(
    path: str,
    rows: list[dict[str, Any]],
    ceilings: dict[str, float] | None,
    environment: dict[str, Any],
    grid_info: dict[str, Any],
) -> None:
    for r in rows:
        if r.get("median_s") and ceilings:
            r["t_sol_s"] = max(
                r["flops"] / (ceilings["matmul_bf16_tflops"] * 1e12),
                r["bytes"] / ceilings["hbm_bytes_per_s"],
            )
    payload = {
        "environment": environment,
        "results": rows,
        "ceilings": ceilings,
        "grid": {**grid_info, "argv": sys.argv[1:]},
    }
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    sys.exit(main())
