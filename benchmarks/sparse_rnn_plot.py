"""Plots the sparse RNN benchmark results (microseconds per step, per method and case).

    python benchmarks/sparse_rnn_plot.py benchmarks/results/sparse_rnn_v3_quick_sweep.json \
        benchmarks/results/sparse_rnn_v3.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.loads(open(src).read())
    rows = [r for r in data["results"] if "us_per_step" in r]
    cases: dict[str, dict[str, float]] = {}
    for r in rows:
        case = f"{r['cell']} H={r['hidden']} B={r['batch']} d={r['density']:.0%}" + (
            " fwd+bwd" if r["backward"] else " fwd"
        )
        best = cases.setdefault(case, {})
        best[r["method"]] = min(best.get(r["method"], float("inf")), r["us_per_step"])
    methods = sorted({m for c in cases.values() for m in c})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j, c in enumerate(cases) if method in cases[c]]
        ys = [cases[c][method] for c in cases if method in cases[c]]
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], list(cases), fontsize=8)
    ax.set_ylabel("us per step (256 steps, median)")
    ax.set_yscale("log")
    env = data["environment"]
    ax.set_title(f"sparse persistent RNN vs baselines: {env['device']}, jax {env['jax']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
