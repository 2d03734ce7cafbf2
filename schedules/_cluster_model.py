"""Cluster what-if predictions: step time of DP, FSDP, TP and PP layouts, the sweep, the crossover.

Inputs are `MeasuredCosts` and a `Cluster` (`_cluster.py`). PP layouts run the schedule
through the event simulator with a transfer time per edge from the two ranks' link.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence

from jaxpp.schedules import _cluster, _ir, _registry, _simulate

K = _ir.Kind
FAMILIES = ("dp", "fsdp", "tp", "pp")
SPMD_FAMILIES = ("dp", "fsdp", "tp")
DEFAULT_SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1", "zbv")
ORDERS = ("tp-pp-dp", "tp-dp-pp")

ASSUMPTIONS = (
    "times are per layer on one GPU at the measured microbatch size; PP layouts use that "
    "size, SPMD layouts may take larger microbatches (fewer accumulation steps) whose time, "
    "stored and boundary activations grow linearly with the size",
    "TP divides each layer's compute by tp exactly; its activations and parameters too",
    "TP (Megatron) adds 2 all-reduces of the boundary activation per layer forward and 2 "
    "backward, not overlapped; TP groups stay inside a node",
    "collectives are rings at the slowest link the group crosses (no hierarchical/tree "
    "algorithms, no SHARP), scaled by measured collectives when given",
    "inter-node bandwidth is per GPU (one NIC per GPU); links are full duplex, contention-free",
    "DP gradient all-reduce: exposed = comm - min(overlap x comm, one microbatch's backward)",
    "FSDP (ZeRO-3) per microbatch: all-gather params forward and backward, reduce-scatter "
    "grads, in the compute dtype; exposed = comm - overlap x min(comm, compute)",
    "SPMD layouts shard every op over the batch, the attention kernel included (a Pallas "
    "kernel under plain jax.jit without shard_map or custom_partitioning is not sharded: "
    "XLA gathers its inputs and runs it on the whole batch on every GPU; the measured 8B "
    "spmd/fsdp4/acc4 row of 2026-11-21 does, so the model under-predicts it)",
    "the LM head and loss (measured head_forward_s/head_backward_s, else 0) run on the "
    "last PP stage; SPMD layouts spread them over the batch and TP (vocab-parallel) like "
    "the layers",
    "PP: layers split over stages to balance the ranks' work, the head counted on the last "
    "stage's rank (whole layers; jaxpp.flax layouts allow such splits; validation against "
    "measured runs uses the even split they ran); a stage-boundary send costs latency + "
    "(boundary bytes / tp) / bandwidth of the two ranks' link; DP all-reduce of each "
    "pipeline rank's params after the last backward",
    "a schedule that splits backward without a measured weight_grad_s takes W = B / 2",
    "memory per GPU = held params x state_bytes_per_param_byte + stored activations "
    "(peak in flight for PP) + FSDP gather buffers; no allocator slack, no fragmentation",
    "embedding params count in memory and all-reduces (first and last PP rank), not compute",
    "the optimizer update runs after the last backward, on the critical path, in time "
    "proportional to the parameter bytes a GPU holds (optimizer_s_per_param_byte, 0 if "
    "not measured)",
)


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """A parallel layout: `tp x pp x dp` GPUs.

    Attributes:
        tp: tensor-parallel degree (inside a node).
        pp: pipeline ranks.
        dp: data-parallel replicas.
        fsdp: shard params, grads and optimizer state over the dp axis (ZeRO-3).
        schedule: for pp > 1, a built-in schedule name (see `BUILTINS`), or a `Schedule`
            with `pp` ranks whose microbatch count must equal the layout's.
        order: GPU numbering, innermost axis first: `tp-pp-dp` keeps a pipeline's ranks
            close; `tp-dp-pp` keeps the dp group close.
        microbatch_size: sequences per microbatch; None: the measured one. Times and
            activations scale linearly from the measured size.

    Example:
        >>> Layout(tp=2, pp=4, dp=2, schedule="zbv").describe()
        'tp2 pp4 dp2 zbv tp-pp-dp'
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    fsdp: bool = False
    schedule: str | _ir.Schedule | None = None
    order: str = "tp-pp-dp"
    microbatch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout {name}={value!r} must be an int >= 1.")
        mb = self.microbatch_size
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
            raise ValueError(f"Layout microbatch_size={mb!r} must be None or an int >= 1.")
        if self.order not in ORDERS:
            raise ValueError(f"Layout order={self.order!r}; Fix: use one of {', '.join(ORDERS)}.")
        if self.pp > 1 and self.schedule is None:
            raise ValueError(f"Layout pp={self.pp} needs a schedule. Fix: e.g. schedule='1f1b'.")
        if isinstance(self.schedule, _ir.Schedule) and self.schedule.num_ranks != self.pp:
            raise ValueError(
                f"Layout pp={self.pp} but the schedule has {self.schedule.num_ranks} ranks. "
                f"Fix: pp={self.schedule.num_ranks}."
            )
        if self.pp > 1 and self.fsdp:
            raise ValueError("Layout: FSDP inside a pipeline is not modelled. Fix: fsdp=False.")

    @property
    def num_gpus(self) -> int:
        """`tp * pp * dp`."""
        return self.tp * self.pp * self.dp

    @property
    def schedule_name(self) -> str:
        """The built-in name, or `custom(S stages, M mb)` for a given `Schedule`."""
        if isinstance(self.schedule, _ir.Schedule):
            s = self.schedule
            return f"custom({s.num_stages} stages, {s.num_microbatches} mb)"
        return str(self.schedule)

    @property
    def family(self) -> str:
        """`pp` if pipelined, else `tp` if tp > 1, else `fsdp` or `dp`."""
        if self.pp > 1:
            return "pp"
        if self.tp > 1:
            return "tp"
        return "fsdp" if self.fsdp else "dp"

    def gpu(self, t: int, p: int, d: int) -> int:
        """The GPU id of tensor rank `t`, pipeline rank `p`, replica `d`."""
        if self.order == "tp-pp-dp":
            return t + self.tp * (p + self.pp * d)
        return t + self.tp * (d + self.dp * p)

    def describe(self) -> str:
        """Short text, e.g. `tp2 pp4 dp2 zbv tp-pp-dp`."""
        parts = [f"tp{self.tp}"] if self.tp > 1 else []
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        parts.append(f"{'fsdp' if self.fsdp else 'dp'}{self.dp}")
        if self.microbatch_size is not None:
            parts.append(f"mb{self.microbatch_size}")
        if self.pp > 1:
            parts += [self.schedule_name, self.order]
        return " ".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class Prediction:
    """The predicted step of one layout.

    Attributes:
        layout: the layout.
        step_s: seconds per optimizer step.
        tokens_per_s: tokens per second over the whole job.
        memory_bytes: peak bytes on the fullest GPU.
        fits: `memory_bytes <= costs.gpu_bytes`.
        microbatches: microbatches per replica per step.
        compute_s: one GPU's pure compute per step (no bubble, no communication).
        exposed_comm_s: data-parallel/FSDP communication left on the critical path.
        bubble: the pipeline's idle fraction (0 without PP).
    """

    layout: Layout
    step_s: float
    tokens_per_s: float
    memory_bytes: float
    fits: bool
    microbatches: int
    compute_s: float
    exposed_comm_s: float
    bubble: float


def predict(
    layout: Layout,
    costs: _cluster.MeasuredCosts,
    cluster: _cluster.Cluster,
    *,
    overlap: float = 0.0,
    even_layers: bool = False,
    _bound_only: bool = False,
) -> Prediction:
    """Predicts one step of `layout` on `cluster` from measured per-layer costs.

    Args:
        layout: tp x pp x dp (and schedule for pp > 1).
        costs: the measured inputs.
        cluster: the machine; `layout.num_gpus` must fit in it.
        overlap: fraction of data-parallel communication that may hide behind compute.
        even_layers: for pp > 1, split the layers evenly over the stages (as the measured
            runs did) instead of balancing the ranks' work with the head on the last stage.

    Raises:
        ValueError: the layout needs more GPUs than the cluster has, tp exceeds a node, the
            global batch does not split into microbatches over dp, or more stages than
            layers.

    Example:
        >>> c = _cluster.example_costs()
        >>> p = predict(Layout(), c, _cluster.Cluster(1, 1))
        >>> round(p.step_s, 6), p.microbatches  # 16 microbatches x 4 layers x (F + B)
        (0.192, 16)
    """
    _check_layout(layout, costs, cluster)
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap={overlap!r} must lie in [0, 1]. Fix: e.g. overlap=0.5.")
    mb = layout.microbatch_size or costs.microbatch_size
    m = costs.global_batch // (layout.dp * mb)
    if mb != costs.microbatch_size:
        grow = mb / costs.microbatch_size
        weight = None if costs.weight_grad_s is None else costs.weight_grad_s * grow
        costs = dataclasses.replace(
            costs,
            microbatch_size=mb,
            forward_s=costs.forward_s * grow,
            backward_s=costs.backward_s * grow,
            weight_grad_s=weight,
            activation_bytes=costs.activation_bytes * grow,
            boundary_activation_bytes=costs.boundary_activation_bytes * grow,
            head_forward_s=costs.head_forward_s * grow,
            head_backward_s=costs.head_backward_s * grow,
        )
    scales = _cluster.collective_scales(costs, cluster)
    tp, dp = layout.tp, layout.dp

    def collective(fn, num_bytes: float, group: tuple[int, ...]) -> float:
        link = cluster.group_link(group)
        scale = scales[0] if link is cluster.intra else scales[1]
        return fn(num_bytes, len(group), link) * scale

    tp_group = tuple(layout.gpu(t, 0, 0) for t in range(tp))
    dp_group = tuple(layout.gpu(0, 0, d) for d in range(dp))
    tp_pass = 2 * collective(_cluster.all_reduce_time, costs.boundary_activation_bytes, tp_group)
    forward = costs.forward_s / tp + tp_pass
    backward = costs.backward_s / tp + tp_pass
    head = (costs.head_forward_s + costs.head_backward_s) / tp
    compute = m * (costs.num_layers * (costs.forward_s + costs.backward_s) / tp + head)
    mult = costs.state_bytes_per_param_byte
    if layout.pp > 1:
        return _predict_pipeline(
            layout,
            costs,
            cluster,
            m,
            forward,
            backward,
            compute,
            collective,
            dp_group,
            overlap,
            even_layers,
            _bound_only,
        )
    per_mb = costs.num_layers * (forward + backward) + head
    params = costs.total_param_bytes / tp
    activations = costs.num_layers * costs.activation_bytes / tp
    if layout.fsdp:
        comm = 2 * collective(_cluster.all_gather_time, params, dp_group)
        comm += collective(_cluster.all_gather_time, params, dp_group)  # reduce-scatter
        exposed = m * (comm - overlap * min(comm, per_mb))
        memory = params * mult / dp + 2 * costs.param_bytes / tp + activations
        held = params / dp
    else:
        comm = collective(_cluster.all_reduce_time, params, dp_group)
        exposed = comm - min(overlap * comm, costs.num_layers * backward)
        memory = params * mult + activations
        held = params
    step = m * per_mb + exposed + held * costs.optimizer_s_per_param_byte
    return _prediction(layout, costs, step, memory, m, compute, exposed, 0.0)


def _predict_pipeline(
    layout,
    costs,
    cluster,
    m,
    forward,
    backward,
    compute,
    collective,
    dp_group,
    overlap,
    even_layers,
    bound_only,
) -> Prediction:
    tp = layout.tp
    schedule = _build(layout.schedule, layout.pp, m)
    stages = schedule.num_stages
    head_f, head_b = costs.head_forward_s / tp, costs.head_backward_s / tp
    head_layers = (head_f + head_b) / (forward + backward) if forward + backward else 0.0
    layers = split_layers(costs.num_layers, schedule.placement, 0.0 if even_layers else head_layers)
    weight = costs.weight_grad_s / tp if costs.weight_grad_s is not None else None
    weight = backward / 2 if weight is None else weight
    last = stages - 1
    per_stage = {}
    for s, n in enumerate(layers):
        head = s == last
        # The head's backward splits into input and weight gradients as a layer's does.
        backwards = n + (head_b / backward if head else 0.0)
        per_stage[s] = {
            K.FORWARD: n * forward + (head_f if head else 0.0),
            K.BACKWARD: n * backward + (head_b if head else 0.0),
            K.INPUT_GRAD: backwards * (backward - weight),
            K.WEIGHT_GRAD: backwards * weight,
        }
    sim_costs = _simulate.Costs(per_stage=per_stage)
    hop = costs.boundary_activation_bytes / tp
    rank_gpu = [layout.gpu(0, r, 0) for r in range(layout.pp)]
    transfer = tuple(
        tuple(cluster.link(rank_gpu[a], rank_gpu[b]).time(hop) for b in range(layout.pp))
        for a in range(layout.pp)
    )
    if bound_only:  # the fullest rank's work, no bubble, no transfers: a lower bound
        makespan, bubble, peaks = 0.0, 0.0, _peaks(schedule, sim_costs)
        for rank in range(layout.pp):
            work = sum(n for s, n in enumerate(layers) if schedule.placement[s] == rank)
            work += head_layers if schedule.placement[last] == rank else 0.0
            makespan = max(makespan, m * work * (forward + backward))
    else:
        makespan, bubble, peaks = _pipeline(schedule, sim_costs, transfer)
    # Per pipeline rank: the params it holds and its DP all-reduce.
    held = [0.0] * layout.pp
    for s, n in enumerate(layers):
        held[schedule.placement[s]] += n * costs.param_bytes / tp
    held[schedule.placement[0]] += costs.embedding_param_bytes / 2 / tp
    held[schedule.placement[-1]] += costs.embedding_param_bytes / 2 / tp
    comm = collective(_cluster.all_reduce_time, max(held), dp_group)
    exposed = comm - min(overlap * comm, max(layers) * backward)
    per_stage_act = max(layers) * costs.activation_bytes / tp
    memory = max(
        h * costs.state_bytes_per_param_byte + p * per_stage_act
        for h, p in zip(held, peaks, strict=True)
    )
    compute /= layout.pp
    step = makespan + exposed + max(held) * costs.optimizer_s_per_param_byte
    return _prediction(layout, costs, step, memory, m, compute, exposed, bubble)


def _prediction(layout, costs, step, memory, m, compute, exposed, bubble) -> Prediction:
    return Prediction(
        layout=layout,
        step_s=step,
        tokens_per_s=costs.tokens_per_step / step if step > 0 else float("inf"),
        memory_bytes=memory,
        fits=memory <= costs.gpu_bytes,
        microbatches=m,
        compute_s=compute,
        exposed_comm_s=max(exposed, 0.0),
        bubble=bubble,
    )


def _check_layout(layout: Layout, costs: _cluster.MeasuredCosts, cluster: _cluster.Cluster):
    if layout.num_gpus > cluster.num_gpus:
        raise ValueError(
            f"layout {layout.describe()} needs {layout.num_gpus} GPUs; the cluster has "
            f"{cluster.num_gpus}. Fix: a smaller layout or more nodes."
        )
    if layout.tp > cluster.gpus_per_node or cluster.gpus_per_node % layout.tp:
        raise ValueError(
            f"layout tp={layout.tp} must divide gpus_per_node={cluster.gpus_per_node}: TP "
            "stays inside a node. Fix: a smaller tp."
        )
    mb = layout.microbatch_size or costs.microbatch_size
    if costs.global_batch % (layout.dp * mb):
        raise ValueError(
            f"global_batch={costs.global_batch} does not split over dp={layout.dp} x "
            f"microbatch_size={mb}. Fix: a dp x microbatch size that divides "
            f"{costs.global_batch}."
        )
    if layout.pp > 1:
        if isinstance(layout.schedule, _ir.Schedule):
            stages = layout.schedule.num_stages
            m = costs.global_batch // (layout.dp * mb)
            if layout.schedule.num_microbatches != m:
                raise ValueError(
                    f"the schedule has {layout.schedule.num_microbatches} microbatches but "
                    f"global_batch={costs.global_batch} over dp={layout.dp} x microbatch "
                    f"{mb} makes {m}. Fix: dp = {costs.global_batch} / ({mb} x "
                    f"{layout.schedule.num_microbatches}) or another schedule."
                )
        else:
            stages = layout.pp * _stages_per_rank(layout.schedule)
        if stages > costs.num_layers:
            raise ValueError(
                f"layout {layout.describe()} has {stages} stages but the model has "
                f"{costs.num_layers} layers. Fix: fewer pipeline ranks."
            )


def split_layers(
    num_layers: int, placement: Sequence[int], head_layers: float = 0.0
) -> tuple[int, ...]:
    """Whole layers per stage: the even split, then layers moved off the last stage while
    that lowers the busiest rank's work (`head_layers`: the head's cost in layers, on the
    last stage's rank). Every stage keeps at least one layer.

    Example:
        >>> split_layers(40, (0, 1, 2, 3)), split_layers(40, (0, 1, 2, 3), 1.4)
        ((10, 10, 10, 10), (11, 10, 10, 9))
    """
    stages = len(placement)
    layers = [num_layers // stages + (s < num_layers % stages) for s in range(stages)]
    ranks = max(placement) + 1
    last = stages - 1

    def loads(split):
        work = [0.0] * ranks
        for s, n in enumerate(split):
            work[placement[s]] += n
        work[placement[last]] += head_layers
        return work

    while layers[last] > 1:
        work = loads(layers)
        lightest = min(range(ranks), key=work.__getitem__)
        targets = [s for s in range(last) if placement[s] == lightest]
        if not targets:
            break
        target = min(targets, key=layers.__getitem__)
        moved = list(layers)
        moved[last] -= 1
        moved[target] += 1
        if max(loads(moved)) >= max(work):
            break
        layers = moved
    return tuple(layers)


def _stages_per_rank(name: str) -> int:
    return _registry.builder_class(name)._stages_per_rank or 2


@functools.lru_cache(maxsize=256)
def _build(name: str | _ir.Schedule, ranks: int, m: int) -> _ir.Schedule:
    if isinstance(name, _ir.Schedule):
        return name
    return _registry.get_builder(name, ranks * _stages_per_rank(name), ranks=ranks).build(m)


@functools.lru_cache(maxsize=1024)
def _pipeline(
    schedule: _ir.Schedule, costs: _simulate.Costs, transfer: tuple[tuple[float, ...], ...]
) -> tuple[float, float, tuple[float, ...]]:
    """`(makespan, bubble, peak activations per rank)`; `simulate` if all edges cost the same."""
    cross = {transfer[a][b] for a in range(len(transfer)) for b in range(len(transfer)) if a != b}
    if len(cross) <= 1:
        latency = cross.pop() if cross else 0.0
        sim = _simulate.simulate(schedule, dataclasses.replace(costs, transfer=latency))
        return sim.makespan, sim.bubble, sim.peak_activations
    runs = run_linked(schedule, costs, transfer)
    makespan = max(e for _, _, _, e in runs)
    busy = sum(e - s for _, _, s, e in runs)
    return makespan, 1 - busy / (schedule.num_ranks * makespan), _peaks(schedule, costs)


def _peaks(schedule: _ir.Schedule, costs: _simulate.Costs) -> tuple[float, ...]:
    """Peak activations per rank as `simulate` counts them: running sums in list order."""
    peaks = []
    for actions in schedule.actions:
        level = peak = 0.0
        for action in actions:
            level += costs.memory[action.kind]
            peak = max(peak, level)
        peaks.append(peak)
    return tuple(peaks)


def run_linked(
    schedule: _ir.Schedule,
    costs: _simulate.Costs,
    transfer: Sequence[Sequence[float]],
) -> list[tuple[int, int, float, float]]:
    """`simulate`'s list scheduler with a transfer time per `(from rank, to rank)` edge.

    The one list scheduler (`_simulate.run_in_time`) with per-edge times: a dependency
    from rank `a` to rank `b != a` adds `transfer[a][b]` instead of `costs.transfer`.

    Returns:
        `(rank, step, start, end)` in start order.

    Raises:
        ScheduleError: incomplete, misplaced or deadlocked schedules (via `simulate`).

    Example:
        >>> from jaxpp.schedules import Std1F1B
        >>> runs = run_linked(Std1F1B(2).build(1), _simulate.Costs(), ((0, 0.5), (0.25, 0)))
        >>> [(r, s, e) for r, _, s, e in runs]
        [(0, 0.0, 1.0), (1, 1.5, 2.5), (1, 2.5, 4.5), (0, 4.75, 6.75)]
    """
    return _simulate.run_in_time(schedule, costs, transfer=transfer)


@dataclasses.dataclass(frozen=True, slots=True)
class WhatIfRow:
    """The best fitting layout of each family at one GPU count (None: nothing fits)."""

    gpus: int
    best: Mapping[str, Prediction | None]

    @property
    def best_spmd(self) -> Prediction | None:
        """The fastest of the DP, FSDP and TP families."""
        return _fastest(self.best[f] for f in SPMD_FAMILIES)


@dataclasses.dataclass(frozen=True, slots=True)
class WhatIf:
    """The sweep of `what_if`: rows by GPU count and the crossover.

    Attributes:
        costs: the inputs.
        cluster: the machine.
        overlap: the DP overlap fraction used.
        rows: one per GPU count, ascending.
        crossover: the smallest GPU count at which the best PP layout is faster than the
            best SPMD layout (or fits when no SPMD layout does); None if never.
    """

    costs: _cluster.MeasuredCosts
    cluster: _cluster.Cluster
    overlap: float
    rows: tuple[WhatIfRow, ...]
    crossover: int | None


def candidate_layouts(
    gpus: int,
    costs: _cluster.MeasuredCosts,
    cluster: _cluster.Cluster,
    *,
    schedules: Sequence[str] = DEFAULT_SCHEDULES,
) -> tuple[Layout, ...]:
    """Every layout of `gpus` GPUs the sweep tries: powers of two for tp and pp.

    Example:
        >>> c = _cluster.example_costs()
        >>> layouts = candidate_layouts(2, c, _cluster.Cluster(1, 2), schedules=("1f1b",))
        >>> len(layouts), [x.describe() for x in layouts if x.family in ("tp", "pp")][:2]
        (14, ['pp2 dp1 1f1b tp-pp-dp', 'tp2 dp1'])
    """
    out: list[Layout] = []
    tps = [t for t in _powers(cluster.gpus_per_node) if cluster.gpus_per_node % t == 0]
    for tp in tps:
        for pp in _powers(gpus // tp):
            dp, rest = divmod(gpus, tp * pp)
            if rest:
                continue
            if pp == 1:
                for mb in _microbatch_sizes(costs, dp):
                    out.append(Layout(tp=tp, dp=dp, microbatch_size=mb))
                    if dp > 1:
                        out.append(Layout(tp=tp, dp=dp, fsdp=True, microbatch_size=mb))
                continue
            orders = ORDERS if dp > 1 else ORDERS[:1]
            for name in schedules:
                out += [Layout(tp=tp, pp=pp, dp=dp, schedule=name, order=o) for o in orders]
    valid = []
    for layout in out:
        try:
            _check_layout(layout, costs, cluster)
        except ValueError:
            continue
        valid.append(layout)
    return tuple(valid)


def what_if(
    costs: _cluster.MeasuredCosts,
    cluster: _cluster.Cluster,
    *,
    gpu_counts: Sequence[int] | None = None,
    schedules: Sequence[str] = DEFAULT_SCHEDULES,
    overlap: float = 0.0,
) -> WhatIf:
    """The best layout of each family at each GPU count, and the PP-vs-SPMD crossover.

    Args:
        costs: the measured inputs.
        cluster: the machine (its size caps the GPU counts).
        gpu_counts: default powers of two from 8 (1 on a smaller cluster) to the cluster.
        schedules: the built-in schedules PP layouts try.
        overlap: DP communication overlap fraction, see `predict`.

    Example:
        >>> r = what_if(_cluster.example_costs(), _cluster.parse_cluster("nodes=1,gpus_per_node=2"),
        ...             schedules=("1f1b",))
        >>> [row.gpus for row in r.rows], r.rows[0].best["dp"].layout.describe()
        ([1, 2], 'dp1')
    """
    if gpu_counts is None:
        first = 8 if cluster.num_gpus >= 8 else 1
        gpu_counts = [g for g in _powers(cluster.num_gpus) if g >= first]
    rows = []
    crossover = None
    for gpus in gpu_counts:
        best: dict[str, Prediction | None] = dict.fromkeys(FAMILIES)
        layouts = candidate_layouts(gpus, costs, cluster, schedules=schedules)
        # Lower bounds (exact for SPMD, no bubble for PP) first: fitting layouts, best bound
        # first; a pipeline whose bound cannot beat its family's best is not simulated.
        bounds = []
        for layout in layouts:
            try:
                bounds.append(predict(layout, costs, cluster, overlap=overlap, _bound_only=True))
            except ValueError:  # the builder refuses this microbatch count (e.g. dualpipev)
                continue
        for bound in sorted((b for b in bounds if b.fits), key=lambda b: b.step_s):
            layout, incumbent = bound.layout, best[bound.layout.family]
            if incumbent is not None and bound.step_s >= incumbent.step_s:
                continue
            prediction = predict(layout, costs, cluster, overlap=overlap)
            if prediction.fits:
                best[layout.family] = _fastest((best[layout.family], prediction))
        row = WhatIfRow(gpus, best)
        rows.append(row)
        spmd, pp = row.best_spmd, best["pp"]
        if crossover is None and pp is not None and (spmd is None or pp.step_s < spmd.step_s):
            crossover = gpus
    return WhatIf(costs, cluster, overlap, tuple(rows), crossover)


def format_what_if(result: WhatIf) -> str:
    """The table, the crossover and every assumption, as text.

    Example:
        >>> r = what_if(_cluster.example_costs(), _cluster.parse_cluster("nodes=1,gpus_per_node=2"),
        ...             schedules=("1f1b",))
        >>> print(format_what_if(r).splitlines()[0])
        inputs: NOT MEASURED (illustrative) -- illustrative numbers, not a measurement
    """
    costs = result.costs
    origin = "measured" if costs.measured else "NOT MEASURED (illustrative)"
    lines = [
        f"inputs: {origin} -- {costs.note}" if costs.note else f"inputs: {origin}",
        f"model: {costs.num_layers} layers, {costs.total_param_bytes / 1e9:.2f} GB params, "
        f"global batch {costs.global_batch} x {costs.seq_len} tokens, microbatch "
        f"{costs.microbatch_size}; per layer F {costs.forward_s * 1e3:.3g} ms, "
        f"B {costs.backward_s * 1e3:.3g} ms; GPU memory {costs.gpu_bytes / 1e9:g} GB",
        f"cluster: {result.cluster.describe()}; DP overlap {result.overlap:g}",
        "",
        f"{'gpus':>5}  " + "  ".join(f"{'best ' + f:<26}" for f in FAMILIES) + "  PP/SPMD",
    ]
    for row in result.rows:
        cells = []
        for family in FAMILIES:
            p = row.best[family]
            cells.append(f"{'-- nothing fits':<26}" if p is None else f"{_cell(p):<26}")
        spmd, pp = row.best_spmd, row.best["pp"]
        ratio = f"{spmd.step_s / pp.step_s:.2f}x" if spmd is not None and pp is not None else "--"
        lines.append(f"{row.gpus:>5}  " + "  ".join(cells) + f"  {ratio:>7}")
    lines.append("")
    lines.append("cells: step seconds, layout; PP/SPMD > 1 means PP is faster (tokens/s ratio)")
    for row in result.rows:
        pp = row.best["pp"]
        if pp is not None:
            lines.append(
                f"  {row.gpus:>5} GPUs PP: {pp.layout.describe()} m={pp.microbatches} bubble "
                f"{100 * pp.bubble:.1f}% exposed comm {pp.exposed_comm_s * 1e3:.3g} ms, "
                f"{pp.tokens_per_s:,.0f} tok/s, {pp.memory_bytes / 1e9:.1f} GB/GPU"
            )
    if result.crossover is None:
        last = result.rows[-1].gpus if result.rows else 0
        lines.append(f"crossover: none -- the best SPMD layout wins at every scale up to {last}")
    else:
        lines.append(
            f"crossover: PP overtakes the best SPMD layout at {result.crossover} GPUs "
            f"({result.cluster.gpus_per_node} per node)"
        )
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    return "\n".join(lines)


def _cell(p: Prediction) -> str:
    layout = p.layout.describe()
    if p.layout.pp > 1:
        layout = layout.rsplit(" ", 1)[0]  # the order is in the detail lines
    return f"{p.step_s:7.3f}s {layout}"


def _fastest(predictions) -> Prediction | None:
    best = None
    for p in predictions:
        if p is not None and (best is None or p.step_s < best.step_s):
            best = p
    return best


def _microbatch_sizes(costs: _cluster.MeasuredCosts, dp: int) -> list[int | None]:
    """None (the measured size), then measured x 2, x 4, ... while the batch splits."""
    out: list[int | None] = [None]
    mb = costs.microbatch_size * 2
    while costs.global_batch % (dp * mb) == 0:
        out.append(mb)
        mb *= 2
    return out


def _powers(limit: int) -> list[int]:
    out, x = [], 1
    while x <= limit:
        out.append(x)
        x *= 2
    return out
