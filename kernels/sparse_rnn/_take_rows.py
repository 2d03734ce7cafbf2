"""`take_rows`: a gather from a register tensor, lowered to Triton's `tt.gather`.

Pallas-Triton has no lowering for `lax.gather` on values (only gathers through refs, which
become global loads). Triton's own `gather` op moves the source through shared memory when the
gathered axis spans warps, which is how the sparse RNN reads the hidden state from shared
memory. This module adds a tiny primitive for it: `take_rows(src, idx)[i, j] ==
src[idx[i, j], j]`. On other backends (and in Pallas interpret mode) it is
`jnp.take_along_axis`.

It registers a rule in Pallas-Triton's lowering table (`jax._src`, an internal API); if that
table moves in a later JAX, only `gather="shared"` stops working.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as triton_lowering

take_rows_p = jax_core.Primitive("sparse_rnn_take_rows")


def take_rows(src: jax.Array, idx: jax.Array) -> jax.Array:
    """`out[i, j] = src[idx[i, j], j]` for 2-D `src` and int32 `idx` of equal width.

    Example:
        >>> src = jnp.arange(6.0).reshape(3, 2)
        >>> take_rows(src, jnp.array([[2, 0], [1, 1]], jnp.int32)).tolist()
        [[4.0, 1.0], [2.0, 3.0]]
    """
    return take_rows_p.bind(src, idx)


def _reference(src, idx):
    return jnp.take_along_axis(src, idx, axis=0)


@take_rows_p.def_abstract_eval
def _abstract_eval(src, idx):
    if src.ndim != 2 or idx.ndim != 2 or src.shape[1] != idx.shape[1]:
        raise ValueError(
            f"take_rows needs 2-D src/idx of equal width, got {src.shape}, {idx.shape}"
        )
    return jax_core.ShapedArray(idx.shape, src.dtype)


take_rows_p.def_impl(_reference)
mlir.register_lowering(take_rows_p, mlir.lower_fun(_reference, multiple_results=False))


@triton_lowering.register_lowering(take_rows_p)
def _triton_rule(ctx, src, idx):
    out_aval = ctx.avals_out[0]
    result = ir.RankedTensorType.get(out_aval.shape, ir.RankedTensorType(src.type).element_type)
    return tt_dialect.gather(src, idx, 0, results=[result])
