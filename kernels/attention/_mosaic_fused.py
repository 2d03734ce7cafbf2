"""Fused FlashAttention backward for Hopper: dK, dV and dQ in one kernel (`BackwardConfig.fused`).

One CTA owns `dkv_compute_wgs * block_kv` rows of K and V (each consumer warpgroup
`block_kv` of them) and streams the q blocks (Q, dO, lse, delta) through a TMA ring, as
the split dK/dV kernel does. Per q block each consumer computes S^T = K Q^T and
dP^T = V dO^T (issued together), P^T, dV += P^T dO, dS^T = P^T (dP^T - delta) and
dK += dS^T Q: 5 block matmuls per (q, kv) block pair with the dQ product below,
against 7 for the split kernels (which compute S and dP twice).

dQ: every consumer writes its dS^T rows (bf16) to a shared SMEM tile; once all have
(an mbarrier), consumer j % wgs computes the CTA's dQ contribution for columns
[64 j, 64 j + 64) as dS @ K_cta (A = the dS^T tile transposed, from SMEM) and puts it
(float32) into staging tile j. An extra warpgroup, the dQ writer,
adds the staging tiles into a float32 dQ accumulator in HBM with TMA reduce-add.

Determinism: the contributions to one q block are added in a fixed order, by kv tile.
One global semaphore per (batch, head, q block) counts the kv tiles that have added
theirs; the writer of kv tile t waits until it reads t (without decrementing), adds,
waits for the TMA write to complete, and increments it. For every q block the kv
tiles that contribute form a prefix 0..n-1 (causal: tile t contributes to q block i
iff (i + 1) * block_q > t * kv_rows), so the order is total and the sum bit-exact run
to run. Tile 0 stores instead of adding, so the accumulator needs no zeroing. The CTAs
of tile t - 1 have a lower launch index (kv tiles are the grid's second axis, heads the
first), so they are resident or done when tile t waits on them.

In interpret mode (CPU tests) global semaphores and TMA reduce-add are not available;
the interpreter runs the grid in order, so the writer skips the semaphores and adds by
load, add and store.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpp.kernels.attention import _mosaic
from jaxpp.kernels.attention._mosaic import LOG2E, _cdiv, _iota, _mma, _mma2, _mma_acc, _smem


@plgpu.inline_mgpu()
def _fence_proxy_async_global(ctx: Any) -> None:
    """Orders this thread's generic-proxy global accesses against its TMA (async proxy) ones.

    After the semaphore wait (generic acquire) and before the TMA add reads the
    accumulator; and after the TMA add completed, before the release that signals it.
    """
    del ctx
    mgpu_utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)


SMEM_BYTES = 227 * 1024  # per CTA on sm_90a
DQ_COLS = 64  # dQ columns per staging slice (one 128-byte swizzle tile of K's columns)


def _smem_bytes(head_dim: int, bq: int, cta_rows: int, stages: int, n_dq: int) -> int:
    kv = 2 * cta_rows * head_dim * 2
    ring = stages * (2 * bq * head_dim * 2 + 2 * bq * 4)
    return kv + ring + 2 * cta_rows * bq * 2 + n_dq * bq * DQ_COLS * 4


def backward_fused(
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
    config: _mosaic.BackwardConfig,
    interpret: bool,
    outputs: str = "dkv",
) -> tuple[jax.Array, ...]:
    """(dQ / scale in float32 [B, T, N, H], dK[, dV] per q head [B, S, N, H]).

    The caller multiplies dQ by `scale` and casts it (one elementwise pass in XLA).
    Rows of dQ past `q_len` are not written. `outputs="dk"` leaves dV out (head dim
    256: dK + dV accumulators do not fit the registers; dV comes from the split dV pass).
    """
    batch, t_pad, num_heads, head_dim = q.shape
    s_pad, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bkv, stages, wgs = (
        config.block_q,
        config.block_kv,
        config.num_stages,
        config.dkv_compute_wgs,
    )
    if outputs not in ("dkv", "dk"):
        raise ValueError(f"outputs={outputs!r}; use 'dkv' or 'dk'.")
    want_dv = outputs == "dkv"
    if want_dv and head_dim > 128:
        raise NotImplementedError(
            f"BackwardConfig(fused=True) computes dK and dV together only for head_dim <= "
            f"128 (the two accumulators of head_dim {head_dim} do not fit the registers); "
            "use BackwardConfig(fused=True, split_dkv=True, dkv_compute_wgs=1): a fused "
            "dK + dQ kernel and a separate dV pass."
        )
    cta_rows = bkv * wgs
    num_kv_tiles = s_pad // cta_rows
    num_q_blocks = t_pad // bq
    total_q_steps = _cdiv(q_len, bq)
    dq_cols = min(DQ_COLS, head_dim)
    n_dq = head_dim // dq_cols  # dQ column slices; slice j is computed by consumer j % wgs
    while stages > 1 and _smem_bytes(head_dim, bq, cta_rows, stages, n_dq) > SMEM_BYTES:
        stages -= 1  # head dim 256: a single-slot ring leaves room for the dQ staging
    ragged_kv = kv_len % cta_rows != 0  # some CTA holds padded keys: mask them (dQ needs it)
    dtype = q.dtype
    c = scale * LOG2E

    def first_step(kv_base: Any) -> Any:
        return jnp.minimum(kv_base // bq, total_q_steps) if causal else 0

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, *refs):
        dv_ref, scratch = refs if want_dv else (None, refs[0])
        (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, stage, a_smem, bars) = (
            scratch
        )
        interp_tmp, interp_bar = a_smem[1:] if interpret else (None, None)
        a_smem = a_smem[0] if interpret else None
        in_bar, q_bar, do_bar, q_free, do_free, ds_ready, dq_full, dq_free = bars
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile = lax.axis_index("kv_tiles")
        kv_h = lax.div(h, group)
        cta_base = tile * cta_rows
        cta_first = first_step(cta_base)

        @pl.when(wg < wgs)
        def _consumer():
            if not interpret:
                plgpu.set_max_registers(240 if wgs == 1 else 232, action="increase")
            kv_base = cta_base + wg * bkv
            my_k = k_smem.at[pl.ds(wg * bkv, bkv)]
            my_v = v_smem.at[pl.ds(wg * bkv, bkv)]
            my_a = a_smem.at[wg] if a_smem is not None else None
            rows = (b, pl.ds(kv_base, bkv), kv_h)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], my_k, in_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], my_v, in_bar.at[wg])
            plgpu.barrier_wait(in_bar.at[wg])
            # Steps before this one see none of this warpgroup's keys (causal): they are
            # masked steps (dS = 0), since the CTA's dQ product needs every row of dS.
            full_from = _cdiv(kv_base + bkv - 1, bq) if causal else cta_first
            full_from = jnp.maximum(jnp.minimum(full_from, total_q_steps), cta_first)
            if ragged_kv:
                full_from = total_q_steps  # every step masks the padded keys

            def step(s, carry, *, masked: bool):
                dk, dv = carry
                slot = lax.rem(s - cta_first, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(do_bar.at[slot])
                logits_t, dp_t = _mma2(my_k, q_smem.at[slot].T, my_v, do_smem.at[slot].T, (bkv, bq))
                lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                p_t = jnp.exp2(logits_t * c - lax.broadcast_in_dim(lse, (bkv, bq), (1,)))
                if masked:
                    kv_idx = _iota((bkv, bq), 0) + kv_base
                    keep = kv_idx < kv_len
                    if causal:
                        keep = keep & (_iota((bkv, bq), 1) + s * bq >= kv_idx)
                    p_t = jnp.where(keep, p_t, 0.0)
                if want_dv:
                    dv = _mma_acc(dv, p_t.astype(dtype), do_smem.at[slot], my_a, interpret)
                delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, (bkv, bq), (1,)))).astype(dtype)
                buf = ds_smem.at[lax.rem(s - cta_first, 2)]
                buf.at[pl.ds(wg * bkv, bkv)][...] = ds_t
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready)
                dk = _mma_acc(dk, ds_t, q_smem.at[slot], my_a, interpret)
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                plgpu.barrier_wait(ds_ready)  # every consumer's dS^T rows are in `buf`

                for j in range(n_dq):

                    @pl.when(wg == j % wgs)
                    def _dq(j: int = j) -> None:
                        cols = pl.ds(j * dq_cols, dq_cols) if n_dq > 1 else slice(None)
                        part = _mma(buf.T, k_smem.at[:, cols], (bq, dq_cols))
                        plgpu.barrier_wait(dq_free.at[j])
                        stage.at[j][...] = part
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(dq_full.at[j])

                return dk, dv

            carry = (
                _mosaic._zeros((bkv, head_dim)),
                _mosaic._zeros((bkv, head_dim)) if want_dv else None,
            )
            carry = lax.fori_loop(cta_first, full_from, lambda s, a: step(s, a, masked=True), carry)
            carry = lax.fori_loop(
                full_from, total_q_steps, lambda s, a: step(s, a, masked=False), carry
            )
            dk, dv = carry

            for j in range(n_dq):  # observe the writer's last releases (every phase waited on)
                pl.when(wg == j % wgs)(lambda j=j: plgpu.barrier_wait(dq_free.at[j]))

            # K and V tiles are reused below for dK and dV: wait until no consumer still
            # reads K in its dQ product.
            plgpu.barrier_arrive(ds_ready)
            plgpu.barrier_wait(ds_ready)

            out_rows = (b, pl.ds(kv_base, bkv), h)
            my_k[...] = (dk * scale).astype(dtype)
            if want_dv:
                my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_k, dk_ref.at[out_rows])
            if want_dv:
                plgpu.copy_smem_to_gmem(my_v, dv_ref.at[out_rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _producer():
            if not interpret:
                plgpu.set_max_registers(24, action="decrease")

            def load(step, slot):
                rows = (b, pl.ds(step * bq, bq), h)
                vec = (b, h, pl.ds(step * bq, bq))
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot], do_bar.at[slot])

            _mosaic._stream(
                load, total_q_steps, cta_first, stages, (q_free, do_free), total_q_steps
            )

        @pl.when(wg == wgs + 1)
        def _dq_writer():
            if not interpret:
                plgpu.set_max_registers(24, action="decrease")
                sems = pl.get_global(
                    plgpu.SemaphoreType.REGULAR((batch * num_heads * num_q_blocks,))
                )
            for j in range(n_dq):  # the staging tiles start free
                plgpu.barrier_arrive(dq_free.at[j])

            @pl.loop(cta_first, total_q_steps)
            def _write(s):
                if not interpret:
                    sem = sems.at[(b * num_heads + h) * num_q_blocks + s]
                    plgpu.semaphore_wait(sem, tile, decrement=False, memory_scope="gpu")
                    _fence_proxy_async_global()
                for j in range(n_dq):
                    plgpu.barrier_wait(dq_full.at[j])
                    dst = dq_ref.at[b, pl.ds(s * bq, bq), h, pl.ds(j * dq_cols, dq_cols)]

                    @pl.when(tile == 0)
                    def _store(j=j, dst=dst):
                        plgpu.copy_smem_to_gmem(stage.at[j], dst)

                    @pl.when(tile != 0)
                    def _add(j=j, dst=dst):
                        if interpret:  # the interpreter has no TMA reduce: load, add, store
                            plgpu.copy_gmem_to_smem(dst, interp_tmp, interp_bar)
                            plgpu.barrier_wait(interp_bar)
                            interp_tmp[...] = interp_tmp[...] + stage.at[j][...]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(interp_tmp, dst)
                            plgpu.wait_smem_to_gmem(0)
                        else:
                            plgpu.copy_smem_to_gmem(stage.at[j], dst, reduction_op="add")

                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for j in range(n_dq):
                    plgpu.barrier_arrive(dq_free.at[j])
                if not interpret:
                    plgpu.wait_smem_to_gmem(0)  # the adds are in HBM before the next tile's
                    _fence_proxy_async_global()
                    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

            plgpu.wait_smem_to_gmem(0)

    scratch = (
        _smem((cta_rows, head_dim), dtype),
        _smem((cta_rows, head_dim), dtype),
        _smem((stages, bq, head_dim), dtype),
        _smem((stages, bq, head_dim), dtype),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        _smem((2, cta_rows, bq), dtype),  # dS^T, double-buffered by step parity
        _smem((n_dq, bq, dq_cols), jnp.float32),
        (  # interpret mode: register-A operands, and the writer's load-add-store
            (_smem((wgs, bkv, bq), dtype), plgpu.SMEM((bq, dq_cols), jnp.float32), plgpu.Barrier())
            if interpret
            else None
        ),
        (
            plgpu.Barrier(num_arrivals=2, num_barriers=wgs),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs),
            plgpu.Barrier(num_barriers=n_dq),
            plgpu.Barrier(num_barriers=n_dq),
        ),
    )
    kv_out = jax.ShapeDtypeStruct((batch, s_pad, num_heads, head_dim), dtype)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, jnp.float32), kv_out, *([kv_out] * want_dv)),
        scratch_types=(scratch,),
        grid=(num_heads, num_kv_tiles, batch),
        grid_names=("heads", "kv_tiles", "batch"),
        num_threads=wgs + 2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_mosaic.interpret_params(interpret),
    )(q, k, v, do, lse, delta)
