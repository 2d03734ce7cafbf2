"""Checks shared by the benchmark's layout tests (SPMD and jaxpp in-stage layouts)."""

import jax
import numpy as np

from jaxpp import schedules
from jaxpp._bench import _configs, _hlo, _run
from jaxpp.models import gpt


def single_device_step(problem: _run.Problem, num_microbatches: int):
    """The reference: the same train step under `jax.jit` on one device."""
    device = jax.devices()[0]
    one = jax.sharding.SingleDeviceSharding(device)
    state = problem.init(
        jax.random.key(problem.seed), jax.tree.map(lambda _: one, problem.shapes())
    )
    batch = jax.device_put({"tokens": problem.tokens(num_microbatches)}, device)
    model = gpt.GPT(problem.model_config(attention="xla"))
    step = _run.make_step(model, problem.optimizer(), schedule=schedules.Std1F1B(1))
    return jax.jit(step)(state, batch)


def assert_step_matches(new_state, loss, ref_state, ref_loss, params_in) -> None:
    """Loss, parameters and Adam's first moment equal the reference step's, and the step
    moved every parameter away from `params_in`."""
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


def record_attention(monkeypatch) -> list:
    """Replaces the attention kernel by XLA's, recording the (q, k, v) shapes it is given."""
    import jaxpp.kernels.attention as attention

    seen = []

    def recording(q, k, v, **kwargs):
        seen.append((q.shape, k.shape, v.shape))
        return jax.nn.dot_product_attention(q, k, v, is_causal=kwargs["causal"])

    monkeypatch.setattr(attention, "dot_product_attention", recording)
    return seen


def attention_shard_shape(preset: _configs.ModelPreset, config: _configs.BenchConfig) -> tuple:
    """The q block one device's attention kernel sees.

    [batch / data, seq, heads / model, head_dim].
    """
    microbatch = preset.global_batch // config.microbatches
    return (
        microbatch // config.data,
        preset.seq_len,
        preset.num_heads // config.model,
        preset.d_model // preset.num_heads,
    )


def compiled_collectives(name: str, problem: _run.Problem, accumulate: str = "scan"):
    """The collectives of configuration `name`'s whole train step, compiled for its devices."""
    config = _configs.parse_config(name)
    step, state, batch = _run.build(config, problem, attention="xla", accumulate=accumulate)
    return _hlo.collectives(step.lower(state, batch).compile().as_text())
