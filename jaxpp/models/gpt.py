"""A small decoder-only GPT in Flax linen: the example model jaxpp pipelines.

`GPT` = `Embed` (token + learned position embedding), `num_layers` pre-norm `Block`s
(causal GQA attention through `jaxpp.kernels.attention`, then a GELU MLP) and `Head`
(final norm + unembedding, optionally tied to the token embedding). With
`scan_layers=True` the blocks are one `nn.scan` over stacked parameters.

The helpers at the bottom give the next-token loss, the parameter count and the
analytic training FLOPs used by the throughput benchmark.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

NORMS = ("rms", "layer")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GPTConfig:
    """The shape and numerics of a `GPT`.

    Attributes:
        vocab_size: number of token ids.
        num_layers: number of transformer blocks.
        d_model: width of the residual stream.
        num_heads: query heads; `d_model` must be a multiple of it.
        num_kv_heads: key/value heads (GQA); `num_heads` must be a multiple of it.
        d_ff: hidden width of the MLP.
        max_seq_len: longest sequence the position embedding covers.
        tie_embeddings: unembed with the transposed token embedding.
        scan_layers: run the blocks as one `nn.scan` over stacked parameters.
        dtype: compute dtype of the activations.
        param_dtype: dtype of the parameters.
        remat: recompute each block's activations in the backward pass.
        norm: "rms" (RMSNorm) or "layer" (LayerNorm).
        attention: the `jaxpp.kernels.attention` implementation ("auto", "mosaic",
            "triton" or "xla").
        activation_sharding: under SPMD `jax.jit`, or inside jaxpp pipeline stages
            (written on a rank's template mesh, `MpmdMesh.rank_mesh(0)`; jaxpp moves it
            onto each rank's devices), how activations are laid out over the devices
            (`ActivationSharding`): the layers constrain them to it, and the attention
            kernel runs on each device's shard (`shard_map`). Without it XLA's propagation
            chooses per op (at 8B widths under FSDP it gathered whole microbatches of
            activations and all-reduced others), and a Pallas kernel, opaque to XLA's
            partitioner, runs on the whole batch on every device.

    Example:
        >>> GPTConfig(num_layers=2, d_model=32, num_heads=4).head_dim
        8
    """

    vocab_size: int = 64
    num_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 128
    tie_embeddings: bool = False
    scan_layers: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    norm: str = "rms"
    attention: str = "auto"
    activation_sharding: "ActivationSharding | None" = None

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be >= 1.")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"GPTConfig: d_model={self.d_model} is not a multiple of num_heads="
                f"{self.num_heads}. Fix: pick num_heads dividing d_model."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GPTConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads} (GQA groups query heads). Fix: pick num_kv_heads "
                f"dividing num_heads."
            )
        if self.norm not in NORMS:
            raise ValueError(f"GPTConfig.norm={self.norm!r}; expected one of {NORMS}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True, slots=True)
class ActivationSharding:
    """Activations over a mesh: batch over `batch_axes`; under tensor parallelism heads
    and the MLP's hidden width over `model_axis` (Megatron), the residual stream whole.

    Example:
        >>> import numpy as np
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        >>> ActivationSharding(mesh, batch_axes=("data",)).heads
        P('data', None, None, None)
    """

    mesh: jax.sharding.Mesh
    batch_axes: tuple[str, ...] = ()
    model_axis: str | None = None

    @property
    def residual(self) -> jax.sharding.PartitionSpec:
        """[B, T, d_model]: the residual stream, replicated over the model axis."""
        return jax.sharding.PartitionSpec(self.batch_axes or None, None, None)

    @property
    def hidden(self) -> jax.sharding.PartitionSpec:
        """[B, T, width]: a column-parallel projection's output (MLP hidden, logits)."""
        return jax.sharding.PartitionSpec(self.batch_axes or None, None, self.model_axis)

    @property
    def heads(self) -> jax.sharding.PartitionSpec:
        """[B, T, heads, head_dim]: q, k, v and the attention output."""
        return jax.sharding.PartitionSpec(self.batch_axes or None, None, self.model_axis, None)

    @property
    def vocab(self) -> jax.sharding.PartitionSpec:
        """[vocab, d_model]: the token embedding where the lookup reads it, vocab over the
        model axis (Megatron's vocab-parallel embedding), whole over the batch axes: under
        FSDP the table is gathered like every other weight, so the looked-up activations
        stay batch-sharded (left to itself, XLA gathered every microbatch's token ids, and
        under FSDP x TP the embedding's whole-microbatch output gradient)."""
        return jax.sharding.PartitionSpec(self.model_axis, None)

    def constrain(self, x: jax.Array, spec: jax.sharding.PartitionSpec) -> jax.Array:
        """`x` pinned to `spec` on this mesh."""
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))


def _constrain(x: jax.Array, sharding: "ActivationSharding | None", spec: str) -> jax.Array:
    return x if sharding is None else sharding.constrain(x, getattr(sharding, spec))


def _attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    implementation: str,
    sharding: ActivationSharding | None = None,
) -> jax.Array:
    """Causal attention, BTNH; the jaxpp kernel, per shard under `sharding`."""
    from jaxpp.kernels.attention import dot_product_attention

    def attend(q, k, v):
        return dot_product_attention(q, k, v, causal=True, implementation=implementation)

    if sharding is None:
        return attend(q, k, v)
    spec = sharding.heads
    return jax.shard_map(
        attend, mesh=sharding.mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
    )(q, k, v)


def _norm(config: GPTConfig, name: str | None = None) -> nn.Module:
    cls = nn.RMSNorm if config.norm == "rms" else nn.LayerNorm
    return cls(dtype=config.dtype, param_dtype=config.param_dtype, name=name)


class Embed(nn.Module):
    """Token plus learned position embedding: int tokens [B, T] -> [B, T, d_model]."""

    config: GPTConfig

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.tokens = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=init,
        )  # fmt: skip
        self.positions = self.param(
            "positions", init, (cfg.max_seq_len, cfg.d_model), cfg.param_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        seq_len = tokens.shape[-1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len={self.config.max_seq_len}. "
                f"Fix: raise GPTConfig.max_seq_len or shorten the batch."
            )
        sharding = self.config.activation_sharding
        # nn.Embed's lookup, on the table laid out for it (`ActivationSharding.vocab`).
        table = _constrain(self.tokens.embedding.astype(self.config.dtype), sharding, "vocab")
        h = jnp.take(table, tokens, axis=0) + self.positions[:seq_len].astype(self.config.dtype)
        return _constrain(h.astype(self.config.dtype), sharding, "residual")

    def attend(self, h: jax.Array) -> jax.Array:
        """Logits against the token embedding (tied unembedding)."""
        return self.tokens.attend(h)


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then + mlp(norm(h)).

    With `config.remat` the block recomputes its activations in the backward pass;
    the remat is applied inside `__call__`, so the block's call stays visible to
    `jaxpp.flax` interceptors (a `nn.remat(Block)` class would hide it).
    """

    config: GPTConfig

    def setup(self) -> None:
        cfg = self.config
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=False)
        kv_width = cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = _norm(cfg)
        self.q = nn.Dense(cfg.num_heads * cfg.head_dim, **dense)
        self.k = nn.Dense(kv_width, **dense)
        self.v = nn.Dense(kv_width, **dense)
        self.out = nn.Dense(cfg.d_model, **dense)
        self.mlp_norm = _norm(cfg)
        self.up = nn.Dense(cfg.d_ff, **dense)
        self.down = nn.Dense(cfg.d_model, **dense)

    def __call__(self, h: jax.Array) -> jax.Array:
        forward = nn.remat(Block._forward) if self.config.remat else Block._forward
        return forward(self, h)

    def _forward(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        sharding = cfg.activation_sharding
        batch, seq_len, _ = h.shape
        h = _constrain(h, sharding, "residual")
        x = self.attn_norm(h)
        q, k, v = (
            _constrain(proj(x).reshape(batch, seq_len, heads, cfg.head_dim), sharding, "heads")
            for proj, heads in ((self.q, cfg.num_heads), (self.k, cfg.num_kv_heads),
                                (self.v, cfg.num_kv_heads))
        )  # fmt: skip
        attn = _attention(q, k, v, cfg.attention, sharding)
        attn = attn.reshape(batch, seq_len, cfg.d_model)
        h = _constrain(h + self.out(attn), sharding, "residual")
        x = _constrain(nn.gelu(self.up(self.mlp_norm(h))), sharding, "hidden")
        return _constrain(h + self.down(x), sharding, "residual")


class _ScanBlock(Block):
    """`Block` in `nn.scan` form: (carry, None) -> (carry, None)."""

    def __call__(self, h: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        return super().__call__(h), None


class Head(nn.Module):
    """Final norm and unembedding: [B, T, d_model] -> float32 logits [B, T, vocab]."""

    config: GPTConfig

    @nn.compact
    def __call__(self, h: jax.Array, embed: Embed | None = None) -> jax.Array:
        cfg = self.config
        h = _norm(cfg, "norm")(_constrain(h, cfg.activation_sharding, "residual"))
        if cfg.tie_embeddings:
            if embed is None:
                raise ValueError("Head: tie_embeddings=True needs the Embed module as `embed`.")
            logits = embed.attend(h)
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                name="unembed",
            )(h)  # fmt: skip
        logits = _constrain(logits, cfg.activation_sharding, "hidden")  # vocab-parallel
        return logits.astype(jnp.float32)


class GPT(nn.Module):
    """Decoder-only transformer: int tokens [B, T] -> float32 logits [B, T, vocab].

    Example:
        >>> cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16)
        >>> model = GPT(cfg)
        >>> tokens = jnp.zeros((2, 8), jnp.int32)
        >>> params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        >>> jax.eval_shape(model.apply, {"params": params}, tokens).shape  # or run them
        (2, 8, 16)
        >>> sorted(params)
        ['embed', 'head', 'layers_0', 'layers_1']
    """

    config: GPTConfig

    def setup(self) -> None:
        cfg = self.config
        self.embed = Embed(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                _ScanBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=cfg.num_layers,
            )(cfg)
        else:
            self.layers = [Block(cfg) for _ in range(cfg.num_layers)]
        self.head = Head(cfg)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        if self.config.scan_layers:
            h, _ = self.layers(h, None)
        else:
            for layer in self.layers:
                h = layer(h)
        return self.head(h, self.embed)


class ApplyModel(Protocol):
    """Anything with linen's `apply(variables, *args)` (a `GPT` or its pipelined form)."""

    def apply(self, variables: Mapping, *args: jax.Array) -> jax.Array: ...


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats over all positions.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))
        >>> round(float(cross_entropy(logits, jnp.array([[0, 1, 2]]))), 4)  # ln 4
        1.3863
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return losses.mean()


def make_loss_fn(model: ApplyModel) -> Callable[[Mapping, Mapping[str, jax.Array]], jax.Array]:
    """`loss_fn(params, batch)`: next-token cross-entropy of `batch["tokens"]` [B, T+1].

    The model reads tokens[:, :-1] and predicts tokens[:, 1:].

    Example:
        >>> cfg = GPTConfig(num_layers=1, d_model=16, num_heads=2, vocab_size=8)
        >>> model = GPT(cfg)
        >>> batch = {"tokens": jnp.ones((2, 5), jnp.int32)}
        >>> params = jax.eval_shape(model.init, jax.random.key(0), batch["tokens"][:, :-1])
        >>> jax.eval_shape(make_loss_fn(model), params["params"], batch).shape
        ()
    """

    def loss_fn(params: Mapping, batch: Mapping[str, jax.Array]) -> jax.Array:
        tokens = batch["tokens"]
        logits = model.apply({"params": params}, tokens[..., :-1])
        return cross_entropy(logits, tokens[..., 1:])

    return loss_fn


def param_count(config: GPTConfig) -> int:
    """Number of parameters of `GPT(config)` (analytic; equals the initialised tree).

    Example:
        >>> param_count(GPTConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16))
        29856
    """
    d, kv = config.d_model, config.num_kv_heads * config.head_dim
    norm = d if config.norm == "rms" else 2 * d
    attention = d * d + 2 * d * kv + d * d
    block = 2 * norm + attention + 2 * d * config.d_ff
    embed = config.vocab_size * d + config.max_seq_len * d
    head = norm + (0 if config.tie_embeddings else d * config.vocab_size)
    return embed + config.num_layers * block + head


def matmul_param_count(config: GPTConfig) -> int:
    """Parameters used in matmuls per token: blocks' projections and the unembedding.

    Embedding lookups and norms are excluded; this is the `N` of the `6 * N` FLOPs rule.

    Example:
        >>> matmul_param_count(GPTConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16))
        25088
    """
    d, kv = config.d_model, config.num_kv_heads * config.head_dim
    block = 2 * d * d + 2 * d * kv + 2 * d * config.d_ff
    return config.num_layers * block + d * config.vocab_size


def train_flops_per_token(config: GPTConfig, seq_len: int, *, causal: bool = True) -> float:
    """Analytic training FLOPs per token: `6 * N + attention` (forward + backward).

    `N` is `matmul_param_count`; attention adds the two [T, T] matmuls per layer,
    `12 * num_layers * d_model * seq_len` per token (forward 4, backward 8), halved
    when `causal` (only the lower triangle is needed).

    Example:
        >>> cfg = GPTConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16)
        >>> train_flops_per_token(cfg, 16, causal=False)
        162816.0
    """
    attention = 12.0 * config.num_layers * config.d_model * seq_len
    if causal:
        attention /= 2
    return 6.0 * matmul_param_count(config) + attention
