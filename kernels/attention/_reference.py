"""The XLA implementation: plain einsum attention with a float32 softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float
) -> jax.Array:
    """Attention in BTNH layout through XLA; differentiable by autodiff.

    Logits and softmax are float32; the result has q's dtype. Causal masking is
    top-left aligned (query i sees keys j <= i), as in `jax.nn.dot_product_attention`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
        >>> xla_attention(x, x, x, causal=True, scale=0.35).shape
        (1, 4, 2, 8)
    """
    batch, t, num_heads, head_dim = q.shape
    s, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, t, num_kv_heads, group, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    if causal:
        keep = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
        logits = jnp.where(keep, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(batch, t, num_heads, head_dim).astype(q.dtype)
