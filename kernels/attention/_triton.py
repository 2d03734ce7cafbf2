"""FlashAttention forward and backward on Pallas Triton (any CUDA GPU; FA2-style).

One program per (q tile, batch, head) in the forward and dQ kernels and per
(kv tile, batch, head) in the dK/dV kernel; each loops over the other operand's blocks
with `fori_loop`. Same conventions as `_mosaic`: inputs arrive padded to whole tiles,
`kv_len` masks padded keys, exp2 with scale·log2(e) folded in, lse saved in base 2.
Not yet run on a GPU (checked in interpret mode only); "auto" does not pick it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, slots=True)
class TritonConfig:
    """Tiles of the Triton kernels (powers of two).

    Attributes:
        block_q: q rows per program (and per streamed q block in the dK/dV kernel).
        block_kv: kv rows per streamed block (and per program in the dK/dV kernel).
        num_warps: warps per program.
        num_stages: Triton software-pipelining depth.
    """

    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _params(config: TritonConfig) -> Any:
    return plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    scale: float,
    kv_len: int,
    config: TritonConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """(out, lse2[B, N, T]) for tile-padded BTNH inputs."""
    batch, t_pad, num_heads, head_dim = q.shape
    s_pad, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bkv = config.block_q, config.block_kv
    total_kv_steps = -(-kv_len // bkv)
    c = scale * LOG2E

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref):
        q_base = pl.program_id(0) * bq
        qt = q_ref[...]
        q_idx = q_base + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)

        def step(j, carry):
            acc, m, denom = carry
            kt = k_ref[pl.ds(j * bkv, bkv), :]
            vt = v_ref[pl.ds(j * bkv, bkv), :]
            s = _dot(qt, kt, trans_b=True) * c
            kv_idx = j * bkv + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
            keep = kv_idx < kv_len
            if causal:
                keep = keep & (q_idx >= kv_idx)
            s = jnp.where(keep, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            denom = denom * alpha + p.sum(axis=1)
            acc = acc * alpha[:, None] + _dot(p.astype(vt.dtype), vt)
            return acc, m_new, denom

        steps = total_kv_steps
        if causal:
            steps = jnp.minimum(lax.div(q_base + bq + bkv - 1, bkv), total_kv_steps)
        init = (
            jnp.zeros((bq, head_dim), jnp.float32),
            jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
        )
        acc, m, denom = lax.fori_loop(0, steps, step, init)
        o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
        lse_ref[...] = m + jnp.log2(denom)

    return pl.pallas_call(
        kernel,
        grid=(t_pad // bq, batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, s_pad, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, s_pad, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32),
        ],
        compiler_params=_params(config),
        interpret=interpret,
    )(q, k, v)


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    causal: bool,
    scale: float,
    q_len: int,
    kv_len: int,
    config: TritonConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk per q head, dv per q head) for tile-padded inputs."""
    batch, t_pad, num_heads, head_dim = q.shape
    s_pad, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bkv = config.block_q, config.block_kv
    total_kv_steps = -(-kv_len // bkv)
    total_q_steps = -(-q_len // bq)
    c = scale * LOG2E

    def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref):
        q_base = pl.program_id(0) * bq
        qt, dot_ = q_ref[...], do_ref[...]
        lse_b, delta_b = lse_ref[...][:, None], delta_ref[...][:, None]
        q_idx = q_base + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)

        def step(j, dq):
            kt = k_ref[pl.ds(j * bkv, bkv), :]
            vt = v_ref[pl.ds(j * bkv, bkv), :]
            p = jnp.exp2(_dot(qt, kt, trans_b=True) * c - lse_b)
            kv_idx = j * bkv + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
            keep = kv_idx < kv_len
            if causal:
                keep = keep & (q_idx >= kv_idx)
            p = jnp.where(keep, p, 0.0)
            ds = p * (_dot(dot_, vt, trans_b=True) - delta_b)
            return dq + _dot(ds.astype(kt.dtype), kt)

        steps = total_kv_steps
        if causal:
            steps = jnp.minimum(lax.div(q_base + bq + bkv - 1, bkv), total_kv_steps)
        dq = lax.fori_loop(0, steps, step, jnp.zeros((bq, head_dim), jnp.float32))
        dq_ref[...] = (dq * scale).astype(dq_ref.dtype)

    def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref):
        kv_base = pl.program_id(0) * bkv
        kt, vt = k_ref[...], v_ref[...]
        kv_idx = kv_base + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)

        def step(i, carry):
            dk, dv = carry
            qt = q_ref[pl.ds(i * bq, bq), :]
            dot_ = do_ref[pl.ds(i * bq, bq), :]
            lse_b = lse_ref[pl.ds(i * bq, bq)][:, None]
            delta_b = delta_ref[pl.ds(i * bq, bq)][:, None]
            p = jnp.exp2(_dot(qt, kt, trans_b=True) * c - lse_b)  # [bq, bkv]
            if causal:
                q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
                p = jnp.where(q_idx >= kv_idx, p, 0.0)
            dv = dv + _dot(p.astype(dot_.dtype).T, dot_)
            ds = p * (_dot(dot_, vt, trans_b=True) - delta_b)
            dk = dk + _dot(ds.astype(qt.dtype).T, qt)
            return dk, dv

        first = jnp.minimum(lax.div(kv_base, bq), total_q_steps) if causal else 0
        zeros = jnp.zeros((bkv, head_dim), jnp.float32)
        dk, dv = lax.fori_loop(first, total_q_steps, step, (zeros, zeros))
        dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)

    full_q = pl.BlockSpec((None, t_pad, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    full_kv = pl.BlockSpec((None, s_pad, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    full_vec = pl.BlockSpec((None, None, t_pad), lambda i, b, h: (b, h, 0))
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    q_vec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    kv_tile = pl.BlockSpec((None, bkv, None, head_dim), lambda i, b, h: (b, i, h // group, 0))
    kv_out = pl.BlockSpec((None, bkv, None, head_dim), lambda i, b, h: (b, i, h, 0))

    dq = pl.pallas_call(
        dq_kernel,
        grid=(t_pad // bq, batch, num_heads),
        in_specs=[q_tile, full_kv, full_kv, q_tile, q_vec, q_vec],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(config),
        interpret=interpret,
    )(q, k, v, do, lse, delta)
    per_head = jax.ShapeDtypeStruct((batch, s_pad, num_heads, head_dim), k.dtype)
    dk, dv = pl.pallas_call(
        dkv_kernel,
        grid=(s_pad // bkv, batch, num_heads),
        in_specs=[full_q, kv_tile, kv_tile, full_q, full_vec, full_vec],
        out_specs=[kv_out, kv_out],
        out_shape=[per_head, per_head],
        compiler_params=_params(config),
        interpret=interpret,
    )(q, k, v, do, lse, delta)
    return dq, dk, dv
