"""Model presets and benchmark configurations, named so a sweep can be split by flags.

A configuration name says everything that varies between runs:

- `spmd/<layout>[-scan]/acc<A>/<remat>`: plain `jax.jit` over all devices, e.g.
  `spmd/fsdp2-tp2/acc4/remat` (layouts `dp<D>`, `fsdp<D>`, `tp<M>`, `dp<D>-tp<M>`,
  `fsdp<D>-tp<M>`; `A` gradient-accumulation steps). The `-scan` suffix
  (`spmd/fsdp4-scan/acc4/noremat@overlap`) runs the GPT with `scan_layers=True`: the
  blocks as one loop over stacked parameters [layers, ...], so under FSDP each loop
  iteration gathers one layer's weights (MaxText-style), and XLA's pipelined
  all-gather / reduce-scatter (the `@overlap` preset) can prefetch the next layer's;
  the unrolled model has no such loop. Same parameter values as the unrolled model
  (layer i of the stack is `layers_i`), so the same first-step loss.
- `jaxpp/<schedule>/pp<R>[-dp<D>|-fsdp<D>][-tp<M>]/mb<K>/<remat>`: `mpmd_jit_with_loop` on
  `R` pipeline ranks, each a `D x M` sub-mesh (`fsdp`: the stage's parameters and AdamW
  state also sharded over its `D` devices, ZeRO-3), `K` microbatches, e.g.
  `jaxpp/zbv/pp4/mb16/noremat`, `jaxpp/zb-h1/pp2-fsdp2/mb16/noremat`.
"""

import dataclasses
import re
import types

SPMD = "spmd"
JAXPP = "jaxpp"
SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1", "zbv", "dualpipev")
# Schedules that put two stages on each rank (interleaved, V shapes).
TWO_STAGES_PER_RANK = frozenset({"interleaved-1f1b", "zbv", "dualpipev"})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelPreset:
    """A GPT size and its batch for the benchmark.

    Attributes:
        name: "tiny", "2b" or "8b".
        num_layers, d_model, num_heads, num_kv_heads, d_ff, vocab_size: the GPT's shape.
        seq_len: tokens per sequence.
        global_batch: sequences per step (the same for every configuration).
        dtype: compute dtype ("bfloat16" or "float32"); parameters and AdamW state are float32.
        microbatches: default microbatch counts of the jaxpp sweep.
        accumulations: default gradient-accumulation counts of the SPMD sweep.
    """

    name: str
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    d_ff: int
    vocab_size: int
    seq_len: int
    global_batch: int
    dtype: str
    microbatches: tuple[int, ...]
    accumulations: tuple[int, ...]


PRESETS: types.MappingProxyType[str, ModelPreset] = types.MappingProxyType(
    {
        # ~0.03M parameters: 4-8 virtual CPU devices, float32 so the gate is tight.
        "tiny": ModelPreset(
            name="tiny",
            num_layers=4,
            d_model=32,
            num_heads=4,
            num_kv_heads=4,
            d_ff=64,
            vocab_size=64,
            seq_len=16,
            global_batch=8,
            dtype="float32",
            microbatches=(4,),
            accumulations=(1, 2),
        ),
        # ~2.1B parameters (2x H200): 24 layers of width 2560.
        "2b": ModelPreset(
            name="2b",
            num_layers=24,
            d_model=2560,
            num_heads=20,
            num_kv_heads=20,
            d_ff=10240,
            vocab_size=32768,
            seq_len=2048,
            global_batch=32,
            dtype="bfloat16",
            microbatches=(8, 16, 32),
            accumulations=(1, 4),
        ),
        # ~8.3B parameters (4x H200): 40 layers of width 4096.
        "8b": ModelPreset(
            name="8b",
            num_layers=40,
            d_model=4096,
            num_heads=32,
            num_kv_heads=32,
            d_ff=16384,
            vocab_size=32768,
            seq_len=2048,
            global_batch=32,
            dtype="bfloat16",
            microbatches=(8, 16, 32),
            accumulations=(1, 4),
        ),
    }  # fmt: skip
)


# XLA flag presets a configuration may name after "@" (spmd/fsdp4/acc4/noremat@overlap).
# "overlap": the collective-overlap settings commonly recommended for JAX training on
# GPUs (latency-hiding scheduler, collectives pipelined across loop iterations, double-
# buffered loops, large combine thresholds). Every flag is known to jax 0.11.2's XLA.
# Known hazard (measured on 4x H200, jax 0.11.2): the 8B TP4 step with 4 accumulated
# microbatches compiles wrong under this preset at XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (one
# microbatch's loss lost), right at 0.75 and right at 0.9 without the pipelined all-reduce;
# the bench's loss check catches it, and TP rows run at 0.75 (benchmarks/README.md).
XLA_PRESETS: dict[str, tuple[str, ...]] = {
    "overlap": (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_pipelined_all_gather=true",
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "--xla_gpu_enable_while_loop_double_buffering=true",
        "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
        "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
        "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    ),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """One measured configuration; `name` round-trips through `parse_config`.

    `xla` names an XLA flag preset (`XLA_PRESETS`) the configuration runs with ("" for
    XLA's defaults); it needs `--isolate`, since XLA reads its flags once per process.

    Example:
        >>> parse_config("jaxpp/zbv/pp2-tp2/mb16/remat").name
        'jaxpp/zbv/pp2-tp2/mb16/remat'
        >>> parse_config("spmd/fsdp4/acc4/noremat@overlap").xla
        'overlap'
        >>> parse_config("jaxpp/zb-h1/pp2-fsdp2/mb16/noremat").fsdp
        True
        >>> parse_config("spmd/fsdp4-scan/acc4/noremat@overlap").scan
        True
    """

    kind: str
    layout: str
    data: int
    model: int
    fsdp: bool = False
    accumulation: int = 1
    schedule: str | None = None
    ranks: int = 1
    microbatches: int = 1
    remat: bool = False
    xla: str = ""
    scan: bool = False

    @property
    def xla_flags(self) -> tuple[str, ...]:
        """The XLA flags of its preset (none for XLA's defaults)."""
        return XLA_PRESETS[self.xla] if self.xla else ()

    @property
    def num_devices(self) -> int:
        """Devices the configuration uses."""
        return self.ranks * self.data * self.model

    @property
    def num_stages(self) -> int:
        """Pipeline stages (two per rank for interleaved and V schedules)."""
        if self.kind == SPMD:
            return 1
        return self.ranks * (2 if self.schedule in TWO_STAGES_PER_RANK else 1)

    @property
    def name(self) -> str:
        """The configuration's name, as `--configs` takes it."""
        remat = "remat" if self.remat else "noremat"
        preset = f"@{self.xla}" if self.xla else ""
        if self.kind == SPMD:
            return f"{SPMD}/{self.layout}/acc{self.accumulation}/{remat}{preset}"
        return f"{JAXPP}/{self.schedule}/{self.layout}/mb{self.microbatches}/{remat}{preset}"


_SPMD_LAYOUT = re.compile(r"^(?:(dp|fsdp)(\d+))?(?:-?tp(\d+))?(-scan)?$")
_JAXPP_LAYOUT = re.compile(r"^pp(\d+)(?:-(dp|fsdp)(\d+))?(?:-tp(\d+))?$")
_REMAT = ("remat", "noremat")
_FORMS = (
    "spmd/<dpD|fsdpD|tpM|dpD-tpM|fsdpD-tpM>[-scan]/acc<A>/<remat|noremat> or "
    "jaxpp/<schedule>/pp<R>[-dp<D>|-fsdp<D>][-tp<M>]/mb<K>/<remat|noremat>, either with an "
    "optional @<XLA flag preset>"
)


def parse_config(name: str) -> BenchConfig:
    """The configuration a name describes.

    Raises:
        ValueError: if the name is malformed; the message shows the valid forms.

    Example:
        >>> parse_config("spmd/fsdp2-tp2/acc4/remat").num_devices
        4
    """
    name, _, xla = name.strip().partition("@")
    if xla and xla not in XLA_PRESETS:
        raise ValueError(
            f"configuration {name}@{xla}: unknown XLA flag preset {xla!r}. Fix: use one of "
            f"{', '.join(XLA_PRESETS)}, or no @ suffix for XLA's defaults."
        )
    parts = name.split("/")
    fix = f"Fix: write {_FORMS}, e.g. spmd/fsdp4/acc1/noremat or jaxpp/1f1b/pp4/mb8/remat."
    sizes = {SPMD: 4, JAXPP: 5}
    if parts[0] not in sizes or len(parts) != sizes[parts[0]] or parts[-1] not in _REMAT:
        raise ValueError(f"configuration {name!r} is malformed. {fix}")
    if parts[0] == SPMD:
        _, layout, count, remat = parts
        match = _SPMD_LAYOUT.match(layout)
        ok = match and layout.removesuffix("-scan")
        if not ok or not count.startswith("acc") or not count[3:].isdigit():
            raise ValueError(f"configuration {name!r}: bad SPMD layout or acc count. {fix}")
        mode, data, model, scan = match.groups()
        config = BenchConfig(
            kind=SPMD, layout=layout, data=int(data or 1), model=int(model or 1),
            fsdp=mode == "fsdp", accumulation=int(count[3:]), remat=remat == "remat",
            scan=scan is not None,
        )  # fmt: skip
    else:
        _, schedule, layout, count, remat = parts
        if schedule not in SCHEDULES:
            raise ValueError(
                f"configuration {name!r}: unknown schedule {schedule!r}. "
                f"Fix: use one of {', '.join(SCHEDULES)}."
            )
        match = _JAXPP_LAYOUT.match(layout)
        if not match or not count.startswith("mb") or not count[2:].isdigit():
            raise ValueError(f"configuration {name!r}: bad jaxpp layout or mb count. {fix}")
        ranks, mode, data, model = match.groups()
        config = BenchConfig(
            kind=JAXPP, layout=layout, data=int(data or 1), model=int(model or 1),
            fsdp=mode == "fsdp", schedule=schedule, ranks=int(ranks), microbatches=int(count[2:]),
            remat=remat == "remat",
        )  # fmt: skip
    counts = (config.data, config.model, config.ranks, config.accumulation, config.microbatches)
    if min(counts) < 1:
        raise ValueError(f"configuration {name!r}: every count must be >= 1. {fix}")
    return dataclasses.replace(config, xla=xla)


def spmd_layouts(num_devices: int) -> tuple[str, ...]:
    """The SPMD layouts of `num_devices` devices: DP, FSDP, TP and their 2-D mixes.

    Example:
        >>> spmd_layouts(4)
        ('dp4', 'fsdp4', 'tp4', 'dp2-tp2', 'fsdp2-tp2')
    """
    layouts = [f"dp{num_devices}", f"fsdp{num_devices}", f"tp{num_devices}"]
    for model in _divisors(num_devices):
        if 1 < model < num_devices:
            data = num_devices // model
            layouts += [f"dp{data}-tp{model}", f"fsdp{data}-tp{model}"]
    return tuple(layouts)


def jaxpp_layouts(num_devices: int) -> tuple[str, ...]:
    """Pipeline layouts: all devices as ranks, then 2 ranks with DP or TP inside.

    Example:
        >>> jaxpp_layouts(4)
        ('pp4', 'pp2-dp2', 'pp2-tp2')
    """
    layouts = [f"pp{num_devices}"]
    if num_devices >= 4 and num_devices % 2 == 0:
        inner = num_devices // 2
        layouts += [f"pp2-dp{inner}", f"pp2-tp{inner}"]
    return tuple(layouts)


def sweep(
    preset: ModelPreset,
    num_devices: int,
    *,
    only: str | None = None,
    schedules: tuple[str, ...] = SCHEDULES,
    microbatches: tuple[int, ...] | None = None,
    accumulations: tuple[int, ...] | None = None,
    remat: tuple[bool, ...] = (False, True),
    layouts: tuple[str, ...] | None = None,
) -> tuple[BenchConfig, ...]:
    """Every configuration of the sweep that fits the preset (layers per stage, batch split).

    Example:
        >>> names = [c.name for c in sweep(PRESETS["tiny"], 4, only="jaxpp", remat=(False,))]
        >>> names[:2]
        ['jaxpp/1f1b/pp4/mb4/noremat', 'jaxpp/1f1b/pp2-dp2/mb4/noremat']
    """
    if only not in (None, SPMD, JAXPP):
        raise ValueError(f"only={only!r}; expected {SPMD!r}, {JAXPP!r} or None.")
    for schedule in schedules:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}. Fix: use one of {SCHEDULES}.")
    names: list[str] = []
    if only != JAXPP:
        for layout in layouts or spmd_layouts(num_devices):
            if not _SPMD_LAYOUT.match(layout) or layout.startswith("pp"):
                continue
            for acc in accumulations or preset.accumulations:
                names += [f"{SPMD}/{layout}/acc{acc}/{_remat(r)}" for r in remat]
    if only != SPMD:
        for schedule in schedules:
            for layout in layouts or jaxpp_layouts(num_devices):
                if not _JAXPP_LAYOUT.match(layout):
                    continue
                for count in microbatches or preset.microbatches:
                    names += [f"{JAXPP}/{schedule}/{layout}/mb{count}/{_remat(r)}" for r in remat]
    configs = tuple(parse_config(n) for n in names)
    return tuple(c for c in configs if not fit_problem(c, preset, num_devices))


def fit_problem(config: BenchConfig, preset: ModelPreset, num_devices: int) -> str | None:
    """Why `config` cannot run `preset` on `num_devices` devices, or None if it can.

    Example:
        >>> fit_problem(parse_config("jaxpp/1f1b/pp3/mb8/remat"), PRESETS["tiny"], 4)
        'uses 3 devices, but the run has 4'
    """
    if config.num_devices != num_devices:
        return f"uses {config.num_devices} devices, but the run has {num_devices}"
    if preset.num_layers % config.num_stages:
        return f"{preset.num_layers} layers do not split into {config.num_stages} stages"
    split = config.accumulation if config.kind == SPMD else config.microbatches
    if preset.global_batch % split:
        return f"batch {preset.global_batch} does not split into {split} microbatches"
    if (preset.global_batch // split) % config.data:
        return (
            f"microbatch {preset.global_batch // split} does not split over {config.data} devices"
        )
    if config.kind == JAXPP:
        return _schedule_problem(config)
    return None


def _schedule_problem(config: BenchConfig) -> str | None:
    """The schedule builder's refusal (e.g. DualPipeV needs 2 R - 1 microbatches), or None."""
    from jaxpp import schedules

    builder = schedules.get_builder(config.schedule, config.num_stages, ranks=config.ranks)
    try:
        builder.build(config.microbatches)
    except ValueError as e:
        return str(e).split(". Fix")[0]
    return None


def _remat(flag: bool) -> str:
    return "remat" if flag else "noremat"


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)
