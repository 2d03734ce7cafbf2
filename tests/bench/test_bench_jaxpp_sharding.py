"""jaxpp benchmark layouts with data or tensor parallelism inside a stage: the GPT's
activation annotations (written on rank 0's mesh) run on every rank, and the step still
equals the single-device jit step."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxpp import schedules
from jaxpp._bench import _configs, _run
from jaxpp.models import gpt

# Two layers: one per stage of pp2.
PRESET = dataclasses.replace(_configs.PRESETS["tiny"], num_layers=2)
PROBLEM = _run.Problem(preset=PRESET, learning_rate=1e-2, seed=5)


def _single_device_step(num_microbatches: int):
    device = jax.devices()[0]
    one = jax.sharding.SingleDeviceSharding(device)
    state = PROBLEM.init(
        jax.random.key(PROBLEM.seed), jax.tree.map(lambda _: one, PROBLEM.shapes())
    )
    batch = jax.device_put({"tokens": PROBLEM.tokens(num_microbatches)}, device)
    model = gpt.GPT(PROBLEM.model_config(attention="xla"))
    step = _run.make_step(model, PROBLEM.optimizer(), schedule=schedules.Std1F1B(1))
    return jax.jit(step)(state, batch)


@pytest.mark.parametrize(
    "name",
    ["jaxpp/1f1b/pp2-tp2/mb2/noremat", "jaxpp/zb-h1/pp2-dp2/mb2/remat"],
)
def test_jaxpp_in_stage_layout_step_matches_single_device_jit(name, monkeypatch):
    import jaxpp.kernels.attention as attention

    shapes = []

    def recording(q, k, v, **kwargs):
        shapes.append(q.shape)
        return jax.nn.dot_product_attention(q, k, v, is_causal=kwargs["causal"])

    config = _configs.parse_config(name)
    step, state, batch = _run.build(config, PROBLEM, attention="xla")
    params_in = jax.tree.map(np.asarray, state.params)
    ref_state, ref_loss = _single_device_step(config.microbatches)
    monkeypatch.setattr(attention, "dot_product_attention", recording)
    new_state, loss = step(state, batch)
    # The kernel sees each device's shard: [batch / data, seq, heads / model, head_dim].
    microbatch = PRESET.global_batch // config.microbatches
    per_device = (
        microbatch // config.data,
        PRESET.seq_len,
        PRESET.num_heads // config.model,
        PRESET.d_model // PRESET.num_heads,
    )
    assert shapes and set(shapes) == {per_device}, shapes
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for got, want, before in zip(
        jax.tree.leaves(new_state.params),
        jax.tree.leaves(ref_state.params),
        jax.tree.leaves(params_in),
        strict=True,
    ):
        # Adam moves each weight by ~lr * sign(g): weights with |g| near eps may differ
        # by a fraction of lr; the gradients themselves are checked tightly below.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        assert not np.array_equal(np.asarray(want), before)  # the step moved every parameter
    mu = jax.tree.leaves(new_state.opt_state[0].mu)  # 0.1 * gradient: the gradients agree
    ref_mu = jax.tree.leaves(ref_state.opt_state[0].mu)
    for got, want in zip(mu, ref_mu, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=1e-8)
