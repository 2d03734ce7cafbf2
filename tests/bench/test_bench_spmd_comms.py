"""SPMD layouts' communication: the collectives of the whole compiled train step (forward,
backward, AdamW, gradient accumulation as the bench runs it) on 4 CPU devices.

What each layout should need (benchmarks/README.md, "SPMD baselines: communication audit
(CPU)"): Megatron TP all-reduces the residual [b, T, d] (never q, k, v, the MLP's hidden
width or [b, T, vocab] logits); FSDP gathers weights and reduces gradients; DP reduces
gradients; no layout moves a whole microbatch of activations between its batch shards.
The CPU backend computes bf16 in f32, so shapes are compared, not dtypes.
"""

import dataclasses
import functools

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
    activations = [s for c in found for s in c.shapes if len(s) > 2 or s[:1] == (local,)]
    for shape in activations:  # Megatron: the residual, or per-token softmax terms
        assert shape[:2] == (local, PRESET.seq_len), shape
        assert shape[2:] in ((), (1,), (PRESET.d_model,)), f"{shape}: not the residual"
    if config.model == 1:
        assert not activations, activations  # DP and FSDP move weights and gradients only
    if config.data == 1:  # one batch shard: no gradient to reduce, only the residual
        assert len(activations) == sum(len(c.shapes) for c in found), found
    gathers = [s for c in found if c.kind == "all-gather" for s in c.shapes]
    if config.fsdp:
        assert gathers and all(len(s) == 2 for s in gathers), gathers  # weights only
    else:
        assert not gathers, gathers


@pytest.mark.xfail(
    strict=True,
    reason="the step reduces DP gradients in every microbatch (_run.make_step accumulates "
    "reduced gradients); XLA:GPU's while-loop-all-reduce-code-motion may sink it, the CPU does "
    "not. Fix: accumulate per-batch-shard gradients, reduce once after the loop",
)
def test_spmd_dp_reduces_gradients_once_per_step():
    weights = [c for c in _collectives("dp4") if c.kind == "all-reduce" and len(c.shapes) > 1]
    assert weights and not [c for c in weights if c.in_loop]
