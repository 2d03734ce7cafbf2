"""SPMD layouts of the benchmark: every layout's step equals the single-device jit step."""

import dataclasses

import jax
import numpy as np
import pytest
from bench_checks import assert_step_matches, record_attention, single_device_step

from jaxpp._bench import _configs, _run, _spmd
from jaxpp.models import gpt

# One layer keeps compiles short; the rules are per layer, so one is as good as forty.
PRESET = dataclasses.replace(_configs.PRESETS["tiny"], num_layers=1)


PROBLEM = _run.Problem(preset=PRESET, learning_rate=1e-2, seed=3)


@pytest.fixture(scope="module")
def reference_steps():
    """The single-device jit step per microbatch count, computed once per module."""
    cache = {}

    def get(num_microbatches: int):
        if num_microbatches not in cache:
            cache[num_microbatches] = single_device_step(PROBLEM, num_microbatches)
        return cache[num_microbatches]

    return get


@pytest.mark.parametrize(
    ("name", "accumulate"),
    [
        ("spmd/dp4/acc1/noremat", "scan"),
        ("spmd/fsdp4/acc1/noremat", "scan"),
        ("spmd/tp4/acc1/noremat", "scan"),
        ("spmd/dp4/acc2/noremat", "scan"),  # gradients reduced once, after the loop
        ("spmd/dp2-tp2/acc2/noremat", "treduce"),
        ("spmd/dp2-tp2/acc2/remat", "scan"),
        ("spmd/fsdp2-tp2/acc2/remat", "scan"),
    ],
)
def test_spmd_layout_step_matches_single_device_jit(name, accumulate, reference_steps):
    config = _configs.parse_config(name)
    step, state, batch = _run.build(config, PROBLEM, attention="xla", accumulate=accumulate)
    params_in = jax.tree.map(np.asarray, state.params)
    new_state, loss = step(state, batch)
    ref_state, ref_loss = reference_steps(config.accumulation)
    # The layout really is sharded as named (not silently replicated).
    kernel = new_state.params["layers_0"]["up"]["kernel"]
    expected = _spmd.param_spec(("layers_0", "up", "kernel"), kernel.shape, _layout(config))
    assert kernel.sharding.spec == expected
    assert_step_matches(new_state, loss, ref_state, ref_loss, params_in)


def _layout(config: _configs.BenchConfig) -> _spmd.Layout:
    return _spmd.Layout(data=config.data, model=config.model, fsdp=config.fsdp)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_sharding_rules_cover_every_gpt_parameter(scan_layers, norm):
    cfg = gpt.GPTConfig(
        num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, vocab_size=64, d_ff=64,
        scan_layers=scan_layers, norm=norm,
    )  # fmt: skip
    tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
    params = jax.eval_shape(gpt.GPT(cfg).init, jax.random.key(0), tokens)["params"]
    layout = _spmd.Layout(data=2, model=2, fsdp=True)
    specs = _spmd.state_specs({"params": params}, layout)
    flat = jax.tree_util.tree_flatten_with_path(specs["params"])[0]
    assert len(flat) == len(jax.tree.leaves(params))
    by_name = {jax.tree_util.keystr(path): spec for path, spec in flat}
    up = [s for k, s in by_name.items() if "'up'" in k][0]
    assert up[-2:] == ("data", "model")  # column parallel, FSDP on the rows
    down = [s for k, s in by_name.items() if "'down'" in k][0]
    assert down[-2:] == ("model", "data")  # row parallel
    if scan_layers:
        assert up[0] is None  # the stacked layer axis stays whole


def test_sharding_rules_unknown_parameter_raises():
    state = {"params": {"layers_0": {"gate": {"kernel": np.ones((4, 4))}}}}
    with pytest.raises(_spmd.UnknownParameterError, match="Fix: add its rule"):
        _spmd.state_specs(state, _spmd.Layout(model=2))
    with pytest.raises(_spmd.UnknownParameterError, match="layers_0/gate/kernel"):
        _spmd.state_specs(state, _spmd.Layout(model=2))


def test_make_step_reduce_once_without_batch_axes_raises():
    model = gpt.GPT(PROBLEM.model_config(attention="xla"))  # no activation_sharding
    with pytest.raises(ValueError, match="Fix: pass reduce_once=False"):
        _run.make_step(
            model, PROBLEM.optimizer(), schedule=None, accumulate="scan", reduce_once=True
        )
    with pytest.raises(ValueError, match="needs accumulate='scan'"):
        _run.make_step(model, PROBLEM.optimizer(), schedule=None, reduce_once=True)


def test_sharding_rules_indivisible_dimension_raises():
    with pytest.raises(ValueError, match="does not split over the 3 devices"):
        _spmd.param_spec(("layers_0", "up", "kernel"), (32, 64), _spmd.Layout(model=3))


def test_make_mesh_too_few_devices_raises():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
        _spmd.make_mesh(_spmd.Layout(data=16), jax.devices()[:8])


def test_run_config_loss_differs_from_reference_raises_before_timing(reference_steps):
    _, ref_loss = reference_steps(1)
    config = _configs.parse_config("spmd/dp4/acc1/noremat")
    wrong = float(ref_loss) * (1 + 1e-3)  # f32 gate is 1e-4 relative
    with pytest.raises(_run.CorrectnessError, match="differs from the single-device reference"):
        _run.run_config(config, PROBLEM, reference=wrong, steps=1, warmup=1, attention="xla")


@pytest.mark.parametrize(("preset", "num_devices"), [("2b", 2), ("8b", 4)])
def test_sharding_rules_fit_every_gpu_layout_of_the_presets(preset, num_devices):
    # Shapes only: catches an indivisible dimension before any GPU time is spent.
    shapes = _run.Problem(preset=_configs.PRESETS[preset]).shapes()
    configs = _configs.sweep(_configs.PRESETS[preset], num_devices, remat=(True,))
    layouts = {_layout(c) for c in configs}
    assert _spmd.Layout(data=num_devices, fsdp=True) in layouts
    for layout in layouts:
        specs = jax.tree.leaves(_spmd.state_specs(shapes, layout))
        assert len(specs) == len(jax.tree.leaves(shapes))


def test_spmd_attention_kernel_sees_only_its_shard(monkeypatch):
    """A Pallas kernel is opaque to XLA's partitioner: the SPMD step must hand it each
    device's batch and head shard (`attention_sharding`), not a gathered whole batch."""
    seen = record_attention(monkeypatch)
    layout = _spmd.Layout(data=2, model=2)
    mesh = _spmd.make_mesh(layout)
    sharding = _spmd.activation_sharding(layout, mesh)
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (4, 16, 4, 8)) for key in keys)
    got = jax.jit(lambda q, k, v: gpt._attention(q, k, v, "xla", sharding))(q, k, v)
    assert seen == [((2, 16, 2, 8),) * 3]  # batch 4 / data 2, heads 4 / model 2
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fsdp_gathers_weights_not_activations():
    """Under FSDP every device keeps its own batch shard: XLA gathers weights, never a
    whole microbatch of activations (which it did without `activation_sharding`)."""
    import re

    preset = dataclasses.replace(_configs.PRESETS["tiny"], dtype="bfloat16", num_layers=2)
    problem = _run.Problem(preset=preset)
    config = _configs.parse_config("spmd/fsdp4/acc2/noremat")
    step, state, batch = _run.build(config, problem, attention="xla", accumulate="scan")
    hlo = step.lower(state, batch).compile().as_text()
    microbatch = preset.global_batch // config.accumulation
    shapes = re.findall(r"\[([0-9,]+)\]\{[0-9,]*\} all-gather\(", hlo)
    assert shapes, "no all-gather at all: FSDP should gather its weights"
    # Whole-microbatch activations: [batch, seq, width] or [batch, seq, heads, head_dim]
    # (a [batch, seq, 1] of per-token loss terms is left to XLA: it is tiny).
    whole = [
        s
        for s in shapes
        if s.startswith(f"{microbatch},{preset.seq_len},") and not s.endswith(",1")
    ]
    assert not whole, f"activations gathered over the batch: {whole}"
