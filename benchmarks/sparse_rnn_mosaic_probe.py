"""Mosaic GPU probe for the sparse persistent RNN (issue 8): sync floor and SMEM gathers.

Run on the GPU machine (about 1-2 minutes; each case in its own process, 55 s timeout):
    source benchmarks/gpu_env.sh && python3 benchmarks/sparse_rnn_mosaic_probe.py --out $OUT

Cases (kernels in `kernels/sparse_rnn/_mosaic_probe.py`):
    sync        one CTA per SM (132 on an H100 SXM), one global-semaphore grid barrier per
                step (compare: the Pallas Triton stamps measured 1.05 us/step); also 128 CTAs.
    gather      one step's shared-memory gathers per CTA at the headline case (72 rows x 704
                slots = 50,688 words = 198 KiB + an 18 KiB float16 state, B=4), checked against
                `gather_reference`; 4 and 2 warpgroups in column order, 4 in a random order
                within each row; no grid sync.
    step        the same gathers with the grid barrier after every step (a persistent step
                without the cell math).
Per-step times: (median wall time of a call with 1 + steps steps - that with 1 step) / steps,
5 timed calls each after a warm-up. Every spin is bounded (`--spin-limit` reads per step); a
CTA whose total spins reach the limit is reported (`gave_up`), the barrier then did not hold.
Output: `<out>/sparse_rnn_mosaic_probe.json` and a log on stdout.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

CASES = ("sync", "gather", "step")
HEADLINE = {"rows": 72, "slots_per_row": 704, "hidden": 2304, "batch": 4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results_mosaic_probe")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--grid", type=int, default=0, help="CTAs; 0: the GPU's SM count")
    parser.add_argument("--spin-limit", type=int, default=1 << 14)
    parser.add_argument("--timeout", type=float, default=55.0, help="seconds per case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; valid: {', '.join(CASES)}")
        results[case] = _run_child(case, args, out)
        print(f"== {case}: {json.dumps(results[case])}", flush=True)
    (out / "sparse_rnn_mosaic_probe.json").write_text(json.dumps(results, indent=1))
    return 0


def _run_child(case: str, args, out: pathlib.Path) -> dict:
    path = out / f"{case}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        case,
        "--out",
        str(path),
        "--steps",
        str(args.steps),
        "--grid",
        str(args.grid),
        "--spin-limit",
        str(args.spin_limit),
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return {"error": f"timeout after {args.timeout} s", "stderr_tail": str(tail)}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not path.exists():
        return {
            "error": f"rc={proc.returncode}",
            "stderr_tail": proc.stderr[-3000:],
            "wall_s": wall,
        }
    result = json.loads(path.read_text())
    result["wall_s"] = round(wall, 1)
    return result


def _child(args) -> int:
    import jax

    device = jax.devices()[0]
    if args.grid == 0:
        args.grid = int(getattr(device, "core_count", 132))
    result: dict = {"device": str(device.device_kind), "grid": args.grid}
    try:
        result.update(_CASE_FNS[args.child](args))
    except Exception:  # noqa: BLE001 - a probe reports, it does not stop the others
        result["error"] = traceback.format_exc()[-3000:]
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _time_per_step(make_fn, steps: int, reps: int = 5) -> tuple[float, object]:
    """Per-step microseconds from calls with 1 and 1 + steps steps; also the long call's output."""
    import jax

    medians = []
    outputs = None
    for n in (1, 1 + steps):
        fn = make_fn(n)
        outputs = jax.block_until_ready(fn())  # compile + warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return (medians[1] - medians[0]) / steps * 1e6, outputs


def _case_sync(args) -> dict:
    import jax
    import numpy as np

    from jaxpp.kernels.sparse_rnn import _mosaic_probe as mp

    res = {}
    for grid in (args.grid, 128):

        def make(n, grid=grid):
            return jax.jit(lambda: mp.sync_probe(grid=grid, steps=n, spin_limit=args.spin_limit))

        us, spins = _time_per_step(make, args.steps)
        spins = np.asarray(spins)
        res[f"grid{grid}"] = {
            "us_per_step": round(us, 3),
            "mean_spins_per_step": round(float(spins.mean()) / (1 + args.steps), 1),
            "gave_up": bool((spins >= args.spin_limit).any()),
        }
    return res


def _inputs(args):
    import jax

    from jaxpp.kernels.sparse_rnn import _mosaic_probe as mp

    h = HEADLINE
    return mp.random_probe_inputs(
        jax.random.key(0),
        grid=args.grid,
        rows=h["rows"],
        slots_per_row=h["slots_per_row"],
        hidden=h["hidden"],
        batch=h["batch"],
    )


def _check(words, h, y) -> dict:
    import numpy as np

    from jaxpp.kernels.sparse_rnn import _mosaic_probe as mp

    ref = np.asarray(mp.gather_reference(words, h, rows=HEADLINE["rows"], batch=HEADLINE["batch"]))
    err = float(np.abs(np.asarray(y) - ref).max() / np.abs(ref).max())
    return {"max_rel_err": err, "ok": err < 1e-4}


def _gather_cases(args, *, sync: bool) -> dict:
    import jax
    import numpy as np

    from jaxpp.kernels.sparse_rnn import _mosaic_probe as mp

    words, h = _inputs(args)
    # The same words in a random order within each row: lanes hit unrelated columns (more
    # shared-memory bank conflicts than the column order).
    perm = np.random.default_rng(0).permutation(HEADLINE["slots_per_row"])
    shuffled = words.reshape(args.grid, HEADLINE["rows"], -1)[:, :, perm].reshape(words.shape)
    res = {}
    for name, wgs, w_in in (("wg4", 4, words), ("wg2", 2, words), ("wg4_random", 4, shuffled)):

        def make(n, wgs=wgs, w_in=w_in):
            f = jax.jit(
                lambda w, x: mp.gather_probe(
                    w,
                    x,
                    rows=HEADLINE["rows"],
                    steps=n,
                    sync=sync,
                    num_warpgroups=wgs,
                    spin_limit=args.spin_limit,
                )
            )
            return lambda: f(w_in, h)

        us, (y, spins) = _time_per_step(make, args.steps)
        spins = np.asarray(spins)
        entry = {"us_per_step": round(us, 3), **_check(w_in, h, y)}
        if sync:
            entry["gave_up"] = bool((spins >= args.spin_limit).any())
        res[name] = entry
    return res


_CASE_FNS = {
    "sync": _case_sync,
    "gather": lambda args: _gather_cases(args, sync=False),
    "step": lambda args: _gather_cases(args, sync=True),
}


if __name__ == "__main__":
    sys.exit(main())
