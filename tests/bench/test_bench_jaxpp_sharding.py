"""jaxpp benchmark layouts with data or tensor parallelism inside a stage: the GPT's
activation annotations (written on rank 0's mesh) run on every rank, and the step still
equals the single-device jit step."""

import dataclasses

import jax
import numpy as np
import pytest
from bench_checks import (
    assert_step_matches,
    attention_shard_shape,
    record_attention,
    single_device_step,
)

from jaxpp._bench import _configs, _run

# Two layers: one per stage of pp2.
PRESET = dataclasses.replace(_configs.PRESETS["tiny"], num_layers=2)
PROBLEM = _run.Problem(preset=PRESET, learning_rate=1e-2, seed=5)


@pytest.mark.parametrize(
    "name",
    ["jaxpp/1f1b/pp2-tp2/mb2/noremat", "jaxpp/zb-h1/pp2-dp2/mb2/remat"],
)
def test_jaxpp_in_stage_layout_step_matches_single_device_jit(name, monkeypatch):
    config = _configs.parse_config(name)
    step, state, batch = _run.build(config, PROBLEM, attention="xla")
    params_in = jax.tree.map(np.asarray, state.params)
    ref_state, ref_loss = single_device_step(PROBLEM, config.microbatches)
    seen = record_attention(monkeypatch)
    new_state, loss = step(state, batch)
    shapes = [q for q, _, _ in seen]
    per_device = attention_shard_shape(PRESET, config)  # this device's shard
    assert shapes and set(shapes) == {per_device}, shapes
    assert_step_matches(new_state, loss, ref_state, ref_loss, params_in)
