"""Runs benchmark configurations: the same GPT train step under `jax.jit` with shardings
(SPMD) or `mpmd_jit_with_loop` (jaxpp), a correctness gate, then the timed steps.

The step (`make_step`) takes the batch already split into microbatches,
`tokens` [microbatches, microbatch_size, seq_len + 1], and accumulates gradients with
`jaxpp.treduce`: pipelined under jaxpp, a sequential loop (gradient accumulation) under
`jax.jit`. Every configuration starts from the same parameters (one key) and batch,
so its first-step loss must equal the single-device reference before its speed counts.
"""

import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp import _mpmd, schedules
from jaxpp._bench import _configs, _hlo, _phases, _spmd
from jaxpp._flax import _layout, _linen, _pipeline
from jaxpp._trainer import TrainState
from jaxpp._treduce import Add, Concat, treduce
from jaxpp.models import gpt

ACCUMULATE = ("scan", "treduce")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Batch = Mapping[str, jax.Array]


class CorrectnessError(ValueError):
    """A configuration's first-step loss differs from the single-device reference."""


class PredictedOOMError(RuntimeError):
    """A configuration predicted not to fit in device memory; it was not run."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """The model, optimizer, initial-state function and batch every configuration shares."""

    preset: _configs.ModelPreset
    learning_rate: float = 1e-4
    seed: int = 0
    # The GPT's blocks as one `nn.scan` over stacked parameters (`-scan` configurations);
    # `init_params` gives them the unrolled model's values, stacked.
    scan_layers: bool = False

    def model_config(self, *, remat: bool = False, attention: str = "auto") -> gpt.GPTConfig:
        """The GPT: compute in the preset's dtype, float32 parameters (master weights)."""
        p = self.preset
        return gpt.GPTConfig(
            vocab_size=p.vocab_size, num_layers=p.num_layers, d_model=p.d_model,
            num_heads=p.num_heads, num_kv_heads=p.num_kv_heads, d_ff=p.d_ff,
            max_seq_len=p.seq_len, dtype=DTYPES[p.dtype], param_dtype=jnp.float32,
            remat=remat, attention=attention, scan_layers=self.scan_layers,
        )  # fmt: skip

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW; its state is float32 like the parameters."""
        return optax.adamw(self.learning_rate, weight_decay=0.01)

    def tokens(self, num_microbatches: int) -> np.ndarray:
        """The step's tokens [num_microbatches, batch / num_microbatches, seq_len + 1]."""
        p = self.preset
        rng = np.random.default_rng(self.seed + 1)
        tokens = rng.integers(0, p.vocab_size, (p.global_batch, p.seq_len + 1), dtype=np.int32)
        return tokens.reshape(num_microbatches, p.global_batch // num_microbatches, -1)

    def init(self, key: jax.Array, shardings: Any = None) -> TrainState:
        """Initial parameters and AdamW state, the same for every configuration.

        Matrices are normal(0, 0.02) from `fold_in(key, leaf index)`, norm scales one and
        biases zero (fast to compile: one small program per distinct shape, where tracing
        flax's init of a large model takes many seconds). `shardings` is an optional tree
        of NamedShardings like `state_shardings` gives, to create each leaf in place.
        """
        shapes = self.shapes()
        if shardings is None:
            shardings = jax.tree.map(lambda _: None, shapes)
        params = self.init_params(key, shardings.params)
        places = {_devices(s) for s in jax.tree.leaves(shardings.params)}
        if len(places) > 1:  # leaves on different pipeline ranks: no one program makes all
            opt_state = self._zero_opt_state(shapes.opt_state, shardings.opt_state)
        else:
            opt_state = jax.jit(self.optimizer().init, out_shardings=shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
        return TrainState(step, params, opt_state)

    def _zero_opt_state(self, shapes: Any, shardings: Any) -> Any:
        """AdamW's initial state (count, mu and nu all zero), each leaf made in place."""
        probe = self.optimizer().init({"w": jnp.ones(3)})
        if any(np.any(np.asarray(x)) for x in jax.tree.leaves(probe)):
            raise ValueError(
                "the optimizer's initial state is not all zeros, so it cannot be made leaf "
                "by leaf on each pipeline rank. Fix: initialize it with optimizer.init on "
                "one set of devices (shardings on one mesh)."
            )
        return jax.tree.map(lambda s, p: jnp.zeros(s.shape, s.dtype, device=p), shapes, shardings)

    def init_params(self, key: jax.Array, shardings: Any = None) -> Any:
        """The initial parameters of `init`, each created with its sharding (or default).

        Leaf `i` of the unrolled model's tree is drawn from `fold_in(key, i)`; with
        `scan_layers`, the stacked leaf `layers/q/kernel` [L, ...] holds the unrolled
        `layers_0/q/kernel` ... `layers_{L-1}/q/kernel`, drawn from the same keys (so
        both models compute the same loss).
        """
        shapes = self.shapes().params
        if shardings is None:
            shardings = jax.tree.map(lambda _: None, shapes)
        leaves, tree = jax.tree.flatten_with_path(shapes)
        places = jax.tree.structure(shapes).flatten_up_to(shardings)
        unrolled = dataclasses.replace(self, scan_layers=False).shapes().params
        index = {_names(path): i for i, (path, _) in enumerate(jax.tree.leaves_with_path(unrolled))}
        stacked = self.preset.num_layers if self.scan_layers else None
        programs: dict = {}  # one compiled initializer per (shape, dtype, sharding)
        params = []
        for (path, leaf), place in zip(leaves, places, strict=True):
            names = _names(path)
            is_stack = stacked is not None and names[0] == "layers"
            if leaf.ndim == 1 + is_stack:  # norm scales one, biases zero
                value = jnp.ones if names[-1] == "scale" else jnp.zeros
                params.append(jax.device_put(value(leaf.shape, leaf.dtype), place))
                continue
            signature = (leaf.shape, jnp.dtype(leaf.dtype), place)
            if signature not in programs:
                if is_stack:
                    fn = functools.partial(_normal_stack, shape=leaf.shape[1:], dtype=leaf.dtype)
                else:
                    fn = functools.partial(_normal, shape=leaf.shape, dtype=leaf.dtype)
                programs[signature] = jax.jit(fn, out_shardings=place)
            if is_stack:
                rows = [index[(f"layers_{n}", *names[1:])] for n in range(stacked)]
                params.append(programs[signature](key, jnp.asarray(rows, jnp.uint32)))
            else:
                params.append(programs[signature](jax.random.fold_in(key, index[names])))
        return jax.tree.unflatten(tree, params)

    def _init_shapes(self) -> TrainState:
        model = gpt.GPT(self.model_config())
        tokens = jnp.zeros((1, self.preset.seq_len), jnp.int32)
        params = model.init(jax.random.key(0), tokens)["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer().init(params))

    def shapes(self) -> TrainState:
        """Shapes and dtypes of the train state (nothing computed)."""
        return jax.eval_shape(self._init_shapes)


def _devices(sharding: Any) -> frozenset | None:
    return None if sharding is None else frozenset(sharding.device_set)


def _normal(key: jax.Array, *, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return jax.random.normal(key, shape, dtype) * 0.02


def _normal_stack(
    key: jax.Array, indices: jax.Array, *, shape: tuple[int, ...], dtype: jnp.dtype
) -> jax.Array:
    """[len(indices), *shape]: row n is `_normal(fold_in(key, indices[n]))`."""
    return jax.vmap(lambda i: _normal(jax.random.fold_in(key, i), shape=shape, dtype=dtype))(
        indices
    )


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def make_step(
    model: gpt.ApplyModel,
    optimizer: optax.GradientTransformation,
    *,
    schedule: schedules.ScheduleBuilder,
    microbatch_sharding: NamedSharding | None = None,
    accumulate: str = "treduce",
    reduce_once: bool = False,
    grad_sharding: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, jax.Array]]:
    """The benchmarked train step: `treduce` of value-and-grad over microbatches, AdamW.

    With `reduce_once` (data parallelism, under SPMD or inside jaxpp's stages: parameters
    replicated over the batch axes, not FSDP), each batch shard accumulates its own
    gradients and they are summed over the shards once, after the loop: the microbatch
    [b, ...] is split into [shards, b / shards, ...] and `value_and_grad` is `vmap`ped
    over the shards with `spmd_axis_name` = the model's batch axes (the vmapped axis
    carries them; the model runs with its `ActivationSharding.batch_axes` off). The
    accumulator is
    [shards, *param] laid out over the batch axes: per device one copy of the (TP-sharded)
    parameters, as the replicated accumulator was (XLA's CPU memory estimate of dp4 and
    dp2-tp2 at acc2 is the same within 0.2%). The attention's `shard_map` runs under the
    vmap (`spmd_axis_name` adds the batch axes to its specs; the kernel is batched over a
    local shard axis of 1). Each shard's loss is its share's mean,
    so the gradient is the shards' sum / shards / microbatches: the same step. Without it
    (FSDP, TP only) the gradients of each microbatch are reduced inside the loop (FSDP:
    reduce-scatters, ZeRO-3); XLA:GPU may sink a DP all-reduce out of the loop, the CPU
    does not, and under jaxpp it cannot (each microbatch's backward is its own program).

    Args:
        model: the GPT, or its stage-marked form for jaxpp.
        optimizer: an optax transformation.
        schedule: the pipeline schedule (ignored under plain `jax.jit`).
        microbatch_sharding: under `jax.jit`, keeps each microbatch's batch axis split
            over the data axis inside the loop.
        accumulate: "treduce" (pipelined under jaxpp; under `jax.jit` an unrolled loop)
            or "scan" (`lax.scan`, for `jax.jit` only: one compiled body, the same sums
            in the same order).
        reduce_once: reduce gradients over the batch shards once per step (above); needs
            a `gpt.GPT` whose `activation_sharding` names the batch axes, or its
            `jaxpp.flax.pipeline` form (jaxpp: the accumulators [shards, *param] are
            `treduce`'s, on each rank's devices, summed over the shards after the loop).
            Under `jax.jit` with one microbatch it changes nothing.
        grad_sharding: under jaxpp, a tree of NamedShardings (on a rank's template
            mesh) each microbatch's gradients are constrained to: FSDP's parameter
            shardings, so each is reduced onto its shard and the accumulators stay
            sharded (left to XLA, they were whole on every device).

    Returns:
        `step(state, batch) -> (state, mean loss)` for `batch["tokens"]` [M, b, T + 1].

    Raises:
        ValueError: for an unknown `accumulate`, or `reduce_once` without the above.

    Example:
        >>> problem = Problem(preset=_configs.PRESETS["tiny"])
        >>> state = problem.shapes()
        >>> step = make_step(gpt.GPT(problem.model_config()), problem.optimizer(),
        ...                  schedule=schedules.Std1F1B(1))
        >>> batch = {"tokens": jnp.asarray(problem.tokens(2))}
        >>> jax.eval_shape(step, state, batch)[1].shape
        ()
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate={accumulate!r}; expected one of {ACCUMULATE}.")
    loss_fn = gpt.make_loss_fn(model)
    per_shard = _per_shard_grad_fn(model, accumulate, schedule) if reduce_once else None

    def pinned(loss: jax.Array, grads: Any) -> tuple[jax.Array, Any]:
        if grad_sharding is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_sharding)
        return loss, grads

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, jax.Array]:
        if microbatch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, microbatch_sharding)
        num_microbatches = batch["tokens"].shape[0]
        grad_fn = jax.value_and_grad(loss_fn)
        if per_shard is not None and num_microbatches > 1:
            grads, losses = per_shard(state.params, batch)
        elif accumulate == "scan":

            def body(total: Any, microbatch: Batch) -> tuple[Any, jax.Array]:
                loss, grads = grad_fn(state.params, microbatch)
                return jax.tree.map(jnp.add, total, grads), loss

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, losses = jax.lax.scan(body, zeros, batch)
        else:
            losses, grads = treduce(
                lambda mb: pinned(*grad_fn(state.params, mb)),
                batch,
                schedule=schedule,
                operation=(Concat(), Add()),
            )
        grads = jax.tree.map(lambda g: g / num_microbatches, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), jnp.mean(losses)

    return step


def _per_shard_grad_fn(
    model: gpt.ApplyModel, accumulate: str, schedule: schedules.ScheduleBuilder
) -> Callable[[Any, Batch], tuple[Any, jax.Array]]:
    """`(params, batch) -> (summed gradients, losses [M, shards])` for `reduce_once`: each
    batch shard's gradients accumulated in the loop (`lax.scan`, or jaxpp's `treduce` for
    a pipelined GPT), summed over the shards after it."""
    pipelined = isinstance(model, _linen.PipelinedModule)
    wrapped = model.module if pipelined else model
    sharding = getattr(getattr(wrapped, "config", None), "activation_sharding", None)
    loop = "treduce" if pipelined else "scan"
    if accumulate != loop or not isinstance(wrapped, gpt.GPT) or sharding is None:
        raise ValueError(
            f"reduce_once=True needs accumulate='scan' and a gpt.GPT, or accumulate="
            f"'treduce' and its jaxpp.flax.pipeline form, with activation_sharding naming "
            f"its batch axes (got accumulate={accumulate!r}, {type(model).__name__}, "
            f"activation_sharding={sharding}). Fix: pass reduce_once=False, or build the "
            f"model as jaxpp._bench._run.build does."
        )
    axes = sharding.batch_axes
    if not axes:
        raise ValueError(
            "reduce_once=True, but the model's activation_sharding has no batch axes to "
            "reduce over. Fix: pass reduce_once=False."
        )
    mesh = sharding.mesh
    shards = math.prod(mesh.shape[a] for a in axes)
    # Inside the vmap the vmapped (shard) axis carries the batch axes: spmd_axis_name
    # adds them in front of every sharding constraint and the attention's shard_map.
    inner: gpt.ApplyModel = gpt.GPT(
        dataclasses.replace(
            wrapped.config, activation_sharding=dataclasses.replace(sharding, batch_axes=())
        )
    )
    if pipelined:  # the same stages, around the per-shard GPT
        inner = dataclasses.replace(model, module=inner)
    grad_fn = jax.vmap(
        jax.value_and_grad(gpt.make_loss_fn(inner)), in_axes=(None, 0), spmd_axis_name=axes
    )

    def over_shards(x: jax.Array) -> jax.Array:  # leading axis over the batch axes
        spec = P(axes, *(P.UNCONSTRAINED,) * (x.ndim - 1))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def split(x: jax.Array, axis: int) -> jax.Array:
        # [..., b, ...] -> [..., shards, b / shards, ...], the shards over the batch axes
        if x.shape[axis] % shards:
            raise ValueError(
                f"microbatch of {x.shape[axis]} does not split over the {shards} batch "
                f"shards of mesh axes {axes}. Fix: a batch divisible by microbatches x "
                f"{shards}."
            )
        x = x.reshape(*x.shape[:axis], shards, x.shape[axis] // shards, *x.shape[axis + 1 :])
        spec = P(*(None,) * axis, axes)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def run(params: Any, batch: Batch) -> tuple[Any, jax.Array]:
        if pipelined:  # jaxpp: accumulators [shards, *param], in its pipeline loop

            def per_microbatch(microbatch: Batch) -> tuple[jax.Array, Any]:
                losses, grads = grad_fn(params, jax.tree.map(lambda x: split(x, 0), microbatch))
                return losses, jax.tree.map(over_shards, grads)

            losses, totals = treduce(
                per_microbatch, batch, schedule=schedule, operation=(Concat(), Add())
            )
        else:

            def body(total: Any, microbatch: Batch) -> tuple[Any, jax.Array]:
                losses, grads = grad_fn(params, microbatch)
                return jax.tree.map(lambda t, g: over_shards(t + g), total, grads), losses

            zeros = jax.tree.map(
                lambda p: over_shards(jnp.zeros((shards, *p.shape), p.dtype)), params
            )
            totals, losses = jax.lax.scan(body, zeros, jax.tree.map(lambda x: split(x, 1), batch))
        grads = jax.tree.map(lambda g: jnp.sum(g, axis=0) / shards, totals)  # one reduction
        return grads, losses

    return run


def reference_loss(problem: Problem, *, attention: str = "auto") -> float:
    """First-step loss on one device: the mean loss of the initial parameters on the batch
    (forward only, one microbatch at a time, so it fits where a full step would not).

    Example:
        >>> problem = Problem(preset=_configs.PRESETS["tiny"])
        >>> round(reference_loss(problem, attention="xla"), 1)  # ~ ln(64)  # doctest: +SKIP
        4.2
    """
    device = jax.devices()[0]
    loss_fn = gpt.make_loss_fn(gpt.GPT(problem.model_config(attention=attention)))
    tokens = jax.device_put(problem.tokens(problem.preset.global_batch), device)
    one = jax.sharding.SingleDeviceSharding(device)
    shapes = problem.shapes()
    params = problem.init_params(
        jax.random.key(problem.seed), jax.tree.map(lambda _: one, shapes.params)
    )

    @jax.jit
    def mean_loss(params: Any, tokens: jax.Array) -> jax.Array:
        losses = jax.lax.map(lambda t: loss_fn(params, {"tokens": t}), tokens)
        return jnp.mean(losses)

    return float(mean_loss(params, tokens))


def build(
    config: _configs.BenchConfig,
    problem: Problem,
    *,
    attention: str = "auto",
    accumulate: str = "scan",
) -> tuple[Callable, TrainState, Batch]:
    """The step function, initial state and batch of `config`, placed on its devices.

    Example:
        >>> problem = Problem(preset=_configs.PRESETS["tiny"])
        >>> config = _configs.parse_config("spmd/dp2/acc1/noremat")
        >>> step, state, batch = build(config, problem)  # doctest: +SKIP
        >>> batch["tokens"].shape  # doctest: +SKIP
        (1, 8, 17)
        >>> problem.tokens(config.accumulation).shape
        (1, 8, 17)
    """
    if config.scan:  # the same GPT, its blocks one loop over stacked parameters
        problem = dataclasses.replace(problem, scan_layers=True)
    model_config = problem.model_config(remat=config.remat, attention=attention)
    optimizer = problem.optimizer()
    devices = jax.devices()
    if len(devices) < config.num_devices:
        raise ValueError(
            f"{config.name} needs {config.num_devices} devices, but {len(devices)} are visible. "
            f"Fix: --devices {len(devices)}, or on a CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={config.num_devices}."
        )
    layout = _spmd.Layout(data=config.data, model=config.model, fsdp=config.fsdp)
    key = jax.random.key(problem.seed)
    if config.kind == _configs.SPMD:
        mesh = _spmd.make_mesh(layout, devices)
        # Activations pinned to the layout, and the attention kernel run per shard (a
        # Pallas call is opaque to XLA's partitioner, which would gather the batch).
        model_config = dataclasses.replace(
            model_config, activation_sharding=_spmd.activation_sharding(layout, mesh)
        )
        state_sharding = _spmd.state_shardings(problem.shapes(), layout, mesh)
        batch_sharding = {"tokens": NamedSharding(mesh, _spmd.batch_spec(layout))}
        state = problem.init(key, state_sharding)
        batch = jax.device_put({"tokens": problem.tokens(config.accumulation)}, batch_sharding)
        step = make_step(
            gpt.GPT(model_config),
            optimizer,
            schedule=schedules.Std1F1B(1),
            microbatch_sharding=batch_sharding,
            accumulate=accumulate,
            # DP: parameters replicated over "data", gradients reduced once per step.
            reduce_once=accumulate == "scan" and layout.data > 1 and not layout.fsdp,
        )
        jitted = jax.jit(
            step,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        return jitted, state, batch
    # jaxpp: ranks x data x model; specs over the in-stage axes only.
    grid = np.array(devices[: config.num_devices]).reshape(config.ranks, config.data, config.model)
    mesh = _mpmd.MpmdMesh(jax.sharding.Mesh(grid, ("stages", "data", "model")), "stages")
    builder = schedules.get_builder(config.schedule, config.num_stages, ranks=config.ranks)
    # Inside each rank's stages: DP (parameters replicated over "data") or FSDP (also
    # sharded over it), and Megatron TP over "model".
    inner = _spmd.Layout(data=config.data, model=config.model, fsdp=config.fsdp)
    template = mesh.rank_mesh(0)
    if config.data > 1 or config.model > 1:
        # As under SPMD, inside each stage: written against rank 0's mesh, the annotations
        # run on every rank's own devices (jaxpp moves them when it traces the rank's tasks).
        model_config = dataclasses.replace(
            model_config, activation_sharding=_spmd.activation_sharding(inner, template)
        )
    model = _pipeline.pipeline(gpt.GPT(model_config), num_stages=config.num_stages)
    shapes = problem.shapes()
    specs = (_spmd.state_specs(shapes, inner), {"tokens": _spmd.batch_spec(inner)})
    # On the first rank with its in-stage spec: where the executor places it (no host
    # copy), and what the compile-ahead of ranks of several devices assumes.
    batch = jax.device_put(
        {"tokens": problem.tokens(config.microbatches)},
        {"tokens": NamedSharding(template, specs[1]["tokens"])},
    )
    grad_sharding = None
    if config.fsdp and config.data > 1:
        grad_sharding = _spmd.state_shardings(shapes.params, inner, template)
    step = make_step(
        model,
        optimizer,
        schedule=builder,
        # DP: each batch shard accumulates its own gradients, reduced once after the loop.
        reduce_once=config.data > 1 and not config.fsdp,
        # FSDP: each microbatch's gradients reduced onto their shard (ZeRO-3).
        grad_sharding=grad_sharding,
    )
    placement = builder.build(config.microbatches).placement
    state = problem.init(key, _rank_shardings(shapes, specs[0], mesh, placement=placement))
    return _mpmd.mpmd_jit_with_loop(step, mpmd_mesh=mesh, in_shardings=specs), state, batch


def _rank_shardings(
    shapes: TrainState, specs: Any, mesh: _mpmd.MpmdMesh, *, placement: tuple[int, ...]
) -> Any:
    """Each state leaf's sharding where the pipelined step reads it: its in-stage spec on
    the mesh of the rank that holds its stage (layers split evenly as
    `jaxpp.flax.pipeline` splits them, the embedding in the first stage, the head in the
    last; scalars on the first stage's rank, the executor copies them to the others).
    Created spread over all devices instead, the state was held twice in the first step
    and moved device to device through the host (minutes at 8B).
    """
    num_layers = sum(1 for name in shapes.params if name.startswith("layers_"))
    sizes = _layout.even_layout(num_layers, len(placement)).stage_sizes
    stage_of = {
        f"layers_{i}": s for i, s in enumerate(s for s, n in enumerate(sizes) for _ in range(n))
    }
    stage_of |= {"embed": 0, "head": len(placement) - 1}

    def sharding(path: tuple, spec: P) -> NamedSharding:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        stage = next((stage_of[n] for n in names if n in stage_of), 0)
        return NamedSharding(mesh.rank_mesh(placement[stage]), spec)

    return jax.tree_util.tree_map_with_path(sharding, specs, is_leaf=lambda x: isinstance(x, P))


def run_config(
    config: _configs.BenchConfig,
    problem: Problem,
    *,
    reference: float,
    steps: int = 10,
    warmup: int = 2,
    matmul_tflops: float | None = None,
    attention: str = "auto",
    trace_path: str | pathlib.Path | None = None,
    accumulate: str = "scan",
    memory_limit: float | None = None,
    clock: _phases.PhaseClock | None = None,
) -> dict[str, Any]:
    """Builds, checks and times one configuration; returns its result row.

    SPMD steps are compiled first (`lower().compile()`) and the row records XLA's
    `memory_analysis()` (`xla_memory`) and its collectives (`collectives`: count and
    bytes per kind, in or out of the accumulation loop); if the memory exceeds
    `memory_limit` bytes the step is not run. Every row records the peak memory after
    the first step and at the end, and the bytes in use at the end, to calibrate
    `jaxpp._bench._memory`.

    SPMD gradient accumulation runs as `accumulate` ("scan" or "treduce"); jaxpp always
    pipelines `treduce`. For jaxpp the row adds the measured bubble, the simulator's
    bubble and step time fed with the measured per-stage task times (`costs`, also for
    the cluster what-if model), and `trace_path` receives the Chrome/Perfetto trace of
    one profiled step.

    `clock` times and prints the phases (init, compile or trace, first step, warm-up,
    steps, profile); the row's `phase_seconds` holds them. jaxpp compiles its task
    programs during the first step, so there that phase is "compile+first step"; with
    one-device ranks (any ranks with `JAXPP_PRECOMPILE=all`) it begins with the
    compile-ahead, phase "precompile", whose numbers (per rank, slowest program) go to
    the row's `precompile`.

    Raises:
        CorrectnessError: if its first-step loss differs from `reference`.
        PredictedOOMError: if XLA's memory estimate exceeds `memory_limit`.

    Example:
        >>> problem = Problem(preset=_configs.PRESETS["tiny"])
        >>> config = _configs.parse_config("spmd/tp2/acc1/noremat")
        >>> row = run_config(config, problem, reference=4.2)  # doctest: +SKIP
        >>> row["status"], row["tokens_per_s"] > 0  # doctest: +SKIP
        ('ok', True)
        >>> run_config(config, problem, reference=4.2, steps=0)
        Traceback (most recent call last):
        ValueError: steps=0, warmup=2: both must be >= 1.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps={steps}, warmup={warmup}: both must be >= 1.")
    if clock is None:
        clock = _phases.PhaseClock(config.name, origin=time.time(), stream=io.StringIO())
    with clock.phase("init"):
        step, state, batch = build(config, problem, attention=attention, accumulate=accumulate)
        jax.block_until_ready((state, batch))
    preset = problem.preset
    devices = jax.devices()[: config.num_devices]
    xla_memory = comms = None
    if config.kind == _configs.SPMD:  # compile once, read XLA's estimate before running
        with clock.phase("compile"), _phases.sampling(clock):
            step = step.lower(state, batch).compile()
        xla_memory = compiled_memory(step)
        comms = _hlo.summary(_hlo.collectives(step.as_text()))
        total = None if xla_memory is None else xla_memory["total_bytes"]
        if memory_limit is not None and total is not None and total > memory_limit:
            raise PredictedOOMError(
                f"predicted OOM (XLA's estimate after compiling): {total / 2**30:.1f} GiB > "
                f"{memory_limit / 2**30:.1f} GiB. Fix: remat, more accumulation steps, or more "
                f"sharding."
            )
        first = "first step"
    else:  # the jaxpp compiler (trace, task graph, plan); XLA compiles tasks on first use
        with clock.phase("trace"):
            step.compile(state, batch)
        first = "compile+first step"
    # jaxpp compiles its task programs ahead at the start of its first step: a phase of
    # its own inside it, with progress lines (`_phases.PrecompileReport`).
    watching = (
        _phases.PrecompileReport(clock).watching()
        if config.kind == _configs.JAXPP
        else contextlib.nullcontext()
    )
    with clock.phase(first), watching, _phases.sampling(clock):
        state, loss = step(state, batch)
        first_loss = float(loss)
    if config.kind == _configs.JAXPP:  # programs compiled ahead that the step did not use
        misses = getattr(step.last_compiled.executor, "precompile_misses", None)
        clock.details["precompile_misses"] = misses
        clock.say(f"precompile misses: {misses}")
    compile_seconds = sum(clock.seconds.get(p, 0.0) for p in ("compile", "trace", first))
    peak_first_step = peak_memory(devices)
    tolerance = 1e-4 if preset.dtype == "float32" else 2e-2
    if not np.isclose(first_loss, reference, rtol=tolerance, atol=0.0):
        raise CorrectnessError(
            f"{config.name}: first-step loss {first_loss:.6g} differs from the single-device "
            f"reference {reference:.6g} by more than {tolerance:g} (relative). Its speed is not "
            f"reported. Fix: the layout or schedule computes a different step; check its "
            f"shardings against jax.jit on one device, and rerun it with another "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION and without its XLA flag preset "
            f"(benchmarks/tp_loss_check.py): on a GPU the 8B TP4 step under @overlap came out "
            f"wrong at fraction 0.9 and right at 0.75, or at 0.9 without "
            f"--xla_gpu_enable_pipelined_all_reduce."
        )
    with clock.phase("warm-up"):
        for _ in range(warmup - 1):
            state, loss = step(state, batch)
        jax.block_until_ready((state, loss))
    seconds = []
    with clock.phase("steps"):
        for _ in range(steps):
            started = time.perf_counter()
            state, loss = step(state, batch)
            jax.block_until_ready((state, loss))
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    tokens = preset.global_batch * preset.seq_len
    flops = gpt.train_flops_per_token(problem.model_config(), preset.seq_len) * tokens / median
    row: dict[str, Any] = {
        "name": config.name,
        "kind": config.kind,
        "status": "ok",
        "first_loss": first_loss,
        "reference_loss": reference,
        "step_s": median,
        "step_s_all": seconds,
        "compile_and_first_step_s": compile_seconds,
        "tokens_per_s": tokens / median,
        "model_tflops_per_device": flops / config.num_devices / 1e12,
        "mfu": None if matmul_tflops is None else flops / config.num_devices / 1e12 / matmul_tflops,
        "peak_memory_bytes": peak_memory(devices),
        "peak_memory_after_first_step_bytes": peak_first_step,
        "memory_in_use_bytes": memory_in_use(devices),
        "xla_memory": xla_memory,
        "collectives": comms,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config),
        "accumulate": accumulate if config.kind == _configs.SPMD else "treduce",
    }
    if config.kind == _configs.JAXPP:
        with clock.phase("profile"):
            profile = step.profile(state, batch)
        row["measured_bubble"] = profile.bubble(median)
        row["simulated_bubble"] = profile.simulation.bubble
        row["predicted_step_s"] = profile.predicted_step_seconds
        row["costs"] = costs_dict(profile.costs)
        row["busy_seconds"] = list(profile.busy_seconds)
        row["outside_loop_seconds"] = profile.outside_loop_seconds
        if trace_path is not None:
            trace_path = pathlib.Path(trace_path)
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            trace_path.write_text(json.dumps(profile.chrome_trace()))
            row["trace"] = str(trace_path)
    row["phase_seconds"] = dict(clock.seconds)
    row.update(clock.details)  # "precompile": what compiling ahead did, per rank
    return row


def costs_dict(costs: schedules.Costs) -> dict[str, Any]:
    """Measured simulator costs as plain JSON data (stage keys become strings).

    Example:
        >>> costs_dict(schedules.Costs(per_stage={1: {"F": 2.0}}))["per_stage"]
        {'1': {'F': 2.0}}
    """
    names = ("forward", "backward", "input_grad", "weight_grad", "transfer")
    data: dict[str, Any] = {name: getattr(costs, name) for name in names}
    per_stage = costs.per_stage or {}
    data["per_stage"] = {
        str(stage): {str(kind): float(t) for kind, t in kinds.items()}
        for stage, kinds in per_stage.items()
    }
    return data


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory estimate of a compiled step per device, or None if the backend has none.

    `total_bytes` = arguments + outputs + temporaries - outputs aliased to (donated)
    arguments, the bytes the step needs at its peak.

    Example:
        >>> f = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
        >>> m = compiled_memory(f)
        >>> m is None or m["total_bytes"] >= 0
        True
    """
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if analysis is None:
        return None
    names = ("argument", "output", "temp", "alias", "generated_code")
    found = {f"{n}_bytes": int(getattr(analysis, f"{n}_size_in_bytes", 0) or 0) for n in names}
    found["total_bytes"] = (
        found["argument_bytes"] + found["output_bytes"] + found["temp_bytes"]
        - found["alias_bytes"]
    )  # fmt: skip
    return found


def memory_in_use(devices: list) -> int | None:
    """Largest `bytes_in_use` over `devices` now, or None where not reported (CPU).

    Example:
        >>> memory_in_use(jax.devices("cpu")[:1]) is None or True
        True
    """
    found = [s.get("bytes_in_use") for s in _memory_stats(devices)]
    found = [int(v) for v in found if v is not None]
    return max(found) if found else None


def memory_limit(devices: list) -> int | None:
    """The smallest `bytes_limit` (what JAX may allocate) over `devices`, or None (CPU).

    Example:
        >>> memory_limit(jax.devices("cpu")[:1]) is None or True
        True
    """
    found = [s.get("bytes_limit") for s in _memory_stats(devices)]
    found = [int(v) for v in found if v is not None]
    return min(found) if found else None


def _memory_stats(devices: list) -> list[dict]:
    stats = []
    for device in devices:
        found = device.memory_stats() if hasattr(device, "memory_stats") else None
        if found:
            stats.append(found)
    return stats


def peak_memory(devices: list) -> int | None:
    """Largest `peak_bytes_in_use` over `devices` (since the process started), or None
    where the backend does not report memory (CPU).

    Example:
        >>> peak_memory(jax.devices("cpu")[:1]) is None or True
        True
    """
    peaks = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
