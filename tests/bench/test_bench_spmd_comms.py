"""SPMD layouts' communication: the collectives of the whole compiled train step (forward,
backward, AdamW, gradient accumulation as the bench runs it) on 4 CPU devices.

What each layout should need (benchmarks/README.md, "SPMD baselines: communication audit
(CPU)"): Megatron TP all-reduces the residual [b, T, d] (never q, k, v, the MLP's hidden
width or [b, T, vocab] logits); FSDP gathers weights and reduces gradients; DP reduces
gradients, once per step (each batch shard accumulates its own: `_run.make_step`'s
`reduce_once`); no layout moves a whole microbatch of activations between its batch
shards. The CPU backend computes bf16 in f32, so shapes are compared, not dtypes.
"""

import dataclasses
import functools

import jax
import pytest
from bench_checks import compiled_collectives

from jaxpp._bench import _configs, _run

PRESET = dataclasses.replace(_configs.PRESETS["tiny"], dtype="bfloat16", num_layers=2)
PROBLEM = _run.Problem(preset=PRESET)
ACCUMULATION = 2
LAYOUTS = ("dp4", "fsdp4", "tp4", "dp2-tp2", "fsdp2-tp2")


@functools.cache
def _collectives(layout: str) -> tuple:
    return tuple(compiled_collectives(f"spmd/{layout}/acc{ACCUMULATION}/noremat", PROBLEM))


def _per_device(shape: tuple[int, ...], op_name: str) -> tuple[int, ...]:
    # DP layouts run the model vmapped over the batch shards (`reduce_once`): one shard
    # per device, so its activations carry a leading shard axis of 1.
    if "vmap(" in op_name:
        assert shape[:1] == (1,), f"{shape} of {op_name}: not one shard per device"
        return shape[1:]
    return shape


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spmd_layout_attention_backward_adds_no_psum(layout):
    # The attention's shard_map names every mesh axis, size 1 included: an axis left out
    # got a psum of q, k, v's cotangents per layer and microbatch (over one device).
    psums = [c for c in _collectives(layout) if "shard_map/psum" in c.op_name]
    assert not psums, psums


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spmd_layout_moves_no_whole_microbatch(layout):
    config = _configs.parse_config(f"spmd/{layout}/acc1/noremat")
    found = _collectives(layout)
    microbatch = PRESET.global_batch // ACCUMULATION
    local = microbatch // config.data
    # No resharding of activations between batch shards (the embedding lookup under FSDP
    # did: token ids gathered, all-to-alls, a whole-microbatch gradient gathered).
    moved = [c for c in found if c.kind in ("all-to-all", "collective-permute")]
    assert not moved, moved
    if config.data > 1:
        whole = [c for c in found if any(s[:1] == (microbatch,) and len(s) > 1 for s in c.shapes)]
        assert not whole, f"whole microbatches moved: {whole}"
    shapes = [_per_device(s, c.op_name) for c in found for s in c.shapes]
    activations = [s for s in shapes if len(s) > 2 or s[:1] == (local,)]
    for shape in activations:  # Megatron: the residual, or per-token softmax terms
        assert shape[:2] == (local, PRESET.seq_len), shape
        assert shape[2:] in ((), (1,), (PRESET.d_model,)), f"{shape}: not the residual"
    if config.model == 1:
        assert not activations, activations  # DP and FSDP move weights and gradients only
    if config.data == 1:  # one batch shard: no gradient to reduce, only the residual
        assert len(activations) == len(shapes), found
    gathers = [s for c in found if c.kind == "all-gather" for s in c.shapes]
    if config.fsdp:
        assert gathers and all(len(s) == 2 for s in gathers), gathers  # weights only
    else:
        assert not gathers, gathers


@pytest.mark.parametrize("layout", ("dp4", "dp2-tp2"))
def test_spmd_dp_reduces_gradients_once_per_step(layout):
    # Parameters replicated over "data": every gradient is all-reduced once, after the
    # accumulation loop (it was in every microbatch); in the loop only TP's activations.
    found = _collectives(layout)
    after = [c for c in found if not c.in_loop]
    assert after and all(c.kind == "all-reduce" for c in after), after
    num_params = len(jax.tree.leaves(PROBLEM.shapes().params))
    grads = [s for c in after for s in c.shapes if s]  # and () the mean loss
    assert len(grads) == num_params, after
    data = _configs.parse_config(f"spmd/{layout}/acc1/noremat").data
    local = PRESET.global_batch // ACCUMULATION // data
    in_loop = [_per_device(s, c.op_name) for c in found if c.in_loop for s in c.shapes]
    assert all(s[:2] == (local, PRESET.seq_len) for s in in_loop), in_loop
