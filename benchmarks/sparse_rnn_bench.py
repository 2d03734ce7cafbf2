"""Sparse persistent RNN benchmark (issue 8): correctness on GPU, variants, the sweep.

Run on the GPU machine:
    python3 benchmarks/sparse_rnn_bench.py --mode check,quick --out $OUT
    python3 benchmarks/sparse_rnn_bench.py --mode sweep --out $OUT
    python3 benchmarks/sparse_rnn_bench.py --mode variants --variants f16_pf --out $OUT/f16_pf
    python3 benchmarks/sparse_rnn_bench.py --mode variants --variants mosaic --out $OUT/mosaic
(kernels/sparse_rnn/NOTES.md has the exact command of the next run: one process per variant
under `timeout`, so a variant that hangs or compiles for minutes costs only its own slot.)

Modes (comma-separated):
    check  the persistent kernel against the float32 dense masked reference over 256+ steps
           (forward and gradients), several sizes and cells.
    quick  kernel variants (warps, resident chunks, bank-aware order) at hidden 2304, batch 4,
           density 30%, LSTM, forward and forward+backward, with the baselines.
    variants  the named kernel variants (`VARIANTS`, `--variants a,b`): LSTM B=4 at H=2304 d=30%
           forward (checked against the reference) and forward+backward, and H=4096 d=10%
           forward; `--baselines dense,cudnn` adds the baselines at those sizes.
    sweep  hidden {1152, 2304, 4096} x batch {1, 4, 16} x density {5, 10, 30}% x {lstm, tanh},
           256 steps, with the baselines: dense `lax.scan` (bf16), cuDNN LSTM
           (`jax.experimental.rnn.lstm`, f32), `jax.experimental.sparse` BCOO in a scan (f32).
Times are per step: the harness's median device time of one call over `steps`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.kernels import sparse_rnn as sr
from jaxpp.kernels import tuning
from jaxpp.kernels.sparse_rnn import _cells

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
GATES = {"tanh": 1, "gru": 3, "lstm": 4}
STEPS = 256
SAMPLES = 30
_SINK: list = []  # the function that rewrites the result file after every measurement


def _weights(hidden, cell, density, *, seed=0, bank_aware=True):
    g = GATES[cell]
    rng = np.random.default_rng(seed)
    # Gain 0.5: a contractive recurrence, so float32 rounding does not grow over the steps.
    w = rng.normal(size=(hidden, g * hidden)).astype(np.float32) * 0.5 / math.sqrt(density * hidden)
    return sr.SparseRecurrentWeights.prune(w, density, num_gates=g, bank_aware=bank_aware)


def _make_inputs(batch, hidden, cell):
    g = GATES[cell]

    def make(key):
        kx, kh, kc = jax.random.split(key, 3)
        x = jax.random.normal(kx, (batch, STEPS, g * hidden), jnp.float32)
        h0 = jax.random.normal(kh, (batch, hidden), jnp.float32) * 0.5
        c0 = jax.random.normal(kc, (batch, hidden), jnp.float32) * 0.5
        return x, h0, c0

    return make


def _loss_weights(batch, hidden):
    return jnp.asarray(np.random.default_rng(7).normal(size=(batch, STEPS, hidden)), jnp.float32)


# ------------------------------------------------------------------------------------- check


def run_check(log, variant=None):
    """Kernel vs reference over 256+ steps; `variant` names an entry of `VARIANTS`."""
    kw = {k: v for k, v in VARIANTS[variant].items() if k != "bank_aware"} if variant else {}
    kw.setdefault("implementation", "persistent")
    rows = []
    cases = [("lstm", 2304, 4, 0.3, 256), ("gru", 1152, 16, 0.1, 300)]
    for cell, hidden, batch, density, steps in cases:
        w = _weights(hidden, cell, density, seed=hidden)
        key = jax.random.key(hidden + batch)
        kx, kh, kc, kg = jax.random.split(key, 4)
        g = GATES[cell]
        x = jax.random.normal(kx, (batch, steps, g * hidden), jnp.float32)
        h0 = jax.random.normal(kh, (batch, hidden), jnp.float32) * 0.5
        c0 = jax.random.normal(kc, (batch, hidden), jnp.float32) * 0.5
        ct = jax.random.normal(kg, (batch, steps, hidden), jnp.float32)

        def loss(impl, x, h0, c0, vals, w=w, cell=cell, ct=ct):
            opts = kw if impl == "persistent" else dict(implementation="reference")
            hs = sr.sparse_rnn(x, h0, w.with_values(vals), cell=cell, c0=c0, **opts)
            return jnp.sum(hs * ct), hs

        out = {}
        for impl in ("persistent", "reference"):
            fn = jax.jit(
                jax.value_and_grad(
                    lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2, 3), has_aux=True
                )
            )
            (_, hs), grads = fn(x, h0, c0, w.values)
            out[impl] = (hs, grads)
        errs = {"h": tuning.relative_error(out["persistent"][0], out["reference"][0])}
        for name, a, b in zip(
            ("dx", "dh0", "dc0", "dw"), out["persistent"][1], out["reference"][1], strict=True
        ):
            if cell != "lstm" and name == "dc0":
                continue
            errs[name] = tuning.relative_error(a, b)
        ok = all(e < 2e-3 for e in errs.values())
        row = dict(
            variant=variant or "default",
            cell=cell,
            hidden=hidden,
            batch=batch,
            density=density,
            steps=steps,
            ok=ok,
            **{f"rel_err_{k}": v for k, v in errs.items()},
        )
        log(
            f"check {cell} H={hidden} B={batch} d={density} T={steps}: "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            + f" {'OK' if ok else 'FAIL'}"
        )
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------- methods


def _sparse_fn(w, cell, *, backward, **kw):
    def fwd(x, h0, c0):
        return sr.sparse_rnn(x, h0, w, cell=cell, c0=c0, **kw)

    if not backward:
        return jax.jit(fwd)
    ct = _loss_weights(1, w.hidden_size)

    def loss(x, h0, c0, vals):
        hs = sr.sparse_rnn(x, h0, w.with_values(vals), cell=cell, c0=c0, **kw)
        return jnp.sum(hs * ct)

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return lambda x, h0, c0: g(x, h0, c0, w.values)


def _dense_scan_fn(w_dense, cell, *, backward):
    """Dense `lax.scan`, bf16 weights and state, float32 cell math (the XLA baseline)."""
    hidden = w_dense.shape[0]
    g = GATES[cell]
    wb = jnp.asarray(w_dense, jnp.bfloat16)

    def run(x, h0, c0, wb):
        def step(carry, x_t):
            h, c = carry
            m = jnp.dot(h, wb, preferred_element_type=jnp.float32)
            xs = jnp.split(x_t, g, axis=-1)
            ms = jnp.split(m, g, axis=-1)
            h32, c = _cells.cell_forward(cell, xs, ms, h.astype(jnp.float32), c)
            return (h32.astype(jnp.bfloat16), c), h32

        _, hs = jax.lax.scan(step, (h0.astype(jnp.bfloat16), c0), jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(hs, 0, 1)

    if not backward:
        return jax.jit(lambda x, h0, c0: run(x, h0, c0, wb))
    ct = _loss_weights(1, hidden)
    grad = jax.jit(
        jax.grad(lambda x, h0, c0, wb: jnp.sum(run(x, h0, c0, wb) * ct), argnums=(0, 1, 2, 3))
    )
    return lambda x, h0, c0: grad(x, h0, c0, wb)


def _bcoo_scan_fn(w_dense, cell, *, backward):
    """`jax.experimental.sparse` BCOO matrix in a `lax.scan`, float32."""
    from jax.experimental import sparse

    g = GATES[cell]
    ws = sparse.BCOO.fromdense(jnp.asarray(w_dense, jnp.float32))

    def run(x, h0, c0):
        def step(carry, x_t):
            h, c = carry
            m = (ws.T @ h.T).T
            h, c = _cells.cell_forward(cell, jnp.split(x_t, g, -1), jnp.split(m, g, -1), h, c)
            return (h, c), h

        _, hs = jax.lax.scan(step, (h0, c0), jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(hs, 0, 1)

    assert not backward
    return jax.jit(run)


def _cudnn_fn(hidden, batch, *, backward, input_size=64):
    """cuDNN LSTM through `jax.experimental.rnn.lstm` (f32). Its input GEMM is inside, so the
    input is `input_size` wide (small) and the recurrent part dominates."""
    from jax.experimental import rnn

    wts = rnn.init_lstm_weight(jax.random.key(0), input_size, hidden, 1, False)
    seq = jnp.full((batch,), STEPS, jnp.int32)

    def run(xi, h0, c0, wts):
        y, _, _ = rnn.lstm(xi, h0[None], c0[None], wts, seq, input_size, hidden, 1, 0.0, False)
        return y

    xi = jax.random.normal(jax.random.key(1), (batch, STEPS, input_size), jnp.float32)
    if not backward:
        f = jax.jit(run)
        return lambda x, h0, c0: f(xi, h0, c0, wts)
    ct = _loss_weights(1, hidden)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a) * ct), argnums=(0, 1, 2, 3)))
    return lambda x, h0, c0: grad(xi, h0, c0, wts)


def _time(fn, make, reference=None, rtol=5e-2):
    m = tuning.benchmark(fn, make, reference=reference, rtol=rtol, samples=SAMPLES)
    return m


def _measure(log, results, tag, fn_maker, make, reference=None, rtol=5e-2, **meta):
    t0 = time.time()
    try:
        fn = fn_maker()
        m = _time(fn, make, reference, rtol)
        us = m.median_s / STEPS * 1e6
        row = dict(
            method=tag,
            us_per_step=us,
            spread=m.spread,
            rel_error=m.rel_error,
            median_s=m.median_s,
            **meta,
        )
        log(
            f"{tag:34s} {json.dumps(meta):90s} {us:9.2f} us/step  err={m.rel_error}  "
            f"({time.time() - t0:.1f}s)"
        )
    except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row = dict(method=tag, error=msg, **meta)
        log(f"{tag:34s} {json.dumps(meta):90s} FAILED {msg}")
        traceback.print_exc(limit=3, file=sys.stderr)
    results.append(row)
    if _SINK:
        _SINK[0](results)
    return row


def _implementation(w, cell, batch, kw):
    """The kernel a variant runs: its own `implementation`, or what "auto" picks here."""
    from jaxpp.kernels.sparse_rnn import _api

    shape = (batch, STEPS, GATES[cell] * w.hidden_size)
    return _api.chosen_implementation(w, cell, shape, **kw)


def _reference_fn(w, cell):
    dense = w.to_dense()

    def ref(x, h0, c0):
        return sr.sparse_rnn_reference(x, h0, dense, cell=cell, c0=c0)

    return jax.jit(ref)


def _sparse_case(
    log, results, hidden, batch, density, cell, *, backward, variants, baselines, bank_aware=True
):
    """`bank_aware`: the order of the weights the baselines and reference use; variants that
    ask for the other order get their own packing (pruning at H=4096 takes seconds)."""
    w = _weights(hidden, cell, density, bank_aware=bank_aware)
    make = _make_inputs(batch, hidden, cell)
    meta = dict(hidden=hidden, batch=batch, density=density, cell=cell, backward=backward)
    ref = None if backward else _reference_fn(w, cell)
    for name, kw in variants:
        order = kw.get("bank_aware", True)
        wv = w if order == bank_aware else _weights(hidden, cell, density, bank_aware=order)
        kw = {k: v for k, v in kw.items() if k != "bank_aware"}
        _measure(
            log,
            results,
            f"sparse[{name}]",
            lambda wv=wv, kw=kw: _sparse_fn(wv, cell, backward=backward, **kw),
            make,
            ref,
            2e-3,
            **meta,
            implementation=_implementation(wv, cell, batch, kw),
        )
    dense = np.asarray(w.to_dense())
    if "dense" in baselines:
        _measure(
            log,
            results,
            "dense_scan_bf16",
            lambda: _dense_scan_fn(dense, cell, backward=backward),
            make,
            ref,
            5e-2,
            **meta,
        )
    if "bcoo" in baselines and not backward:
        _measure(
            log,
            results,
            "bcoo_scan_f32",
            lambda: _bcoo_scan_fn(dense, cell, backward=False),
            make,
            ref,
            2e-3,
            **meta,
        )
    if "cudnn" in baselines and cell == "lstm":
        _measure(
            log,
            results,
            "cudnn_lstm_f32",
            lambda: _cudnn_fn(hidden, batch, backward=backward),
            make,
            None,
            **meta,
        )


def _variant(nw, stages=1, res=0):
    name = f"nw{nw}_s{stages}_res{res}"
    return name, dict(
        implementation="persistent", num_warps=nw, num_stages=stages, resident_chunks=res
    )


QUICK_VARIANTS = [
    _variant(16),
    _variant(8),
    _variant(16, 1, 4),
    ("nw16_s1_res0_sorted", _variant(16)[1] | {"bank_aware": False}),
]


# Named variants of the persistent kernel for `--mode variants` (kernels/sparse_rnn/NOTES.md
# models each). All use column order (`bank_aware=False`), the fastest layout measured. `default`
# is `sparse_rnn`'s default: on Hopper `mosaic_packed_bwd3` where the Mosaic forward fits, else
# `f16_u2_bwd3` where the 16-bit slabs are line-aligned (every bar case), else `v3` with the
# backward levers.
# The plain backward (no `dm` copy, no fold, no preload): `sparse_rnn`'s defaults before
# session 8; the variants below name each backward lever they add.
_PLAIN_BACKWARD = dict(dm_dtype="float32", backward_fold=False, backward_preload=False)
_V3 = dict(
    implementation="persistent", num_warps=16, num_stages=1, bank_aware=False,
    state_dtype="float32", unroll=1, **_PLAIN_BACKWARD,
)  # fmt: skip
VARIANTS = {
    # `sparse_rnn`'s default ("auto"): on Hopper the Mosaic forward where it fits, else Triton.
    "default": dict(bank_aware=False),
    "triton_default": dict(implementation="persistent", bank_aware=False),
    "v3": _V3,  # float32 state (H100, 2026-11-22: 19.26 us/step forward at the headline size)
    "pf": _V3 | dict(prefetch=True),
    "f16": _V3 | dict(state_dtype="float16"),
    "f16_pf": _V3 | dict(state_dtype="float16", prefetch=True),
    "f16_pf_nw8": _V3 | dict(state_dtype="float16", prefetch=True, num_warps=8),
    "bf16_pf": _V3 | dict(state_dtype="bfloat16", prefetch=True),
    "f16_u2": _V3 | dict(state_dtype="float16", unroll=2),  # the measured best (16.16 us/step)
    "f16_u4": _V3 | dict(state_dtype="float16", unroll=4),
    # Backward variants (NOTES.md "Backward variants"): the backward gathers a 16-bit copy of
    # dm (float16 with a per-step power-of-two scale, or bfloat16); the forward is f16_u2's.
    "f16_u2_dm16": _V3 | dict(state_dtype="float16", unroll=2, dm_dtype="float16"),
    "f16_u2_dmbf16": _V3 | dict(state_dtype="float16", unroll=2, dm_dtype="bfloat16"),
    # ... and the backward's 2-unit row group folded into one 16-row tile (all gathers wide).
    "f16_u2_fold": _V3 | dict(state_dtype="float16", unroll=2, backward_fold=True),
    "f16_u2_dm16_fold": _V3
    | dict(state_dtype="float16", unroll=2, dm_dtype="float16", backward_fold=True),
    # ... and each step's own inputs loaded before the wait (all three backward levers).
    "f16_u2_bwd3": _V3
    | dict(
        state_dtype="float16",
        unroll=2,
        dm_dtype="float16",
        backward_fold=True,
        backward_preload=True,
    ),
    # The Mosaic GPU forward (weights + float16 h in shared memory; the Triton backward). It
    # cannot hold H=4096 d=10% (240 KiB > 227 KiB of shared memory): that row records the error.
    "mosaic": dict(  # conflict-free slot order
        implementation="mosaic", bank_aware=False, slot_order="conflict_free", **_PLAIN_BACKWARD
    ),
    "mosaic_packed": dict(
        implementation="mosaic", bank_aware=False, slot_order="packed", **_PLAIN_BACKWARD
    ),
    "mosaic_nw32": dict(implementation="mosaic", bank_aware=False, num_warps=32, **_PLAIN_BACKWARD),
    "mosaic_bwd3": dict(
        implementation="mosaic",
        bank_aware=False,
        dm_dtype="float16",
        backward_fold=True,
        backward_preload=True,
    ),
    # H100, 2026-11-22 (session 7): the packed slot order beat the conflict-free one (8.04 vs
    # 9.63 us/step forward), so the three backward levers are also measured behind it.
    "mosaic_packed_bwd3": dict(
        implementation="mosaic",
        bank_aware=False,
        slot_order="packed",
        dm_dtype="float16",
        backward_fold=True,
        backward_preload=True,
    ),
}


def run_variants(log, results, names, baselines):
    """The bar's three LSTM cases (B=4) for each named variant, baselines once per case."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; pick from {sorted(VARIANTS)}")
    variants = [(n, dict(VARIANTS[n])) for n in names]
    cases = [(2304, 0.3, False), (2304, 0.3, True), (4096, 0.1, False)]
    for hidden, density, backward in cases:
        _sparse_case(log, results, hidden, 4, density, "lstm", backward=backward,
                     variants=variants, baselines=baselines, bank_aware=False)  # fmt: skip


def run_quick(log, results):
    _sparse_case(
        log,
        results,
        2304,
        4,
        0.3,
        "lstm",
        backward=False,
        variants=QUICK_VARIANTS,
        baselines=("dense", "cudnn"),
    )
    ok = [r for r in results if r.get("us_per_step") and r["method"].startswith("sparse[")]
    best = min(ok, key=lambda r: r["us_per_step"])["method"][7:-1] if ok else QUICK_VARIANTS[0][0]
    log(f"best variant at the headline size: {best}")
    return dict(QUICK_VARIANTS)[best] | {"name": best}


def run_sweep(
    log, results, variant, budget_s, cells=("lstm", "tanh"), batches=(4, 1, 16),
    hiddens=(2304, 4096, 1152), bar_first=True,
):  # fmt: skip
    """The bar's configurations first (unless `bar_first` is False: filling in cells an
    earlier run left out), then the rest of the grid (`batches`, then `hiddens`, in that
    order) while the budget lasts."""
    start = time.time()
    name = variant.pop("name")
    variant = (name, variant)
    grid = [("lstm", 2304, 4, 0.3), ("lstm", 4096, 4, 0.1), ("tanh", 2304, 4, 0.3)]
    grid = [case for case in grid if case[0] in cells and bar_first]
    grid += [
        (cell, hidden, batch, density)
        for cell in cells
        for batch in batches
        for hidden in hiddens
        for density in (0.3, 0.1, 0.05)
    ]
    seen, dense_done = set(), set()
    capacity = capacity_table()
    for case in grid:
        if case in seen:
            continue
        seen.add(case)
        cell, hidden, batch, density = case
        if time.time() - start > budget_s:
            log(f"budget reached; skipping {cell} H={hidden} B={batch} d={density}")
            continue
        if hidden > capacity[f"{cell}@{density}"]:  # pruning 20M non-zeros alone takes minutes
            msg = f"exceeds the on-chip capacity ({capacity[f'{cell}@{density}']} at this density)"
            log(f"sparse[{name}] {cell} H={hidden} B={batch} d={density}: {msg}")
            meta = dict(hidden=hidden, batch=batch, density=density, cell=cell, backward=False)
            results.append(dict(method=f"sparse[{name}]", error=msg, **meta))
            continue
        base = () if (cell, hidden, batch) in dense_done else ("dense", "cudnn")
        dense_done.add((cell, hidden, batch))
        if batch == 4 and density == 0.3:
            base = base + ("bcoo",)
        _sparse_case(log, results, hidden, batch, density, cell, backward=False,
                     variants=[variant], baselines=base)  # fmt: skip
        if case == ("lstm", 2304, 4, 0.3):
            _sparse_case(log, results, hidden, batch, density, cell, backward=True,
                         variants=[variant], baselines=("dense", "cudnn"))  # fmt: skip


def _largest_hidden(holds):
    """Per cell and density, the largest hidden size (multiples of 128) for which
    `holds(cell, gates, hidden, blocks, slots)` is true; slots per row as the packing rounds
    them (non-zeros per row up to a multiple of 32)."""
    out = {}
    for cell in ("lstm", "gru", "tanh"):
        g = GATES[cell]
        for density in (0.05, 0.1, 0.3):
            best = None
            for hidden in range(256, 16385, 128):
                slots = 32 * math.ceil(round(density * hidden) / 32)
                if holds(cell, g, hidden, sr.default_num_blocks(hidden), slots):
                    best = hidden
            out[f"{cell}@{density}"] = best
    return out


def capacity_table():
    """The largest hidden size the Triton kernel packs within its on-chip budget."""
    return _largest_hidden(
        lambda cell, g, hidden, blocks, slots: (
            g * (hidden // blocks) * slots <= sr.MAX_SLOTS_PER_BLOCK
        )
    )


def mosaic_capacity_table(batch=4):
    """The same for the Mosaic forward (weights and the float16 state in shared memory)."""
    from jaxpp.kernels.sparse_rnn import _kernel, _mosaic

    def holds(cell, g, hidden, blocks, slots):
        base = _kernel.KernelConfig(
            cell=cell, hidden=hidden, gates=g, blocks=blocks, units=hidden // blocks,
            slots=slots, transpose_slots=slots, batch=batch, steps=256, num_warps=16,
        )  # fmt: skip
        try:
            _mosaic.check(_mosaic.MosaicConfig(base))
        except ValueError:
            return False
        return True

    return _largest_hidden(holds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="check,quick")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="for --mode variants")
    parser.add_argument("--baselines", default="", help="e.g. dense,cudnn (--mode variants)")
    parser.add_argument(
        "--check-variant", default=None, help="run --mode check with this named variant"
    )
    parser.add_argument("--sweep-variant", default="default", help="the named variant swept")
    parser.add_argument("--cells", default="lstm,tanh", help="cells of --mode sweep")
    parser.add_argument(
        "--batches", default="4,1,16", help="batch sizes of --mode sweep, in the order swept"
    )
    parser.add_argument(
        "--hiddens", default="2304,4096,1152", help="hidden sizes of --mode sweep, in order"
    )
    parser.add_argument(
        "--no-bar-first", action="store_true",
        help="--mode sweep without the bar's cases first (filling in an earlier run's gaps)",
    )  # fmt: skip
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    env = tuning.environment()
    log(json.dumps(env))
    payload = dict(
        steps=STEPS,
        samples=SAMPLES,
        capacity=capacity_table(),
        mosaic_capacity_batch4=mosaic_capacity_table(),
    )
    results: list[dict] = []
    modes = args.mode.split(",")
    name = "sparse_rnn_" + "_".join(modes) + ".json"
    _SINK.append(lambda rows: tuning.write_results(out / name, results=rows, **payload))
    t0 = time.time()
    if "check" in modes:
        payload["check"] = run_check(log, args.check_variant)
        log(f"check done in {time.time() - t0:.0f}s")
    # Without `quick`, the sweep runs `--sweep-variant` (default: `sparse_rnn`'s own default,
    # "auto": the Mosaic forward on Hopper where it fits, else the Triton kernel).
    variant = dict(VARIANTS[args.sweep_variant]) | {"name": args.sweep_variant}
    if "quick" in modes:
        variant = run_quick(log, results)
    if "sweep" in modes:
        batches = tuple(int(b) for b in args.batches.split(","))
        hiddens = tuple(int(h) for h in args.hiddens.split(","))
        run_sweep(log, results, variant, args.budget_s, tuple(args.cells.split(",")), batches,
                  hiddens, bar_first=not args.no_bar_first)  # fmt: skip
    if "variants" in modes:
        baselines = tuple(b for b in args.baselines.split(",") if b)
        run_variants(log, results, [v for v in args.variants.split(",") if v], baselines)
    tuning.write_results(out / name, results=results, **payload)
    (out / ("sparse_rnn_" + "_".join(modes) + ".log")).write_text("\n".join(lines))
    log(f"total {time.time() - t0:.0f}s; wrote {out / name}")


if __name__ == "__main__":
    main()
