"""jaxpp stages with data, FSDP or tensor parallelism inside (pp2 x dp2 / fsdp2 / tp2 on
4 CPU devices): the attention kernel runs on each device's batch/head shard on every
rank, the step equals the single-device jit step, and the compiled stage programs move
weights and gradients (DP: once per step, after the loop) or Megatron's residual, never
whole microbatches of activations.

Each configuration runs one step; its task programs are compiled where the executor
would compile them, and their HLO kept. The CPU computes bf16 in f32 and turns a
reduce-scatter into an all-reduce and a slice (XLA:GPU fuses them back), so shapes are
compared, not dtypes or reduce-scatters.
"""

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest
from bench_checks import (
    assert_step_matches,
    attention_shard_shape,
    record_attention,
    single_device_step,
)

from jaxpp._bench import _configs, _hlo, _run
from jaxpp.runtime import _local

# Two layers: one per stage of pp2.
PRESET = dataclasses.replace(_configs.PRESETS["tiny"], num_layers=2)
PROBLEM = _run.Problem(preset=PRESET, learning_rate=1e-2, seed=5)
DP = "jaxpp/zb-h1/pp2-dp2/mb2/noremat"
FSDP = "jaxpp/1f1b/pp2-fsdp2/mb2/remat"
TP = "jaxpp/zb-h1/pp2-tp2/mb2/noremat"
NAMES = (DP, FSDP, TP)


@dataclasses.dataclass(frozen=True)
class _Program:
    """One task program as a rank ran it."""

    task: str
    rank: int
    in_loop: bool  # runs once per microbatch
    compiled: jax.stages.Compiled

    @functools.cached_property
    def collectives(self) -> tuple[_hlo.Collective, ...]:
        return tuple(_hlo.collectives(self.compiled.as_text()))


@dataclasses.dataclass(frozen=True)
class _Step:
    params_in: object
    state: object
    loss: float
    attention: tuple  # the (q, k, v) shapes the kernel was given
    programs: tuple[_Program, ...]


@functools.cache
def _step(name: str) -> _Step:
    config = _configs.parse_config(name)
    programs = []
    make_jit = _local.LocalExecutor._make_jit

    def compiling(self, task, rank):  # compiles as the executor does, keeping the program
        jitted = make_jit(self, task, rank)

        def call(*args):
            compiled = jitted.lower(*args).compile()
            programs.append(_Program(task.name, rank, task.stage is not None, compiled))
            return compiled(*args)

        return call

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_local.LocalExecutor, "_make_jit", compiling)
        step, state, batch = _run.build(config, PROBLEM, attention="xla")
        # From here on: the step's traces (DP runs the model vmapped over its batch
        # shards, one per device: the kernel's q then reads [b / data, ...] per shard).
        seen = record_attention(patch)
        params_in = jax.tree.map(np.asarray, state.params)
        new_state, loss = step(state, batch)
    shapes = tuple(q for q, _, _ in seen)
    return _Step(params_in, new_state, float(loss), shapes, tuple(programs))


@functools.cache
def _reference(num_microbatches: int):
    return single_device_step(PROBLEM, num_microbatches), _run.reference_loss(
        PROBLEM, attention="xla"
    )


@pytest.mark.parametrize("name", NAMES)
def test_stage_layout_attention_per_shard_and_step_matches_reference(name):
    config = _configs.parse_config(name)
    got = _step(name)
    per_device = attention_shard_shape(PRESET, config)  # this device's shard
    assert got.attention and set(got.attention) == {per_device}, got.attention
    (ref_state, ref_loss), gate = _reference(config.microbatches)
    # The bench's gate (float32: 1e-4), then the whole step against jax.jit on one device.
    np.testing.assert_allclose(got.loss, gate, rtol=1e-4)
    assert_step_matches(got.state, got.loss, ref_state, ref_loss, got.params_in)


@pytest.mark.parametrize("name", NAMES)
def test_stage_programs_move_no_whole_microbatch(name):
    config = _configs.parse_config(name)
    programs = _step(name).programs
    assert {p.rank for p in programs} == {0, 1}
    found = [(p, c) for p in programs for c in p.collectives]
    moved = [(p.task, c) for p, c in found if c.kind in ("all-to-all", "collective-permute")]
    assert not moved, moved
    microbatch = PRESET.global_batch // config.microbatches
    local = microbatch // config.data
    shapes = [(p.task, s) for p, c in found for s in c.shapes]
    if config.data > 1:
        whole = [(t, s) for t, s in shapes if s[:1] == (microbatch,) and len(s) > 1]
        assert not whole, f"whole microbatches moved: {whole}"
    activations = [(t, s) for t, s in shapes if len(s) > 2 or s[:1] == (local,)]
    for task, shape in activations:  # Megatron: the residual, or per-token softmax terms
        assert shape[:2] == (local, PRESET.seq_len), (task, shape)
        assert shape[2:] in ((), (1,), (PRESET.d_model,)), f"{task} {shape}: not the residual"
    if config.model == 1:
        assert not activations, activations  # DP and FSDP move weights and gradients only
    gathers = [(p.task, s) for p, c in found if c.kind == "all-gather" for s in c.shapes]
    if config.fsdp:
        assert gathers and all(len(s) == 2 for _, s in gathers), gathers  # weights only
    else:
        assert not gathers, gathers


def _grad_shapes(rank_programs) -> list[tuple[int, ...]]:
    return sorted(s for p in rank_programs for c in p.collectives for s in c.shapes if s)


def test_stage_dp_reduces_gradients_once_per_step():
    # Parameters replicated over "data": each batch shard accumulates its own gradients
    # in the pipeline loop; they are all-reduced once, after it (they were in every
    # microbatch's backward). No collective runs per microbatch.
    programs = _step(DP).programs
    in_loop = [(p.task, c.kind) for p in programs if p.in_loop for c in p.collectives]
    assert not in_loop, in_loop
    after = [c for p in programs if not p.in_loop for c in p.collectives]
    assert after and {c.kind for c in after} == {"all-reduce"}, after
    num_params = len(jax.tree.leaves(PROBLEM.shapes().params))
    grads = [s for c in after for s in c.shapes if s]  # and () the mean loss
    assert len(grads) == num_params, after


def test_stage_fsdp_keeps_gradients_sharded():
    # ZeRO-3 inside a stage: each microbatch's gradients are reduced onto their shard in
    # the loop, and the accumulators (the loop tasks' outputs) are sharded like the
    # parameters: half of every matrix per device (left to XLA, they were whole).
    programs = _step(FSDP).programs
    grads = [p for p in programs if p.in_loop and p.task.endswith(("/B", "/W"))]
    assert grads and all(any(c.kind == "all-reduce" for c in p.collectives) for p in grads)
    for program in grads:
        for sharding, out in zip(
            jax.tree.leaves(program.compiled.output_shardings),
            jax.tree.leaves(program.compiled.out_info),
            strict=True,
        ):
            if len(out.shape) == 2:  # a matrix's gradient accumulator
                local = sharding.shard_shape(out.shape)
                assert math.prod(local) * 2 == math.prod(out.shape), (program.task, sharding)


@pytest.mark.parametrize(
    "name, num_layers",
    [(DP, 2), ("jaxpp/zbv/pp2-tp2/mb2/noremat", 4), ("jaxpp/dualpipev/pp2-fsdp2/mb4/remat", 4)],
)
def test_stage_layout_state_starts_where_the_pipeline_reads_it(name, num_layers):
    # Each leaf is made on the rank whose stage reads it, with its in-stage spec: the
    # first step moves none of it (scalars read by every rank sit on the first stage's).
    problem = dataclasses.replace(
        PROBLEM, preset=dataclasses.replace(PRESET, num_layers=num_layers)
    )
    step, state, batch = _run.build(_configs.parse_config(name), problem, attention="xla")
    compiled = step.compile(state, batch)  # traces only
    leaves = jax.tree.leaves(state)
    names = compiled.graph.step_inputs[: len(leaves)]
    executor = compiled.executor
    for leaf, value in zip(leaves, names, strict=True):
        rank = min(compiled.plan.input_ranks[value])
        # Where the executor places a step input (no move when it is there already).
        target = executor._sharding_on(leaf, rank, executor.input_specs.get(value))
        assert leaf.sharding == target, (value, leaf.sharding, target)
