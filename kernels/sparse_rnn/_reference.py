"""The plain reference: a dense masked recurrence in float32 with `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpp.kernels.sparse_rnn import _cells


def sparse_rnn_reference(
    x_proj: jax.Array,
    h0: jax.Array,
    w_dense: jax.Array,
    *,
    cell: str,
    c0: jax.Array | None = None,
) -> jax.Array:
    """All hidden states of a recurrence with a dense (pruned, zero-filled) matrix.

    Args:
        x_proj: `(batch, steps, gates * hidden)` input projection (biases included).
        h0: `(batch, hidden)` initial state.
        w_dense: `(hidden, gates * hidden)`; `m = h @ w_dense`.
        cell: "tanh", "gru" or "lstm".
        c0: `(batch, hidden)` initial LSTM cell state; zeros if None.

    Returns:
        `(batch, steps, hidden)` float32 hidden states.

    Example:
        >>> x = jnp.ones((1, 3, 2))
        >>> sparse_rnn_reference(x, jnp.zeros((1, 2)), jnp.zeros((2, 2)), cell="tanh").shape
        (1, 3, 2)
    """
    hidden = h0.shape[-1]
    gates = w_dense.shape[1] // hidden
    w = w_dense.astype(jnp.float32)
    c0 = jnp.zeros_like(h0, jnp.float32) if c0 is None else c0.astype(jnp.float32)

    def step(carry, x_t):
        h, c = carry
        m = jnp.dot(h, w, precision=jax.lax.Precision.HIGHEST)
        xs = jnp.split(x_t.astype(jnp.float32), gates, axis=-1)
        ms = jnp.split(m, gates, axis=-1)
        h, c = _cells.cell_forward(cell, xs, ms, h, c)
        return (h, c), h

    _, hs = jax.lax.scan(step, (h0.astype(jnp.float32), c0), jnp.swapaxes(x_proj, 0, 1))
    return jnp.swapaxes(hs, 0, 1)
