"""Cell updates and their hand-written backward, shared by the reference and the kernels.

Every function works on lists of same-shaped float32 arrays (one per gate), so the same code
runs in XLA and inside a Pallas kernel. `xs` is the input projection, `ms` the recurrent
product `h_prev @ w`, split per gate; the gate order is (i, f, g, o) for LSTM and (r, z, n)
for GRU, where GRU's candidate is `tanh(x_n + r * m_n)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _sigmoid(a: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-a))


def cell_forward(
    cell: str,
    xs: Sequence[jax.Array],
    ms: Sequence[jax.Array],
    h_prev: jax.Array,
    c_prev: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One step of `cell`; returns `(h, c)` (`c` is `c_prev` for cells without one).

    Example:
        >>> one = jnp.ones((2,))
        >>> h, c = cell_forward("tanh", [one], [one], one, one)
        >>> round(float(h[0]), 4)
        0.964
    """
    if cell == "tanh":
        return jnp.tanh(xs[0] + ms[0]), c_prev
    if cell == "lstm":
        i = _sigmoid(xs[0] + ms[0])
        f = _sigmoid(xs[1] + ms[1])
        g = jnp.tanh(xs[2] + ms[2])
        o = _sigmoid(xs[3] + ms[3])
        c = f * c_prev + i * g
        return o * jnp.tanh(c), c
    if cell == "gru":
        r = _sigmoid(xs[0] + ms[0])
        z = _sigmoid(xs[1] + ms[1])
        n = jnp.tanh(xs[2] + r * ms[2])
        return (1.0 - z) * n + z * h_prev, c_prev
    raise ValueError(f"cell={cell!r} is not one of ['gru', 'lstm', 'tanh'].")


def cell_backward(
    cell: str,
    xs: Sequence[jax.Array],
    ms: Sequence[jax.Array],
    h_prev: jax.Array,
    c_prev: jax.Array,
    c: jax.Array,
    dh: jax.Array,
    dc: jax.Array,
) -> tuple[list[jax.Array], list[jax.Array], jax.Array, jax.Array]:
    """Backward of one step given the cotangents of `h` and `c`.

    Returns:
        `(dxs, dms, dh_prev_direct, dc_prev)`: cotangents of the input projection and of the
        recurrent product per gate, and the parts of `dh_prev`/`dc_prev` that do not flow
        through the recurrent matrix.

    Example:
        >>> one = jnp.ones((2,))
        >>> dxs, dms, dh0, dc0 = cell_backward("tanh", [one], [one], one, one, one, one, one)
        >>> round(float(dxs[0][0]), 4)
        0.0707
    """
    zero = jnp.zeros_like(dh)
    if cell == "tanh":
        h = jnp.tanh(xs[0] + ms[0])
        da = dh * (1.0 - h * h)
        return [da], [da], zero, zero
    if cell == "lstm":
        i = _sigmoid(xs[0] + ms[0])
        f = _sigmoid(xs[1] + ms[1])
        g = jnp.tanh(xs[2] + ms[2])
        o = _sigmoid(xs[3] + ms[3])
        tc = jnp.tanh(c)
        dc_total = dc + dh * o * (1.0 - tc * tc)
        da = [
            dc_total * g * i * (1.0 - i),
            dc_total * c_prev * f * (1.0 - f),
            dc_total * i * (1.0 - g * g),
            dh * tc * o * (1.0 - o),
        ]
        return da, da, zero, dc_total * f
    if cell == "gru":
        r = _sigmoid(xs[0] + ms[0])
        z = _sigmoid(xs[1] + ms[1])
        n = jnp.tanh(xs[2] + r * ms[2])
        dn_pre = dh * (1.0 - z) * (1.0 - n * n)
        da_r = dn_pre * ms[2] * r * (1.0 - r)
        da_z = dh * (h_prev - n) * z * (1.0 - z)
        return [da_r, da_z, dn_pre], [da_r, da_z, dn_pre * r], dh * z, zero
    raise ValueError(f"cell={cell!r} is not one of ['gru', 'lstm', 'tanh'].")
