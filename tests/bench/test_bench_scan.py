"""SPMD configurations with `-scan`: the GPT's blocks as one loop over stacked
parameters. The parameters are the unrolled model's values, stacked (so the bench gate's
reference loss holds), the FSDP step on 4 CPU devices equals the single-device jit step
of the unrolled model, and the compiled step gathers one layer's weights per loop
iteration (the unrolled step gathers outside any loop).
"""

import dataclasses

import jax
import numpy as np
import pytest
from bench_checks import assert_step_matches, compiled_collectives, single_device_step

from jaxpp._bench import _configs, _memory, _run

# lr 1e-3: Adam moves a weight whose gradient is near eps by up to lr (the step compares
# parameters to 1e-5); the gradients (Adam's mu) are compared tightly.
PROBLEM = _run.Problem(preset=_configs.PRESETS["tiny"], learning_rate=1e-3, seed=7)
SCAN = "spmd/fsdp4-scan/acc2/noremat"


def _unstack(tree):
    """A scanned GPT's parameter tree (or AdamW moment) in the unrolled model's form."""
    layers = tree["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != "layers"}
    out |= {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)}
    return out


def test_scan_configuration_name_round_trips_and_is_spmd_only():
    config = _configs.parse_config("spmd/fsdp4-scan/acc4/noremat@overlap")
    assert config.scan and config.fsdp and config.data == 4 and config.xla == "overlap"
    assert config.name == "spmd/fsdp4-scan/acc4/noremat@overlap"
    assert not _configs.parse_config("spmd/fsdp4/acc4/noremat").scan
    with pytest.raises(ValueError, match="bad jaxpp layout"):
        _configs.parse_config("jaxpp/zb-h1/pp4-scan/mb16/noremat")
    with pytest.raises(ValueError, match="bad SPMD layout"):
        _configs.parse_config("spmd/-scan/acc4/noremat")


def test_scan_parameters_are_the_unrolled_values_stacked():
    key = jax.random.key(PROBLEM.seed)
    unrolled = PROBLEM.init_params(key)
    scanned = dataclasses.replace(PROBLEM, scan_layers=True).init_params(key)
    assert "layers" in scanned and "layers_0" not in scanned
    for got, want in zip(
        jax.tree.leaves(_unstack(scanned)), jax.tree.leaves(unrolled), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_scan_fsdp_step_matches_the_single_device_unrolled_step():
    config = _configs.parse_config(SCAN)
    step, state, batch = _run.build(config, PROBLEM, attention="xla")
    assert state.params["layers"]["q"]["kernel"].sharding.spec[1] == "data"  # FSDP
    params_in = jax.tree.map(np.asarray, _unstack(state.params))
    new_state, loss = step(state, batch)
    gate = _run.reference_loss(PROBLEM, attention="xla")
    np.testing.assert_allclose(float(loss), gate, rtol=1e-4)  # the bench's gate
    ref_state, ref_loss = single_device_step(PROBLEM, config.accumulation)
    mu = new_state.opt_state[0].mu
    unrolled = new_state._replace(
        params=_unstack(new_state.params),
        opt_state=(new_state.opt_state[0]._replace(mu=_unstack(mu)), *new_state.opt_state[1:]),
    )
    assert_step_matches(unrolled, loss, ref_state, ref_loss, params_in)


def test_scan_fsdp_gathers_one_layer_per_loop_iteration():
    found = compiled_collectives("spmd/fsdp4-scan/acc1/noremat", PROBLEM)
    gathers = [c for c in found if c.kind == "all-gather"]
    in_loop = [s for c in gathers if c.in_loop for s in c.shapes]
    layers = PROBLEM.preset.num_layers
    assert in_loop, gathers  # the layer loop gathers its layer's weights...
    assert all(len(s) == 2 for s in in_loop), in_loop  # ...one layer's matrices...
    whole = [s for c in gathers for s in c.shapes if len(s) == 3 and s[0] == layers]
    assert not whole, whole  # ...never the whole stack
    unrolled = compiled_collectives("spmd/fsdp4/acc1/noremat", PROBLEM)
    assert not [c for c in unrolled if c.kind == "all-gather" and c.in_loop]


def test_scan_memory_estimate_gathers_two_layers_not_the_model():
    scan = _memory.estimate(_configs.parse_config("spmd/fsdp4-scan/acc4/noremat"), _P8B)
    unrolled = _memory.estimate(_configs.parse_config("spmd/fsdp4/acc4/noremat"), _P8B)
    assert scan.state == unrolled.state and scan.activations == unrolled.activations
    layer, total = _memory.layer_params(_P8B), _memory.total_params(_P8B)
    assert scan.weights == pytest.approx(2 * (2 * layer + total / 4))
    assert scan.weights < unrolled.weights / 3


_P8B = _configs.PRESETS["8b"]
