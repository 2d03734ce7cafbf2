"""Peak device memory of a benchmark configuration, predicted before anything compiles.

`estimate(config, preset)` adds up, per device (per pipeline rank for jaxpp, the fullest
rank wins):

- state: float32 parameters + AdamW `mu`, `nu` (12 bytes per parameter held), sharded
  as the layout shards them (TP over "model", FSDP also over "data", in SPMD and inside
  jaxpp stages alike; a pipeline rank holds its stages' layers, the first stage the
  embedding, the last the unembedding);
- grads: float32 gradients (4 bytes per parameter held, so FSDP's are sharded too: each
  microbatch's gradients are reduce-scattered onto the parameter shards), twice when an
  accumulator and one microbatch's gradients are alive together (SPMD acc > 1, every
  jaxpp loop);
- weights: the bfloat16 compute copies (2 bytes per parameter; FSDP gathers them whole
  per TP shard; with remat only two layers' worth are gathered at a time, and so with
  `-scan` (one layer per loop iteration), which also keeps the sharded casts);
- activations: what the backward pass keeps, per token per layer
  `2 * (6 d_model + 2 kv_width + 3 d_ff)` bytes without remat (the two residuals and two
  norm outputs, q, k, v, the attention output, the MLP input, GELU input and output), or
  `2 * d_model` (the block input) with remat plus one layer recomputed; times the tokens
  in flight (SPMD: one accumulation step; jaxpp: the schedule's peak in-flight
  microbatches from `jaxpp.schedules.simulate`); TP shards all but the residual stream
  and norm outputs (no sequence parallelism);
- logits: float32 logits, their gradient and the bfloat16 projection, `10 * vocab`
  bytes per token (vocab-parallel under TP);
- extra (jaxpp, "init"): first-step copies. (a) Ranks of several devices: the executor's
  init task makes each gradient accumulator replicated on its rank (a jit without
  inputs, `out_shardings` replicated), while the loop task leaves it sharded (FSDP: like
  the parameters; DP: [data, *param] over "data"; TP: over "model"); the first
  microbatch's W (or B) cannot donate the replicated one into its output, so it is
  alive beside the sharded accumulator and that microbatch's gradients: the whole
  stage's float32 gradients per device (DP: `data` copies). Seen on CPU as the two
  compiled variants of each W task (`jaxpp.runtime._precompile.Variants`); not yet
  measured on a GPU. With `JAXPP_PRECOMPILE=all` the compile-ahead makes them where the
  loop keeps them (`ahead_all`), and this term is 0. (b) `FIRST_STEP_BYTES` per
  parameter held on the rank (as the state is held): fitted, not explained (see there).

The activation term carries one calibration factor per kind, fitted to GPU numbers:
SPMD to XLA's own estimate for `spmd/fsdp2/acc1/noremat` (H200, GPT 2b, 2026-11-21:
115.56 GiB before its rematerialization pass); jaxpp, with `FIRST_STEP_BYTES`, by least
squares to the 14 measured jaxpp peaks of sessions 2-8 (H200; 1F1B, ZB-H1, ZBV,
DualPipeV and Interleaved1F1B at 2b on 2 GPUs and 8b on 4; tests/bench/test_bench_memory.py
lists them and checks each). The jaxpp factor is larger: its runtime keeps more per
in-flight microbatch than the schedule's count of activations (see `ACTIVATION_FACTOR`).
"""

import dataclasses
import math
import os
import types

from jaxpp._bench import _configs

GIB = 2**30
# bytes per parameter held: float32 params + AdamW mu and nu; float32 grads; bf16 copies.
STATE_BYTES = 12
GRAD_BYTES = 4
WEIGHT_BYTES = 2
ACTIVATION_BYTES = 2  # bfloat16 activations
LOGIT_BYTES = 10  # per token per vocab entry: f32 logits + f32 gradient + bf16 projection
# Fitted to the calibration points of the module docstring (see
# tests/bench/test_bench_memory.py). SPMD: XLA keeps ~15% more than the listed residuals
# (f32 norm statistics, attention softmax statistics, fusion temporaries). jaxpp: ~2x the
# schedule's in-flight count, not explained yet; candidates are bf16 weight casts that
# cross from each forward task to its backward (one stage's weights per in-flight
# microbatch) and transfer buffers.
ACTIVATION_FACTOR: types.MappingProxyType[str, float] = types.MappingProxyType(
    {_configs.SPMD: 1.152, _configs.JAXPP: 1.92}
)
# What a jaxpp rank holds beyond the listed parts, per parameter it holds (fitted with the
# jaxpp factor above, all 14 points within 7%, 13 within 4%). Until session 8 the same
# bytes were modeled as the spread copy of the initial state that runs before 459f64c held
# in their first step (12 bytes per parameter over all devices); but the runs after
# 459f64c (sessions 7 and 8: ZBV, DualPipeV, Interleaved1F1B, ZB-H1 at 2b) peaked 8-20 GiB
# above that model, as if the copy were still there. Candidates, not yet told apart: the
# optimizer update's new parameters and moments alive beside the old ones, the placed copies
# of the step's inputs.
FIRST_STEP_BYTES = 9.4
# Total memory of one device (nvidia-smi), by device kind. JAX lets a process allocate
# XLA_PYTHON_CLIENT_MEM_FRACTION of it (default 0.75): 105 GiB on an H200, which is why
# XLA's rematerialization aimed at 100.18 GiB (0.95 of that) in the first run.
DEVICE_MEMORY_GIB: types.MappingProxyType[str, float] = types.MappingProxyType(
    {"h200": 140.4, "h100": 79.6}
)
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    """Predicted peak bytes on the fullest device of a configuration, by part.

    Example:
        >>> e = estimate(_configs.parse_config("spmd/fsdp2/acc1/noremat"), _configs.PRESETS["2b"])
        >>> round(e.total / GIB)
        116
    """

    state: float
    grads: float
    weights: float
    activations: float
    logits: float
    extra: float = 0.0

    @property
    def total(self) -> float:
        """Bytes in all."""
        return self.state + self.grads + self.weights + self.activations + self.logits + self.extra

    def describe(self) -> str:
        """e.g. `50.4 GiB (state 11.5, grads 7.7, weights 1.9, act 17.8, init 11.5)`."""
        parts = (
            ("state", self.state), ("grads", self.grads), ("weights", self.weights),
            ("act", self.activations), ("logits", self.logits), ("init", self.extra),
        )  # fmt: skip
        inner = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts if value)
        return f"{self.total / GIB:.1f} GiB ({inner})"


def estimate(
    config: _configs.BenchConfig,
    preset: _configs.ModelPreset,
    *,
    ahead_all: bool | None = None,
) -> MemoryEstimate:
    """The predicted peak memory of `config` training `preset` (see the module docstring).

    `ahead_all`: whether jaxpp compiles ahead on ranks of several devices, which also
    places the initial accumulators (default: `JAXPP_PRECOMPILE` is "all" in `os.environ`).

    Example:
        >>> e = estimate(_configs.parse_config("jaxpp/1f1b/pp2/mb16/noremat"),
        ...              _configs.PRESETS["2b"])
        >>> round(e.total / GIB, 1)
        48.2
    """
    if config.kind == _configs.SPMD:
        return _estimate_spmd(config, preset)
    if ahead_all is None:
        ahead_all = os.environ.get("JAXPP_PRECOMPILE", "1").strip() == "all"
    return _estimate_jaxpp(config, preset, ahead_all=ahead_all)


def usable_bytes(
    device_kind: str = "h200", *, fraction: float | None = None, environ: dict | None = None
) -> float:
    """Bytes a JAX process may allocate on one device of `device_kind`.

    `fraction` defaults to `XLA_PYTHON_CLIENT_MEM_FRACTION` from `environ` (default
    `os.environ`), else JAX's default 0.75.

    Raises:
        ValueError: an unknown device kind or a fraction outside (0, 1].

    Example:
        >>> round(usable_bytes("h200", environ={}) / GIB, 1)
        105.3
        >>> round(usable_bytes("h200", fraction=0.9) / GIB, 1)
        126.4
    """
    kind = device_kind.lower()
    if kind not in DEVICE_MEMORY_GIB:
        raise ValueError(
            f"device kind {device_kind!r} has no known memory size. Fix: one of "
            f"{', '.join(DEVICE_MEMORY_GIB)}, or give --memory-gib."
        )
    if fraction is None:
        env = os.environ if environ is None else environ
        text = env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        fraction = DEFAULT_MEM_FRACTION if text is None else float(text)
    if not 0 < fraction <= 1:
        raise ValueError(f"memory fraction {fraction!r} must lie in (0, 1].")
    return DEVICE_MEMORY_GIB[kind] * GIB * fraction


def oom_problem(
    config: _configs.BenchConfig, preset: _configs.ModelPreset, limit_bytes: float
) -> str | None:
    """`predicted OOM: X GiB > Y GiB (...)` if the estimate exceeds `limit_bytes`, else None.

    Example:
        >>> config = _configs.parse_config("spmd/fsdp2/acc1/noremat")
        >>> oom_problem(config, _configs.PRESETS["2b"], 105 * GIB)[:36]
        'predicted OOM: 115.6 GiB > 105.0 GiB'
    """
    found = estimate(config, preset)
    if found.total <= limit_bytes:
        return None
    return (
        f"predicted OOM: {found.total / GIB:.1f} GiB > {limit_bytes / GIB:.1f} GiB "
        f"[{found.describe()}]. Fix: remat, more accumulation steps or microbatches, or more "
        f"sharding; or raise XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75)."
    )


# -- the GPT's parameter counts, without JAX ------------------------------------------


def layer_params(preset: _configs.ModelPreset) -> int:
    """Parameters of one transformer block (RMSNorm scales, q k v out, up down).

    Example:
        >>> layer_params(_configs.PRESETS["2b"])
        78648320
    """
    d, kv = preset.d_model, _kv_width(preset)
    return 2 * d + d * (2 * d + 2 * kv) + 2 * d * preset.d_ff


def embed_params(preset: _configs.ModelPreset) -> int:
    """Token and position embedding parameters."""
    return (preset.vocab_size + preset.seq_len) * preset.d_model


def head_params(preset: _configs.ModelPreset) -> int:
    """Final norm and unembedding parameters."""
    return preset.d_model + preset.d_model * preset.vocab_size


def total_params(preset: _configs.ModelPreset) -> int:
    """All parameters (equals `jaxpp.models.gpt.param_count` of the preset's GPT).

    Example:
        >>> total_params(_configs.PRESETS["2b"])
        2060577280
    """
    return embed_params(preset) + preset.num_layers * layer_params(preset) + head_params(preset)


def activation_bytes_per_token(
    preset: _configs.ModelPreset, *, remat: bool, model: int = 1
) -> float:
    """Bytes one layer keeps per token for its backward, on one of `model` TP shards.

    Example:
        >>> activation_bytes_per_token(_configs.PRESETS["2b"], remat=False)
        102400.0
    """
    d, kv, ff = preset.d_model, _kv_width(preset), preset.d_ff
    if remat:
        return float(ACTIVATION_BYTES * d)
    replicated = 4 * d  # residual in and out of attention, both norm outputs
    sharded = 2 * d + 2 * kv + 3 * ff  # q, attention output, k, v, up, GELU in/out
    return float(ACTIVATION_BYTES * (replicated + sharded / model))


def _kv_width(preset: _configs.ModelPreset) -> int:
    return preset.num_kv_heads * (preset.d_model // preset.num_heads)


def _activations(preset, *, tokens: float, layers: int, remat: bool, model: int) -> float:
    full = activation_bytes_per_token(preset, remat=False, model=model)
    if not remat:
        return tokens * layers * full
    # The saved block inputs, plus one block recomputed in full during its backward.
    return tokens * (layers * activation_bytes_per_token(preset, remat=True) + full)


def _estimate_spmd(config: _configs.BenchConfig, preset: _configs.ModelPreset) -> MemoryEstimate:
    model, data = config.model, config.data
    shards = model * (data if config.fsdp else 1)
    total = total_params(preset)
    held = total / shards
    grads = GRAD_BYTES * held * (2 if config.accumulation > 1 else 1)
    if not config.fsdp or data == 1:
        weights = WEIGHT_BYTES * total / model
    elif config.remat:  # gathered per layer, the next prefetched
        weights = WEIGHT_BYTES * 2 * layer_params(preset) / model
    elif config.scan:  # gathered per loop iteration, the next prefetched; the backward
        # keeps each layer's bf16 cast, still sharded (re-gathered in its loop)
        weights = WEIGHT_BYTES * (2 * layer_params(preset) / model + held)
    else:  # every layer's gathered weights are kept for the backward
        weights = WEIGHT_BYTES * total / model
    tokens = preset.global_batch // config.accumulation // data * preset.seq_len
    factor = ACTIVATION_FACTOR[_configs.SPMD]
    act = _activations(
        preset, tokens=tokens, layers=preset.num_layers, remat=config.remat, model=model
    )
    return MemoryEstimate(
        state=STATE_BYTES * held,
        grads=grads,
        weights=weights,
        activations=factor * act,
        logits=LOGIT_BYTES * tokens * preset.vocab_size / model,
    )


def _estimate_jaxpp(
    config: _configs.BenchConfig,
    preset: _configs.ModelPreset,
    *,
    ahead_all: bool,
) -> MemoryEstimate:
    from jaxpp import schedules

    stages = config.num_stages
    builder = schedules.get_builder(config.schedule, stages, ranks=config.ranks)
    schedule = builder.build(config.microbatches)
    in_flight = schedules.simulate(schedule, schedules.Costs()).peak_activations
    per_stage = math.ceil(preset.num_layers / stages)
    tokens = preset.global_batch // config.microbatches // config.data * preset.seq_len
    stage_act = _activations(
        preset, tokens=tokens, layers=per_stage, remat=config.remat, model=config.model
    )
    if config.remat:  # the recomputed block counts once per rank, not per microbatch
        one = tokens * activation_bytes_per_token(preset, remat=False, model=config.model)
        stage_act -= one
    factor = ACTIVATION_FACTOR[_configs.JAXPP]
    # Parameters held per device: TP shards them over "model"; FSDP inside the stage also
    # over "data" (and the gradients with them); the bf16 copies are gathered whole.
    shards = config.data if config.fsdp else 1
    best: MemoryEstimate | None = None
    for rank in range(config.ranks):
        mine = [s for s in range(stages) if schedule.placement[s] == rank]
        held = len(mine) * per_stage * layer_params(preset)
        held += embed_params(preset) if 0 in mine else 0
        held += head_params(preset) if stages - 1 in mine else 0
        held /= config.model
        act = in_flight[rank] * stage_act
        if config.remat:
            act += one
        logits = LOGIT_BYTES * tokens * preset.vocab_size / config.model
        # (a) of the module docstring: replicated initial accumulators, several devices
        replicated = config.data * config.model > 1 and not ahead_all
        copies = config.data if config.data > 1 and not config.fsdp else 1
        accumulators = GRAD_BYTES * held * config.model * copies if replicated else 0.0
        found = MemoryEstimate(
            state=STATE_BYTES * held / shards,
            grads=2 * GRAD_BYTES * held / shards,
            weights=WEIGHT_BYTES * held,
            activations=factor * act,
            logits=logits if stages - 1 in mine else 0.0,
            extra=FIRST_STEP_BYTES * held / shards + accumulators,
        )
        if best is None or found.total > best.total:
            best = found
    assert best is not None  # bug in jaxpp: a configuration has at least one rank
    return best
