"""Plots the sparse RNN benchmark results and prints them as a markdown table.

    python benchmarks/sparse_rnn_plot.py benchmarks/results/sparse_rnn_sweep.png \
        RESULTS.json [MORE.json ...]

Each case (cell, hidden, batch, density, forward or forward+backward) gets one bar per method
(microseconds per step; the fastest of repeated rows). The table gives every case's sparse time,
each baseline's, the default sparse kernel's speed-up over the fastest baseline measured for that
cell, hidden size and batch (the dense scan and cuDNN do not depend on the density, so the sweep
measures them once per hidden size and batch), and named variants' times beside it.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINES = ("dense_scan_bf16", "cudnn_lstm_f32", "bcoo_scan_f32")
DEFAULT = "sparse[default]"  # `sparse_rnn`'s defaults; other sparse rows are named variants


def load(srcs: list[str]) -> tuple[dict, dict[tuple, dict[str, float]], dict[tuple, str]]:
    """(environment, {case: {method: us}}, {case: error of the sparse row})."""
    cases: dict[tuple, dict[str, float]] = {}
    errors: dict[tuple, str] = {}
    env = {}
    for src in srcs:
        with open(src) as f:
            data = json.load(f)
        env = data["environment"]
        for r in data["results"]:
            case = (r["cell"], r["hidden"], r["batch"], r["density"], r["backward"])
            if "us_per_step" in r:
                best = cases.setdefault(case, {})
                best[r["method"]] = min(best.get(r["method"], float("inf")), r["us_per_step"])
            elif r["method"].startswith("sparse"):
                errors[case] = r["error"]
    return env, cases, errors


def table(cases: dict[tuple, dict[str, float]], errors: dict[tuple, str]) -> str:
    lines = [
        "| cell | H | B | density | pass | sparse (default) us/step | dense scan | cuDNN | BCOO "
        "| vs fastest | other variants (vs fastest) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in sorted(set(cases) | set(errors)):
        cell, hidden, batch, density, backward = case
        # Baselines of the same cell, size, batch and pass, from any density.
        base = {
            m: us
            for other, row in cases.items()
            if other[:3] == case[:3] and other[4] == backward
            for m, us in row.items()
            if m in BASELINES and m != "bcoo_scan_f32"
        }
        base |= {m: us for m, us in cases.get(case, {}).items() if m in BASELINES}
        row = cases.get(case, {})
        fastest = min(base.values()) if base else None
        cells = [f"{base[m]:.2f}" if m in base else "-" for m in BASELINES]
        us = row.get(DEFAULT)
        if us is not None:
            ratio = f"{fastest / us:.2f}x" if fastest else "-"
            shown = f"{us:.2f}"
        else:
            shown, ratio = ("does not fit" if case in errors else "-"), "-"
        others = [
            f"{m[7:-1]} {v:.2f} ({fastest / v:.2f}x)" if fastest else f"{m[7:-1]} {v:.2f}"
            for m, v in sorted(row.items())
            if m.startswith("sparse[") and m != DEFAULT
        ]
        lines.append(
            f"| {cell} | {hidden} | {batch} | {density:.0%} | {'fwd+bwd' if backward else 'fwd'} "
            f"| {shown} | {' | '.join(cells)} | {ratio} | {', '.join(others) or '-'} |"
        )
    return "\n".join(lines)


def plot(env: dict, cases: dict[tuple, dict[str, float]], dst: str) -> None:
    names = {
        c: f"{c[0]} H={c[1]} B={c[2]} d={c[3]:.0%}" + (" fwd+bwd" if c[4] else "") for c in cases
    }
    order = sorted(cases)
    methods = sorted({m for c in cases.values() for m in c})
    fig, ax = plt.subplots(figsize=(max(10, 0.45 * len(order)), 5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j, c in enumerate(order) if method in cases[c]]
        ys = [cases[c][method] for c in order if method in cases[c]]
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(order))], [names[c] for c in order],
                  fontsize=6, rotation=90)  # fmt: skip
    ax.set_ylabel("us per step (256 steps, median)")
    ax.set_yscale("log")
    ax.set_title(f"sparse persistent RNN vs baselines: {env['device']}, jax {env['jax']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


def main(*args: str) -> None:
    if len(args) < 2 or not args[0].endswith(".png") or any(a.startswith("-") for a in args):
        raise SystemExit(
            "usage: python benchmarks/sparse_rnn_plot.py OUT.png RESULTS.json [MORE.json ...]\n"
            "(the plot goes to OUT.png, the markdown table to standard output)"
        )
    dst, *srcs = args
    env, cases, errors = load(srcs)
    plot(env, cases, dst)
    print(table(cases, errors))


if __name__ == "__main__":
    main(*sys.argv[1:])
