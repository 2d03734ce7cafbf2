"""From a measured benchmark row to the cluster what-if model, and back to check it.

`cluster_costs(results, name)` turns one jaxpp row of a `jaxpp bench pipeline` results
file (its measured per-stage task times, the optimizer time outside the loop, the model's
shape) into the `jaxpp-cluster-costs/1` inputs of `jaxpp.schedules.what_if`;
`validate(results, name)` predicts that same run on a one-node cluster of its GPUs and
compares the prediction with the measured step (the issue asks for 10%).
`validate_spmd(results, name, costs_from=jaxpp_row)` predicts a measured SPMD row (its exact
DP/FSDP/TP degrees, accumulation and remat) from a jaxpp row's per-layer costs, and
`validate_all` does every measured row of a file.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxpp import schedules
from jaxpp._bench import _configs, _memory

COMPUTE_BYTES = 2  # bfloat16 parameters in the compute dtype
# Bytes a GPU keeps per compute-dtype parameter byte: float32 params, grads and AdamW
# mu, nu, a float32 gradient accumulator and the bf16 copy: (4 + 4 + 8 + 4 + 2) / 2.
STATE_BYTES_PER_PARAM_BYTE = 11.0


@dataclasses.dataclass(frozen=True, slots=True)
class Validation:
    """The what-if model's step for a measured run, next to the measurement.

    Attributes:
        name: the configuration.
        measured_s: its measured median step.
        predicted_s: the cluster model's step for the same layout and GPUs.
        prediction: the full prediction (bubble, memory, ...).
    """

    name: str
    measured_s: float
    predicted_s: float
    prediction: schedules.Prediction
    costs_from: str = ""

    @property
    def error(self) -> float:
        """`predicted / measured - 1` (negative: the model is optimistic)."""
        return self.predicted_s / self.measured_s - 1

    def describe(self) -> str:
        """One line: measured, predicted, relative error, and the model's terms."""
        p = self.prediction
        if p.layout.pp > 1:
            terms = f"simulated bubble {100 * p.bubble:.1f}%"
        else:  # the step is compute + exposed communication + the optimizer, nothing else
            optimizer = p.step_s - p.compute_s - p.exposed_comm_s
            terms = (
                f"compute {p.compute_s * 1e3:.1f} ms + exposed comm "
                f"{p.exposed_comm_s * 1e3:.1f} ms + optimizer {optimizer * 1e3:.1f} ms"
            )
        source = f", costs of {self.costs_from}" if self.costs_from else ""
        return (
            f"{self.name}: measured {self.measured_s * 1e3:.1f} ms, what-if model "
            f"{self.predicted_s * 1e3:.1f} ms ({100 * self.error:+.1f}%), {terms}{source}"
        )


def cluster_costs(results: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The `jaxpp-cluster-costs/1` dict measured by jaxpp row `name` of `results`.

    Per-layer times are the mean over the stages before the last of each stage's measured
    task time divided by its layers (times TP inside a stage, to give one GPU's time); the
    LM head's (`head`) is what the last stage takes beyond its layers; the optimizer time
    is `outside_loop_seconds` per parameter byte of the fullest rank. (The rows in
    `benchmarks/results/` up to `pipeline_2026-11-22_s6` hold the sum over all ranks there,
    not the longest rank's: their optimizer term is about `ranks` times too large.)

    Raises:
        ValueError: no such row, not a successful jaxpp row, or no measured costs.

    Example:
        >>> import json, pathlib
        >>> path = "benchmarks/results/pipeline_2026-11-21/bench_2b_2xh200_partial.json"
        >>> results = json.loads(pathlib.Path(path).read_text())
        >>> costs = cluster_costs(results, "jaxpp/1f1b/pp2/mb16/noremat")
        >>> costs["num_layers"], costs["microbatch_size"], round(costs["layer"]["forward_s"], 5)
        (24, 2, 0.00161)
    """
    row = _row(results, name)
    config = _configs.parse_config(name)
    preset = _preset(results)
    stages = config.num_stages
    per_stage = row["costs"]["per_stage"]
    if len(per_stage) != stages:
        raise ValueError(
            f"row {name!r} has measured costs for {len(per_stage)} stages, expected {stages}."
        )
    layers = preset.num_layers / stages
    # Per-layer times from the stages without the LM head (all but the last); the head's
    # time is what the last stage takes beyond its layers.
    last = str(stages - 1)
    body = {s: kinds for s, kinds in per_stage.items() if s != last} or per_stage
    forward = _mean(body, ("F",)) / layers * config.model
    # A zero-bubble first stage has no input gradient to compute: its W is its whole
    # backward. So the backward is B, or I + W, or that W alone; the weight-gradient time
    # comes from the stages that split their backward into I and W.
    backward_kinds = (("B",), ("I", "W"), ("W",))
    backward = _mean(body, *backward_kinds) / layers * config.model
    split = {s: kinds for s, kinds in body.items() if "I" in kinds and "W" in kinds}
    weight = _mean(split, ("W",)) / layers * config.model if split else None
    tail = {last: per_stage[last]}
    head = {
        "forward_s": max(0.0, _mean(tail, ("F",)) * config.model - forward * layers),
        "backward_s": max(0.0, _mean(tail, *backward_kinds) * config.model - backward * layers),
    }
    microbatch = preset.global_batch // config.microbatches // config.data
    tokens = microbatch * preset.seq_len
    layer_bytes = COMPUTE_BYTES * _memory.layer_params(preset)
    embedding_bytes = COMPUTE_BYTES * (_memory.embed_params(preset) + _memory.head_params(preset))
    held = _fullest_rank_bytes(config, layer_bytes * layers, embedding_bytes)
    factor = _memory.ACTIVATION_FACTOR[_configs.JAXPP]
    layer: dict[str, float] = {
        "forward_s": forward,
        "backward_s": backward,
        "param_bytes": layer_bytes,
        "activation_bytes": factor * tokens * _memory.activation_bytes_per_token(
            preset, remat=config.remat
        ),
    }  # fmt: skip
    if weight is not None:
        layer["weight_grad_s"] = weight
    env = results.get("environment", {})
    return {
        "format": "jaxpp-cluster-costs/1",
        "measured": True,
        "note": (
            f"measured by jaxpp bench pipeline: {name} on {env.get('device_count')} x "
            f"{env.get('device')}, {env.get('date')}"
        ),
        "num_layers": preset.num_layers,
        "global_batch": preset.global_batch,
        "microbatch_size": microbatch,
        "seq_len": preset.seq_len,
        "layer": layer,
        "boundary_activation_bytes": float(tokens * preset.d_model * COMPUTE_BYTES),
        "embedding_param_bytes": float(embedding_bytes),
        "memory": {
            "gpu_bytes": float(results.get("memory_limit_bytes") or _memory.usable_bytes()),
            "state_bytes_per_param_byte": STATE_BYTES_PER_PARAM_BYTE,
        },
        "optimizer_s_per_param_byte": float(row.get("outside_loop_seconds") or 0.0) / held,
        "head": head,
    }


def validate(results: Mapping[str, Any], name: str, *, overlap: float = 0.0) -> Validation:
    """Predicts measured jaxpp row `name` with the cluster model on one node of its GPUs.

    `overlap` is the model's data-parallel overlap (`jaxpp.schedules.predict`).

    Raises:
        ValueError: as `cluster_costs`.

    Example:
        >>> import json, pathlib
        >>> path = "benchmarks/results/pipeline_2026-11-21/bench_2b_2xh200_partial.json"
        >>> results = json.loads(pathlib.Path(path).read_text())
        >>> check = validate(results, "jaxpp/1f1b/pp2/mb16/noremat")
        >>> abs(check.error) < 0.10
        True
    """
    config = _configs.parse_config(name)
    costs = schedules.costs_from_dict(cluster_costs(results, name))
    cluster = schedules.Cluster(1, config.num_devices)
    layout = schedules.Layout(
        tp=config.model, pp=config.ranks, dp=config.data, schedule=config.schedule
    )
    prediction = schedules.predict(layout, costs, cluster, overlap=overlap, even_layers=True)
    return Validation(name, float(_row(results, name)["step_s"]), prediction.step_s, prediction)


def validate_spmd(
    results: Mapping[str, Any], name: str, *, costs_from: str, overlap: float = 0.0
) -> Validation:
    """Predicts measured SPMD row `name` from jaxpp row `costs_from`'s per-layer costs.

    The layout is exactly the row's: DP/FSDP/TP degrees from its name, `accumulation`
    microbatches of `global_batch / (data x accumulation)` sequences per replica, on one
    node of its GPUs. Remat differs from the costs row's: the backward gains (or loses)
    one forward per layer. Stored activations are the SPMD memory model's (`_memory`).

    Raises:
        ValueError: `name` is no successful SPMD row; `costs_from` as `cluster_costs`;
            the global batch does not split into the row's microbatches.

    Example:
        >>> import json, pathlib
        >>> path = "benchmarks/results/pipeline_2026-11-21_s4/call3_4xh200/bench_8b_4xgpu.json"
        >>> results = json.loads(pathlib.Path(path).read_text())
        >>> check = validate_spmd(results, "spmd/fsdp4/acc4/noremat",
        ...                       costs_from="jaxpp/zb-h1/pp4/mb32/noremat")
        >>> check.prediction.layout.describe(), check.prediction.microbatches
        ('fsdp4 mb2', 4)
    """
    row = _spmd_row(results, name)
    config = _configs.parse_config(name)
    preset = _preset(results)
    source = _configs.parse_config(costs_from)
    data = cluster_costs(results, costs_from)
    layer = dict(data["layer"])
    if config.remat != source.remat:  # remat recomputes each layer's forward in its backward
        layer["backward_s"] += layer["forward_s"] if config.remat else -layer["forward_s"]
    tokens = data["microbatch_size"] * preset.seq_len
    per_token = _memory.activation_bytes_per_token(preset, remat=config.remat)
    layer["activation_bytes"] = _memory.ACTIVATION_FACTOR[_configs.SPMD] * tokens * per_token
    costs = schedules.costs_from_dict({**data, "layer": layer})
    replicas = config.data * config.accumulation
    if preset.global_batch % replicas:
        raise ValueError(
            f"row {name!r}: global batch {preset.global_batch} does not split over data "
            f"{config.data} x accumulation {config.accumulation}. Fix: a row that ran."
        )
    layout = schedules.Layout(
        tp=config.model,
        dp=config.data,
        fsdp=config.fsdp and config.data > 1,
        microbatch_size=preset.global_batch // replicas,
    )
    prediction = schedules.predict(
        layout, costs, schedules.Cluster(1, config.num_devices), overlap=overlap
    )
    return Validation(name, float(row["step_s"]), prediction.step_s, prediction, costs_from)


def validate_all(
    results: Mapping[str, Any], *, costs_from: str, overlap: float = 0.0
) -> tuple[Validation, ...]:
    """Every successful row of `results`, predicted: jaxpp rows from their own costs,
    SPMD rows from `costs_from`'s (see `validate_spmd`); in file order.

    Raises:
        ValueError: as `validate` and `validate_spmd`.

    Example:
        >>> import json, pathlib
        >>> path = "benchmarks/results/pipeline_2026-11-21_s4/call3_4xh200/bench_8b_4xgpu.json"
        >>> results = json.loads(pathlib.Path(path).read_text())
        >>> checks = validate_all(results, costs_from="jaxpp/zb-h1/pp4/mb32/noremat")
        >>> [c.name for c in checks]  # doctest: +NORMALIZE_WHITESPACE
        ['jaxpp/1f1b/pp4/mb32/noremat', 'spmd/fsdp4/acc4/noremat',
         'jaxpp/zb-h1/pp4/mb32/noremat']
    """
    out = []
    for row in results.get("results", ()):
        if row.get("status") != "ok" or not row.get("step_s"):
            continue
        if row.get("kind") == _configs.SPMD:
            out.append(validate_spmd(results, row["name"], costs_from=costs_from, overlap=overlap))
        elif row.get("costs"):
            out.append(validate(results, row["name"], overlap=overlap))
    return tuple(out)


def format_validations(checks: Sequence[Validation]) -> str:
    """A table: configuration, measured, predicted, error; then each row's terms.

    Example:
        >>> import json, pathlib
        >>> path = "benchmarks/results/pipeline_2026-11-21_s4/call3_4xh200/bench_8b_4xgpu.json"
        >>> results = json.loads(pathlib.Path(path).read_text())
        >>> checks = validate_all(results, costs_from="jaxpp/zb-h1/pp4/mb32/noremat")
        >>> print(format_validations(checks).splitlines()[3])
        jaxpp/zb-h1/pp4/mb32/noremat    2.034 s     2.232 s   +9.7%
    """
    width = max([len(c.name) for c in checks] + [len("configuration")])
    lines = [f"{'configuration':<{width}}  {'measured':>9}  {'predicted':>10}  {'error':>6}"]
    lines += [
        f"{c.name:<{width}}  {c.measured_s:7.3f} s  {c.predicted_s:8.3f} s  {100 * c.error:+5.1f}%"
        for c in checks
    ]
    lines += ["", *(f"  {c.describe()}" for c in checks)]
    return "\n".join(lines)


def _row(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    rows = [r for r in results.get("results", ()) if r.get("name") == name]
    if not rows:
        known = ", ".join(r.get("name", "?") for r in results.get("results", ()))
        raise ValueError(f"no row {name!r} in the results. Fix: one of: {known}.")
    row = rows[0]
    if row.get("kind") != _configs.JAXPP or row.get("status") != "ok" or not row.get("costs"):
        raise ValueError(
            f"row {name!r} is not a successful jaxpp row with measured costs (status "
            f"{row.get('status')!r}). Fix: pick a jaxpp row that ran."
        )
    return row


def _spmd_row(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    rows = [r for r in results.get("results", ()) if r.get("name") == name]
    if not rows or rows[0].get("kind") != _configs.SPMD or rows[0].get("status") != "ok":
        status = rows[0].get("status") if rows else "missing"
        raise ValueError(
            f"row {name!r} is not a successful SPMD row (status {status!r}). Fix: one of: "
            + ", ".join(
                r.get("name", "?")
                for r in results.get("results", ())
                if r.get("kind") == _configs.SPMD and r.get("status") == "ok"
            )
            + "."
        )
    return rows[0]


def _preset(results: Mapping[str, Any]) -> _configs.ModelPreset:
    model = results.get("model", {})
    preset = _configs.PRESETS.get(model.get("preset"))
    if preset is None:
        raise ValueError(f"results of unknown preset {model.get('preset')!r}.")
    fields = {f.name for f in dataclasses.fields(preset)}
    recorded = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items()}
    return dataclasses.replace(preset, **{k: v for k, v in recorded.items() if k in fields})


def _mean(per_stage: Mapping[str, Mapping[str, float]], *alternatives: tuple[str, ...]) -> float:
    """The mean over stages of each stage's first complete alternative (summed kinds).

    Example:
        >>> _mean({"0": {"F": 1.0, "W": 4.0}, "1": {"F": 1.0, "I": 2.0, "W": 2.0}},
        ...       ("B",), ("I", "W"), ("W",))
        4.0
    """
    values = []
    for times in per_stage.values():
        for kinds in alternatives:
            if all(k in times for k in kinds):
                values.append(sum(times[k] for k in kinds))
                break
        else:
            raise ValueError(f"measured costs {dict(per_stage)} lack the kinds {alternatives}.")
    return sum(values) / len(values)


def _fullest_rank_bytes(config: _configs.BenchConfig, stage_bytes: float, embedding: float):
    """Parameter bytes of the fullest rank as the cluster model counts them."""
    builder = schedules.get_builder(config.schedule, config.num_stages, ranks=config.ranks)
    placement = builder.build(config.microbatches).placement
    held = [0.0] * config.ranks
    for stage in range(config.num_stages):
        held[placement[stage]] += stage_bytes / config.model
    held[placement[0]] += embedding / 2 / config.model
    held[placement[-1]] += embedding / 2 / config.model
    return max(held)
