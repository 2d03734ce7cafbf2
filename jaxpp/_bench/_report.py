"""Results of the throughput race: the JSON file (rewritten after every configuration),
a markdown table and a PNG bar chart."""

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxpp.kernels import tuning

SCHEMA = "jaxpp-bench-pipeline v1"


def load_rows(path: str | pathlib.Path, *, preset: str) -> list[dict[str, Any]]:
    """Rows already in `path` for the same model preset (none if the file is absent).

    Raises:
        ValueError: if the file is not a results file of this benchmark and preset.

    Example:
        >>> load_rows("/nonexistent.json", preset="tiny")
        []
    """
    return list(load(path, preset=preset).get("results", ()))


def load(path: str | pathlib.Path, *, preset: str) -> dict[str, Any]:
    """The results file at `path` (empty if absent), checked to be of `preset`.

    Raises:
        ValueError: if the file is not a results file of this benchmark.

    Example:
        >>> load("/nonexistent.json", preset="tiny")
        {}
    """
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not JSON ({e}). Fix: pass another --out, or delete the file."
        ) from e
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f"{path} is not a `jaxpp bench pipeline` results file (schema "
            f"{data.get('schema')!r}, expected {SCHEMA!r}). Fix: pass another --out."
        )
    if data.get("model", {}).get("preset") != preset:
        raise ValueError(
            f"{path} holds results of preset {data.get('model', {}).get('preset')!r}, not "
            f"{preset!r}. Fix: one file per model, e.g. --out results/bench_{preset}.json."
        )
    return data


def merge_rows(old: Sequence[Mapping], new: Mapping) -> list[dict[str, Any]]:
    """`old` with `new` replacing the row of the same name (or appended).

    Example:
        >>> [r["v"] for r in merge_rows([{"name": "a", "v": 1}], {"name": "a", "v": 2})]
        [2]
    """
    rows = [dict(r) for r in old if r["name"] != new["name"]]
    return [*rows, dict(new)]


def write(path: str | pathlib.Path, rows: Sequence[Mapping], **extra: Any) -> pathlib.Path:
    """Writes the results JSON (environment from `tuning.environment()`) and its table.

    Example:
        >>> import tempfile
        >>> p = write(tempfile.mkdtemp() + "/r.json", [], model={"preset": "tiny"})
        >>> p.with_suffix(".md").exists()
        True
    """
    path = tuning.write_results(path, results=list(rows), schema=SCHEMA, **extra)
    path.with_suffix(".md").write_text(markdown_table(rows) + "\n")
    return path


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of the rows, fastest first; failed rows last with their reason.

    Example:
        >>> print(markdown_table([{"name": "spmd/dp2/acc1/noremat", "status": "ok",
        ...     "tokens_per_s": 100.0, "step_s": 0.5, "mfu": None,
        ...     "peak_memory_bytes": None}]).splitlines()[2])
        | spmd/dp2/acc1/noremat | 100 | 500.0 | n/a | n/a |  |  |  |  |
    """
    header = (
        "| configuration | tokens/s | step ms | MFU | peak GiB/device | predicted GiB "
        "| bubble measured | bubble simulated | predicted step ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: -r["tokens_per_s"])
    lines = [header]
    for r in ok:
        peak = r.get("peak_memory_bytes")
        predicted = r.get("predicted_step_s")
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['step_s'] * 1e3:.1f} "
            f"| {_percent(r.get('mfu'))} | {'n/a' if peak is None else f'{peak / 2**30:.1f}'} "
            f"| {_predicted_gib(r)} "
            f"| {_percent(r.get('measured_bubble'), '')} "
            f"| {_percent(r.get('simulated_bubble'), '')} "
            f"| {'' if predicted is None else f'{predicted * 1e3:.1f}'} |"
        )
    for r in rows:
        if r.get("status") != "ok":
            reason = str(r.get("error", "")).splitlines()[0][:120] if r.get("error") else ""
            lines.append(
                f"| {r['name']} | {r.get('status')}: {reason} | | | | {_predicted_gib(r)} | | | |"
            )
    return "\n".join(lines)


def best(rows: Sequence[Mapping], kind: str) -> Mapping | None:
    """The fastest successful row of `kind` ("spmd" or "jaxpp"), or None.

    Example:
        >>> rows = [{"kind": "spmd", "status": "ok", "tokens_per_s": 3.0, "name": "a"}]
        >>> best(rows, "spmd")["name"]
        'a'
    """
    ok = [r for r in rows if r.get("kind") == kind and r.get("status") == "ok"]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def bar_chart(rows: Sequence[Mapping], path: str | pathlib.Path, *, title: str) -> pathlib.Path:
    """A horizontal bar chart of tokens/s per successful configuration (PNG).

    Example:
        >>> import tempfile
        >>> rows = [{"name": "a", "kind": "spmd", "status": "ok", "tokens_per_s": 2.0}]
        >>> bar_chart(rows, tempfile.mkdtemp() + "/c.png", title="t").exists()
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(ok) + 1.5))
    colors = ["tab:blue" if r["kind"] == "spmd" else "tab:orange" for r in ok]
    ax.barh([r["name"] for r in ok], [r["tokens_per_s"] for r in ok], color=colors)
    ax.set_xlabel("tokens/s (blue: SPMD jax.jit, orange: jaxpp)")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _predicted_gib(row: Mapping) -> str:
    predicted = (row.get("predicted_memory") or {}).get("total")
    return "" if predicted is None else f"{predicted / 2**30:.1f}"


def _percent(value: float | None, missing: str = "n/a") -> str:
    return missing if value is None else f"{100 * value:.1f}%"


def add_row(path: str | pathlib.Path, row: Mapping, *, preset: str) -> pathlib.Path:
    """Merges `row` into the results file at `path` without starting JAX (the `--isolate`
    parent records a child it had to stop); creates a minimal file if there is none.

    Example:
        >>> import tempfile
        >>> p = add_row(tempfile.mkdtemp() + "/r.json", {"name": "a", "status": "timeout"},
        ...             preset="tiny")
        >>> load_rows(p, preset="tiny")[0]["status"]
        'timeout'
    """
    path = pathlib.Path(path)
    data = load(path, preset=preset) or {"schema": SCHEMA, "model": {"preset": preset}}
    data["results"] = merge_rows(data.get("results", ()), row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text(markdown_table(data["results"]) + "\n")
    return path
