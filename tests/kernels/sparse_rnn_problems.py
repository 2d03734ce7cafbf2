"""Random sparse RNN problems and the relative error the sparse RNN tests share."""

import jax.numpy as jnp
import numpy as np

from jaxpp.kernels import sparse_rnn as sr

GATES = {"tanh": 1, "gru": 3, "lstm": 4}


def problem(cell, hidden, batch, steps, density, seed, num_blocks=4):
    """`(weights, x, h0, c0, ct)`: pruned weights scaled so the recurrence neither dies nor
    saturates, input projections, initial states and a cotangent for every output."""
    rng = np.random.default_rng(seed)
    g = GATES[cell]
    w = rng.normal(size=(hidden, g * hidden)) * 0.5 / np.sqrt(density * hidden)
    weights = sr.SparseRecurrentWeights.prune(w, density, num_gates=g, num_blocks=num_blocks)
    x = jnp.asarray(rng.normal(size=(batch, steps, g * hidden)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    c0 = jnp.asarray(rng.normal(size=(batch, hidden)) * 0.5, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(batch, steps, hidden)), jnp.float32)
    return weights, x, h0, c0, ct


def rel(a, b) -> float:
    """`|a - b| / |b|` in float32."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
