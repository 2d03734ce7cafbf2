"""The GPT of `jaxpp.models.gpt` written with Flax NNX: same math, same parameter names.

`GPT(config, rngs=nnx.Rngs(0))(tokens)` gives float32 logits. With
`config.scan_layers` the blocks are one stacked `Block` (parameters with a leading
`num_layers` axis, built with `nnx.vmap`) run by `nnx.scan`.
`from_linen_params` loads a linen `GPT`'s parameters, which makes the two
implementations comparable number for number.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpp.models.gpt import GPTConfig, _attention

_INIT = nnx.initializers.normal(0.02)


def _norm(config: GPTConfig, rngs: nnx.Rngs) -> nnx.Module:
    cls = nnx.RMSNorm if config.norm == "rms" else nnx.LayerNorm
    return cls(config.d_model, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


def _linear(config: GPTConfig, width_in: int, width_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        width_in, width_out, use_bias=False, dtype=config.dtype,
        param_dtype=config.param_dtype, rngs=rngs,
    )  # fmt: skip


class Embed(nnx.Module):
    """Token plus learned position embedding: int tokens [B, T] -> [B, T, d_model]."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.tokens = nnx.Embed(
            config.vocab_size, config.d_model, dtype=config.dtype,
            param_dtype=config.param_dtype, embedding_init=_INIT, rngs=rngs,
        )  # fmt: skip
        shape = (config.max_seq_len, config.d_model)
        self.positions = nnx.Param(_INIT(rngs.params(), shape, config.param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        seq_len = tokens.shape[-1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len={self.config.max_seq_len}. "
                f"Fix: raise GPTConfig.max_seq_len or shorten the batch."
            )
        h = self.tokens(tokens) + self.positions[...][:seq_len].astype(self.config.dtype)
        return h.astype(self.config.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """Logits against the token embedding (tied unembedding)."""
        return self.tokens.attend(h)


class Block(nnx.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then + mlp(norm(h))."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        d, kv = config.d_model, config.num_kv_heads * config.head_dim
        self.attn_norm = _norm(config, rngs)
        self.q = _linear(config, d, config.num_heads * config.head_dim, rngs)
        self.k = _linear(config, d, kv, rngs)
        self.v = _linear(config, d, kv, rngs)
        self.out = _linear(config, d, d, rngs)
        self.mlp_norm = _norm(config, rngs)
        self.up = _linear(config, d, config.d_ff, rngs)
        self.down = _linear(config, config.d_ff, d, rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        if self.config.remat:
            return nnx.remat(Block._forward)(self, h)
        return self._forward(h)

    def _forward(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        batch, seq_len, _ = h.shape
        x = self.attn_norm(h)
        q = self.q(x).reshape(batch, seq_len, cfg.num_heads, cfg.head_dim)
        k = self.k(x).reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(x).reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
        attn = _attention(q, k, v, cfg.attention).reshape(batch, seq_len, cfg.d_model)
        h = h + self.out(attn)
        x = nnx.gelu(self.up(self.mlp_norm(h)))
        return h + self.down(x)


class Head(nnx.Module):
    """Final norm and unembedding: [B, T, d_model] -> float32 logits [B, T, vocab]."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.norm = _norm(config, rngs)
        if not config.tie_embeddings:
            self.unembed = _linear(config, config.d_model, config.vocab_size, rngs)

    def __call__(self, h: jax.Array, embed: Embed) -> jax.Array:
        h = self.norm(h)
        logits = embed.attend(h) if self.config.tie_embeddings else self.unembed(h)
        return logits.astype(jnp.float32)


class GPT(nnx.Module):
    """Decoder-only transformer: int tokens [B, T] -> float32 logits [B, T, vocab].

    Example:
        >>> cfg = GPTConfig(num_layers=2, d_model=16, num_heads=2, vocab_size=8)
        >>> model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # abstract; or build it
        >>> nnx.eval_shape(lambda m, t: m(t), model, jnp.zeros((1, 4), jnp.int32)).shape
        (1, 4, 8)
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.embed = Embed(config, rngs=rngs)
        if config.scan_layers:

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stack(rngs: nnx.Rngs) -> Block:
                return Block(config, rngs=rngs)

            self.layers = stack(rngs)
        else:
            self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.head = Head(config, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        if self.config.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(h: jax.Array, block: Block) -> jax.Array:
                return block(h)

            h = run(h, self.layers)
        else:
            for layer in self.layers:
                h = layer(h)
        return self.head(h, self.embed)


def from_linen_params(model: GPT, params: Mapping) -> None:
    """Loads the parameters of a linen `jaxpp.models.gpt.GPT` of the same config into `model`.

    Example:
        >>> from jaxpp.models import gpt
        >>> cfg = GPTConfig(num_layers=1, d_model=16, num_heads=2, vocab_size=8)
        >>> tokens = jnp.arange(4)[None]
        >>> params = jax.jit(gpt.GPT(cfg).init)(jax.random.key(0), tokens)["params"]
        >>> model = GPT(cfg, rngs=nnx.Rngs(1))
        >>> from_linen_params(model, params)
        >>> model.head.norm.scale is not None
        True
    """
    cfg = model.config
    model.embed.tokens.embedding[...] = params["embed"]["tokens"]["embedding"]
    model.embed.positions[...] = params["embed"]["positions"]
    blocks = (
        [(model.layers, params["layers"])]
        if cfg.scan_layers
        else [(model.layers[i], params[f"layers_{i}"]) for i in range(cfg.num_layers)]
    )
    for block, tree in blocks:
        for name in ("q", "k", "v", "out", "up", "down"):
            getattr(block, name).kernel[...] = tree[name]["kernel"]
        for name in ("attn_norm", "mlp_norm"):
            _load_norm(getattr(block, name), tree[name])
    _load_norm(model.head.norm, params["head"]["norm"])
    if not cfg.tie_embeddings:
        model.head.unembed.kernel[...] = params["head"]["unembed"]["kernel"]


def _load_norm(norm: nnx.Module, tree: Mapping) -> None:
    norm.scale[...] = tree["scale"]
    if "bias" in tree:
        norm.bias[...] = tree["bias"]
