"""The example GPT: parameter and FLOP counts, causality, attention, loss, NNX == linen."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpp.models import gpt, gpt_nnx

CONFIGS = {
    "plain": dict(),
    "gqa-tied-layernorm": dict(num_kv_heads=2, tie_embeddings=True, norm="layer"),
    "scan-remat-gqa-tied-dff": dict(
        scan_layers=True, remat=True, num_kv_heads=1, tie_embeddings=True, d_ff=48
    ),
}


def _config(**overrides) -> gpt.GPTConfig:
    base = dict(vocab_size=16, num_layers=2, d_model=32, num_heads=4, max_seq_len=16)
    return gpt.GPTConfig(**(base | overrides))


def _abstract_params(config: gpt.GPTConfig):
    init = functools.partial(gpt.GPT(config).init, jax.random.key(0))
    return jax.eval_shape(init, jnp.zeros((1, 8), jnp.int32))["params"]


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_param_count_equals_initialised_tree(case):
    config = _config(**CONFIGS[case])
    params = _abstract_params(config)
    assert gpt.param_count(config) == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_matmul_param_count_equals_kernels_and_unembedding(case):
    config = _config(**CONFIGS[case])
    params = _abstract_params(config)
    kernels = [
        leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if jax.tree_util.keystr(path).endswith("['kernel']")
    ]
    unembedding = config.vocab_size * config.d_model if config.tie_embeddings else 0
    assert gpt.matmul_param_count(config) == sum(kernels) + unembedding


def test_train_flops_per_token_is_six_n_plus_attention():
    config = _config(num_layers=3)
    n = gpt.matmul_param_count(config)
    full = gpt.train_flops_per_token(config, 64, causal=False)
    assert full == 6 * n + 12 * 3 * 32 * 64
    assert gpt.train_flops_per_token(config, 64) == 6 * n + 6 * 3 * 32 * 64


def test_gpt_future_tokens_do_not_change_earlier_logits():
    model = gpt.GPT(_config(**CONFIGS["scan-remat-gqa-tied-dff"]))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 16)
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % 16)

    @jax.jit
    def both(key):
        params = model.init(key, tokens)
        return model.apply(params, tokens), model.apply(params, changed)

    before, after = both(jax.random.key(2))
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])


def test_attention_gqa_causal_matches_plain_reference():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 6, 4, 8), np.float32)
    k = rng.standard_normal((2, 6, 2, 8), np.float32)
    v = rng.standard_normal((2, 6, 2, 8), np.float32)
    k_full, v_full = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    logits = np.einsum("bqnh,bknh->bnqk", q, k_full) / np.sqrt(8)
    logits = np.where(np.tril(np.ones((6, 6), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bnqk,bknh->bqnh", weights, v_full)
    actual = jax.jit(functools.partial(gpt._attention, implementation="auto"))(q, k, v)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_cross_entropy_matches_log_softmax_reference():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 5, 7), np.float32)
    targets = rng.integers(0, 7, (2, 5))
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    actual = jax.jit(gpt.cross_entropy)(logits, targets)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_gpt_nnx_with_linen_params_gives_same_logits():
    config = _config(**CONFIGS["scan-remat-gqa-tied-dff"])
    tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, 16)
    linen = gpt.GPT(config)
    params = jax.jit(linen.init)(jax.random.key(7), tokens)["params"]
    model = gpt_nnx.GPT(config, rngs=nnx.Rngs(8))
    nnx_count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert nnx_count == gpt.param_count(config)
    gpt_nnx.from_linen_params(model, params)
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, params):
        return nnx.merge(graphdef, state)(tokens), linen.apply({"params": params}, tokens)

    actual, expected = both(state, params)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(d_model=30, num_heads=4), "not a multiple of num_heads=4.*Fix"),
        (dict(num_heads=4, num_kv_heads=3), "not a multiple of num_kv_heads=3.*Fix"),
        (dict(norm="batch"), "norm='batch'; expected one of"),
        (dict(num_layers=0), r"num_layers=0 must be >= 1"),
    ],
)
def test_gpt_config_bad_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_gpt_sequence_longer_than_max_seq_len_raises_with_fix():
    model = gpt.GPT(_config(max_seq_len=4))
    with pytest.raises(ValueError, match="exceeds max_seq_len=4.*Fix"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
