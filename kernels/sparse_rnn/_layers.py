"""Flax (linen) layers on `sparse_rnn`: `SparseLSTM` and `SparseGRU`.

The recurrent matrix is pruned once at init by magnitude and packed; the trainable parameter
is the packed `recurrent_values`, the pattern lives in the `"sparsity"` collection (integer
arrays, not trained). The input projection (with the biases) is one dense matmul over all
steps, done by XLA outside the kernel.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.kernels.sparse_rnn import _api, _weights

_PATTERN_FIELDS = ("columns", "valid", "transpose_rows", "transpose_source", "transpose_valid")


class _SparseRNN(nn.Module):
    """Shared body of the sparse recurrent layers (`cell` picks the update)."""

    hidden_size: int
    density: float
    num_blocks: int | None = None
    implementation: str = "auto"
    param_dtype: jnp.dtype = jnp.float32
    cell = "lstm"

    @nn.compact
    def __call__(self, inputs: jax.Array, h0: jax.Array | None = None) -> jax.Array:
        batch, _, features = inputs.shape
        gates = _weights.num_gates_of(self.cell)
        hidden = self.hidden_size
        kernel = self.param(
            "input_kernel", nn.initializers.lecun_normal(), (features, gates * hidden),
            self.param_dtype,
        )  # fmt: skip
        bias = self.param("bias", nn.initializers.zeros, (gates * hidden,), self.param_dtype)
        cache: dict[str, _weights.SparseRecurrentWeights] = {}
        init_key = self.make_rng("params") if self.is_initializing() else None

        def packed() -> _weights.SparseRecurrentWeights:
            if "w" not in cache:  # pruning runs on the host, once, at init
                w = nn.initializers.orthogonal()(init_key, (hidden, gates * hidden))
                cache["w"] = _weights.SparseRecurrentWeights.prune(
                    np.asarray(w) / np.sqrt(self.density),  # the pruned matrix keeps its scale
                    self.density,
                    num_gates=gates,
                    num_blocks=self.num_blocks,
                    dtype=jnp.float32,
                )
            return cache["w"]

        pattern = self.variable(
            "sparsity", "pattern", lambda: {k: getattr(packed(), k) for k in _PATTERN_FIELDS}
        )

        def init_values(_key: jax.Array) -> jax.Array:
            if init_key is None:  # Flax's shape check in `apply`: no pruning there
                blocks = self.num_blocks or _weights.default_num_blocks(hidden)
                slots = 32 * -(-max(1, round(self.density * hidden)) // 32)
                return jnp.zeros((blocks, gates, hidden // blocks, slots), self.param_dtype)
            return packed().values.astype(self.param_dtype)

        values = self.param("recurrent_values", init_values)
        weights = _weights.SparseRecurrentWeights(
            values=values, hidden_size=hidden, num_gates=gates, **pattern.value
        )
        x_proj = jnp.einsum("btf,fg->btg", inputs, kernel) + bias
        if h0 is None:
            h0 = jnp.zeros((batch, hidden), x_proj.dtype)
        return _api.sparse_rnn(
            x_proj, h0, weights, cell=self.cell, implementation=self.implementation
        )


class SparseLSTM(_SparseRNN):
    """An LSTM layer whose recurrent matrix is magnitude-pruned to `density`.

    Returns all hidden states `(batch, steps, hidden_size)`. Initialize outside `jax.jit`
    (pruning runs on the host). `implementation="auto"` runs the persistent kernel on a GPU and
    the dense masked reference elsewhere. Faster than a dense LSTM at batch 1-4, slower at
    batch 16 (measured on an H100; `sparse_rnn`).

    Example:
        >>> layer = SparseLSTM(hidden_size=8, density=0.5)
        >>> x = jnp.ones((2, 3, 4))
        >>> variables = layer.init(jax.random.key(0), x)
        >>> layer.apply(variables, x).shape
        (2, 3, 8)
    """

    cell = "lstm"


class SparseGRU(_SparseRNN):
    """A GRU layer (gates r, z, n) whose recurrent matrix is magnitude-pruned to `density`.

    Example:
        >>> layer = SparseGRU(hidden_size=8, density=0.5)
        >>> x = jnp.ones((2, 3, 4))
        >>> variables = layer.init(jax.random.key(0), x)
        >>> sorted(variables)
        ['params', 'sparsity']
    """

    cell = "gru"
