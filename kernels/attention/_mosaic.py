"""FlashAttention forward and backward for Hopper (sm_90a) on Pallas Mosaic GPU.

Layout of every kernel: one CTA = `compute_wgs` consumer warpgroups, each owning one
tile of rows (q rows in the forward and dQ kernels, kv rows in the dK/dV kernel), plus
one producer warpgroup that streams the other operand's blocks through a ring of
`num_stages` SMEM slots with TMA. Slot `s` is guarded by a "loaded" mbarrier (TMA
completion) and a "free" mbarrier that every consumer arrives at once it is done
with the slot. A consumer that has no work on a streamed block (causal edges) still
waits for it and frees it, so all warpgroups move through the barrier phases in step.

Inputs arrive padded to whole tiles; `kv_len` (static) masks padded keys. Softmax uses
exp2 with `scale * log2(e)` folded into one multiply; the saved log-sum-exp is in the
same base-2 scaled domain (`lse2`), so the backward recomputes P = exp2(s * c - lse2).

In interpret mode (CPU tests), `wgmma` can read its A operand only from SMEM and
accumulators cannot be seeded from registers, so `_mma_acc` routes register operands
through an SMEM scratch and adds the product; on the GPU it issues the register-A
`wgmma` on an accumulator seeded with the running value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
_NEG_INF = float("-inf")


def _check_tiles(config, *, blocks: tuple[str, ...], positive: tuple[str, ...]) -> None:
    """Tile sizes must be multiples of 64 up to 256 (wgmma); counts at least 1."""
    name = type(config).__name__
    for field in blocks:
        value = getattr(config, field)
        if not isinstance(value, int) or value % 64 or not 64 <= value <= 256:
            raise ValueError(
                f"{name}.{field}={value!r}: tiles are multiples of 64 from 64 to 256 (wgmma "
                f"shapes). Fix: use 64, 128, 192 or 256."
            )
    for field in positive:
        value = getattr(config, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{field}={value!r} must be an int >= 1.")


@dataclasses.dataclass(frozen=True, slots=True)
class ForwardConfig:
    """Tiles of the forward kernel.

    Attributes:
        block_q: q rows per consumer warpgroup (multiple of 64).
        block_kv: kv rows per streamed block (multiple of 64 here; wgmma N <= 256).
        num_stages: SMEM slots in the K/V ring.
        compute_wgs: consumer warpgroups per CTA (each its own q tile).
        longest_first: with causal, launch the q tiles with most kv blocks first.
        pingpong: with two consumers, order them by a shared barrier so that one runs
            its softmax while the other's matmuls use the tensor cores (FA3 ping-pong).
        lookahead: inside a consumer, issue S = Q K^T of step j + 1 together with
            O += P V of step j and run the softmax of j + 1 while P V still runs (FA3
            intra-warpgroup pipelining); O lives in a wgmma accumulator. GPU only
            (interpret mode runs the plain loop).
        lazy_rescale: disabled (setting it raises). The thresholded O rescale gave NaN
            and a hang on the H100 (run 4): its warpgroup-wide flag was a cross-warp
            `jnp.max`, whose SMEM scratch Mosaic GPU places at one fixed offset that
            both consumer warpgroups share (NOTES.md "Run 4").
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    compute_wgs: int = 2
    longest_first: bool = True
    pingpong: bool = False
    lookahead: bool = False
    lazy_rescale: bool = False

    def __post_init__(self) -> None:
        _check_tiles(self, blocks=("block_q", "block_kv"), positive=("num_stages", "compute_wgs"))
        if self.lazy_rescale:
            raise ValueError(
                "ForwardConfig(lazy_rescale=True) is disabled: on the H100 (run 4) it gave "
                "NaN (b4 s4096 d128 non-causal, growing-logits test) and hung (b1 s16384 "
                "d128 non-causal). Cause: its warpgroup-wide flag is a cross-warp jnp.max "
                "whose SMEM scratch both consumer warpgroups share (kernels/attention/"
                'NOTES.md, "Run 4"). Fix: leave lazy_rescale=False (the default).'
            )


@dataclasses.dataclass(frozen=True, slots=True)
class BackwardConfig:
    """Tiles of the two backward kernels (dQ, and dK/dV).

    Attributes:
        block_q: q rows per tile (dQ kernel: per warpgroup; dK/dV kernel: per streamed block).
        block_kv: kv rows per tile (dK/dV kernel: per warpgroup; dQ kernel: per streamed block).
        num_stages: SMEM slots of each ring.
        dq_compute_wgs: consumer warpgroups of the dQ kernel.
        dkv_compute_wgs: consumer warpgroups of the dK/dV kernel.
        split_dkv: compute dK and dV in two passes (each recomputes P); frees registers
            for head dim 256.
        overlap: issue the two SMEM-operand matmuls of a step (S and dP) together, so
            the second runs while the first is awaited.
        fused: one kernel computes dK, dV and dQ (5 block matmuls per block pair instead
            of 7); dQ is added in float32 in HBM in a fixed order (`_mosaic_fused.py`).
            Uses block_q, block_kv, num_stages and dkv_compute_wgs. With split_dkv
            (head dim 256): a fused dK + dQ kernel and the dV pass (6 matmuls, not 8).
    """

    block_q: int = 64
    block_kv: int = 64
    num_stages: int = 2
    dq_compute_wgs: int = 2
    dkv_compute_wgs: int = 2
    split_dkv: bool = False
    overlap: bool = False
    fused: bool = False

    def __post_init__(self) -> None:
        _check_tiles(
            self,
            blocks=("block_q", "block_kv"),
            positive=("num_stages", "dq_compute_wgs", "dkv_compute_wgs"),
        )


def _smem(shape: tuple[int, ...], dtype: Any) -> Any:
    minor = shape[-1] * jnp.dtype(dtype).itemsize
    swizzle = 128 if minor % 128 == 0 else 64 if minor % 64 == 0 else 32
    tile = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(
        shape,
        dtype,
        transforms=(plgpu.TilingTransform((8, tile)), plgpu.SwizzleTransform(swizzle)),
    )


def _mma(
    a_ref: Any, b_ref: Any, shape: tuple[int, int], after_issue: Callable[[], None] | None = None
) -> jax.Array:
    """a_ref @ b_ref (both SMEM) into a fresh float32 accumulator, returned as registers.

    `after_issue` runs after the wgmma is issued and before its result is awaited.
    """

    def body(acc_ref: Any) -> jax.Array:
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mma2(
    a1: Any, b1: Any, a2: Any, b2: Any, shape: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """(a1 @ b1, a2 @ b2), both issued before either is awaited (all operands in SMEM)."""

    def body(acc1: Any, acc2: Any) -> tuple[jax.Array, jax.Array]:
        plgpu.wgmma(acc1, a1, b1)
        plgpu.wgmma(acc2, a2, b2)
        return acc1[...], acc2[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _mma_acc(acc: jax.Array, a: jax.Array, b_ref: Any, a_smem: Any, interpret: bool) -> jax.Array:
    """acc + a @ b_ref, with `a` in registers (routed through `a_smem` in interpret mode)."""
    if interpret:
        a_smem[...] = a
        return acc + _mma(a_smem, b_ref, acc.shape)

    def body(acc_ref: Any) -> None:
        plgpu.wgmma(acc_ref, a, b_ref)

    return pl.run_state(body)(plgpu.ACC.init(acc))


def interpret_params(interpret: Any) -> plgpu.InterpretGPUParams | None:
    """The kernels' `interpret` argument as Pallas expects it.

    `interpret` is a bool, or (private hook, tests) the `plgpu.InterpretGPUParams`
    to run with, e.g. `InterpretGPUParams(detect_races=True)` (tests/attention/).
    """
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


def _zeros(shape: tuple[int, ...]) -> jax.Array:
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _row_vector(value: float, n: int) -> jax.Array:
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def _iota(shape: tuple[int, int], dim: int) -> jax.Array:
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _cdiv(a: Any, b: int) -> Any:
    return (a + b - 1) // b


def _stream(
    refs_at_step: Callable[[Any, Any], None] | tuple[Callable[[Any, Any], None], ...],
    num_steps: Any,
    first_step: Any,
    num_stages: int,
    free_barriers: tuple[Any, ...],
    max_steps: int,
) -> None:
    """Producer loop: TMA blocks first_step..num_steps-1 into ring slots (step - first) % stages.

    `refs_at_step(step, slot)` issues the copies of one block; before reusing a slot the
    producer waits on each of `free_barriers` at that slot. If `refs_at_step` is a tuple
    of such functions, one per free barrier, each copy waits only for its own barrier
    (K of step s does not wait for V of step s - stages to be freed; the lookahead
    forward needs that, see `_lookahead_loop`). `max_steps` (static) bounds num_steps,
    so no copy is traced past the end of the array.
    """
    if isinstance(refs_at_step, tuple):
        if len(refs_at_step) != len(free_barriers):
            raise ValueError("one copy function per free barrier (bug in jaxpp)")
        loads = refs_at_step

        def issue_all(step: Any, slot: Any) -> None:
            for load in loads:
                load(step, slot)

        def wait_and_issue(step: Any, slot: Any) -> None:
            for barrier, load in zip(free_barriers, loads, strict=True):
                plgpu.barrier_wait(barrier.at[slot])
                load(step, slot)
    else:
        issue_all = refs_at_step

        def wait_and_issue(step: Any, slot: Any) -> None:
            for barrier in free_barriers:
                plgpu.barrier_wait(barrier.at[slot])
            refs_at_step(step, slot)

    for i in range(min(num_stages, max_steps)):

        @pl.when(first_step + i < num_steps)
        def _prologue(i: int = i) -> None:
            issue_all(first_step + i, i)

    @pl.loop(first_step + num_stages, num_steps)
    def _steady(step: Any) -> None:
        wait_and_issue(step, lax.rem(step - first_step, num_stages))

    # Observe the last frees too, so every barrier phase is waited on once per thread.
    @pl.loop(jnp.maximum(first_step + num_stages, num_steps), num_steps + num_stages)
    def _drain(step: Any) -> None:
        slot = lax.rem(step - first_step, num_stages)
        for barrier in free_barriers:
            plgpu.barrier_wait(barrier.at[slot])


# --------------------------------------------------------------------------- forward


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    scale: float,
    kv_len: int,
    config: ForwardConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Runs the forward kernel on tile-padded BTNH inputs; returns (out, lse2[B, N, T])."""
    batch, t_pad, num_heads, head_dim = q.shape
    s_pad, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bkv, stages, wgs = config.block_q, config.block_kv, config.num_stages, config.compute_wgs
    num_q_tiles = t_pad // (bq * wgs)
    total_kv_steps = _cdiv(kv_len, bkv)
    assert t_pad % (bq * wgs) == 0 and s_pad % bkv == 0 and s_pad >= total_kv_steps * bkv
    dtype = q.dtype
    c = scale * LOG2E

    def steps_to(q_end: Any) -> Any:
        if not causal:
            return total_kv_steps
        return jnp.minimum(_cdiv(q_end, bkv), total_kv_steps)

    pingpong = config.pingpong and wgs == 2
    lookahead = config.lookahead and not interpret

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch):
        q_smem, k_smem, v_smem, lse_smem, a_smem, barriers = scratch
        q_bar, k_bar, v_bar, k_free, v_free, sched = barriers

        def sched_sync() -> None:
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile = lax.axis_index("q_tiles")
        if causal and config.longest_first:
            tile = num_q_tiles - 1 - tile
        kv_h = lax.div(h, group)
        cta_steps = steps_to((tile + 1) * (wgs * bq))

        @pl.when(wg < wgs)
        def _consumer():
            if not interpret:
                plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
            q_base = tile * (wgs * bq) + wg * bq
            my_q = q_smem.at[wg]
            my_a = a_smem.at[wg] if a_smem is not None else None
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, bq), h], my_q, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            my_steps = steps_to(q_base + bq)
            if causal:
                full_steps = jnp.minimum((q_base + 1) // bkv, kv_len // bkv)
            else:
                full_steps = kv_len // bkv

            def step(s, carry, *, masked: bool):
                acc, m, denom = carry
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                logits = _mma(my_q, k_smem.at[slot].T, (bq, bkv), sched_sync if pingpong else None)
                plgpu.barrier_arrive(k_free.at[slot])
                logits = logits * c
                if masked:
                    kv_idx = _iota((bq, bkv), 1) + s * bkv
                    keep = kv_idx < kv_len
                    if causal:
                        keep = keep & (_iota((bq, bkv), 0) + q_base >= kv_idx)
                    logits = jnp.where(keep, logits, _NEG_INF)
                m_new = jnp.maximum(m, logits.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, (bq, bkv), (0,)))
                denom = denom * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, (bq, head_dim), (0,))
                if pingpong:  # softmax done; take the tensor cores when the other is done
                    plgpu.barrier_arrive(sched)
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(sched)
                else:
                    plgpu.barrier_wait(v_bar.at[slot])
                acc = _mma_acc(acc, p.astype(dtype), v_smem.at[slot], my_a, interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, denom

            def skip(s, _):
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                if pingpong:  # keep the two consumers' barrier counts equal
                    sched_sync()
                    sched_sync()

            if pingpong:  # consumer 1 starts one sync behind consumer 0
                pl.when(wg == 1)(sched_sync)
            if lookahead:
                acc, m, denom = _lookahead_loop(
                    my_q, k_smem, v_smem, k_bar, v_bar, k_free, v_free,
                    sched_sync if pingpong else None,
                    q_base=q_base, full_steps=full_steps, my_steps=my_steps,
                    cta_steps=cta_steps, stages=stages, bkv=bkv, c=c, causal=causal,
                    kv_len=kv_len, dtype=dtype,
                )  # fmt: skip
            else:
                carry = (_zeros((bq, head_dim)), _row_vector(_NEG_INF, bq), _row_vector(0.0, bq))
                carry = lax.fori_loop(0, full_steps, lambda s, cr: step(s, cr, masked=False), carry)
                carry = lax.fori_loop(
                    full_steps, my_steps, lambda s, cr: step(s, cr, masked=True), carry
                )
                lax.fori_loop(my_steps, cta_steps, skip, None)
                acc, m, denom = carry
            if pingpong:
                pl.when(wg == 0)(sched_sync)
            inv_l = 1.0 / denom
            out = acc * lax.broadcast_in_dim(inv_l, (bq, head_dim), (0,))
            my_q[...] = out.astype(dtype)
            lse_smem.at[wg][...] = m + jnp.log2(denom)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(q_base, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q_base, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _producer():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")

            def load_k(step, slot):
                rows = (b, pl.ds(step * bkv, bkv), kv_h)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])

            def load_v(step, slot):
                rows = (b, pl.ds(step * bkv, bkv), kv_h)
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

            def load(step, slot):
                load_k(step, slot)
                load_v(step, slot)

            # lookahead holds V of step j - 1 until step j ends: K's slot must be reloaded
            # without waiting for V's, or ping-pong deadlocks (see `_lookahead_loop`)
            loads = (load_k, load_v) if config.lookahead else load
            _stream(loads, cta_steps, 0, stages, (k_free, v_free), total_kv_steps)

    scratch = (
        _smem((wgs, bq, head_dim), dtype),
        _smem((stages, bkv, head_dim), dtype),
        _smem((stages, bkv, head_dim), dtype),
        plgpu.SMEM((wgs, bq), jnp.float32),
        _smem((wgs, bq, bkv), dtype) if interpret else None,
        (
            plgpu.Barrier(num_barriers=wgs),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2) if pingpong else None,
        ),
    )
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32),
        ),
        scratch_types=(scratch,),
        grid=(num_heads, num_q_tiles, batch),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q, k, v)


def _lookahead_loop(
    my_q: Any,
    k_smem: Any,
    v_smem: Any,
    k_bar: Any,
    v_bar: Any,
    k_free: Any,
    v_free: Any,
    sched_sync: Callable[[], None] | None,
    *,
    q_base: Any,
    full_steps: Any,
    my_steps: Any,
    cta_steps: Any,
    stages: int,
    bkv: int,
    c: float,
    causal: bool,
    kv_len: int,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One forward consumer's kv loop with S of step j issued beside P V of step j - 1.

    Per step j >= 1: issue S_j = Q K_j^T (fresh accumulator) and O += P_{j-1} V_{j-1},
    wait for S_j only (at most one wgmma group in flight), softmax of S_j while P V
    runs, then wait for P V and rescale O by this step's alpha. With ping-pong, one
    scheduling sync per step after the issues (skip steps sync once too), so the two
    consumers' barrier counts stay equal. Returns (O unnormalised, m, l).

    Deadlock freedom with ping-pong (found on the H100: the first version hung): consumer 1
    runs one sync behind consumer 0, and V of step j - 1 is freed only at the end of step
    j. With a 2-slot ring, consumer 0 waiting for K_j before its sync needed consumer 1's
    free of V_{j-2}, which consumer 1 gives only after the sync paired with consumer 0's
    step-j sync: a cycle. Two changes break every such cycle (checked by an exhaustive
    model of the barrier protocol over ring depths 2-3, up to 9 kv steps, every pair of
    per-consumer step counts; NOTES.md): the producer reloads K's slot as soon as K is
    freed, without waiting for V's (`_stream` with one copy per free barrier), and a skip
    step (causal tail) syncs before its waits instead of after them.
    """
    bq, head_dim = my_q.shape

    def body(acc_o: Any, acc_s: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        def issue_s(s: Any) -> None:
            plgpu.barrier_wait(k_bar.at[lax.rem(s, stages)])
            acc_s[...] = _zeros((bq, bkv))
            plgpu.wgmma(acc_s, my_q, k_smem.at[lax.rem(s, stages)].T)

        def issue_pv(s: Any, p: jax.Array) -> None:
            plgpu.barrier_wait(v_bar.at[lax.rem(s, stages)])
            plgpu.wgmma(acc_o, p, v_smem.at[lax.rem(s, stages)])

        def softmax(s, logits, m, denom, *, masked: bool):
            logits = logits * c
            if masked:
                kv_idx = _iota((bq, bkv), 1) + s * bkv
                keep = kv_idx < kv_len
                if causal:
                    keep = keep & (_iota((bq, bkv), 0) + q_base >= kv_idx)
                logits = jnp.where(keep, logits, _NEG_INF)
            m_blk = logits.max(axis=1)
            m_new = jnp.maximum(m, m_blk)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, (bq, bkv), (0,)))
            return p.astype(dtype), m_new, alpha, denom * alpha + p.sum(axis=1)

        def step(s, carry, *, masked: bool):
            p_prev, m, denom = carry
            issue_s(s)
            issue_pv(s - 1, p_prev)
            if sched_sync is not None:
                sched_sync()
            logits = plgpu.wgmma_accumulator_load(acc_s, wait_n=1)  # S_j; P V may run on
            plgpu.barrier_arrive(k_free.at[lax.rem(s, stages)])
            p, m, alpha, denom = softmax(s, logits, m, denom, masked=masked)
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(v_free.at[lax.rem(s - 1, stages)])

            acc_o[...] = acc_o[...] * lax.broadcast_in_dim(alpha, (bq, head_dim), (0,))
            return p, m, denom

        def skip(s, _):
            if sched_sync is not None:  # before the waits: see the docstring
                sched_sync()
            slot = lax.rem(s, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])

        acc_o[...] = _zeros((bq, head_dim))
        issue_s(0)  # step 0: S only; masked (cheap once, and right for any tile)
        if sched_sync is not None:
            sched_sync()
        logits = plgpu.wgmma_accumulator_load(acc_s, wait_n=0)
        plgpu.barrier_arrive(k_free.at[0])
        m0, d0 = _row_vector(_NEG_INF, bq), _row_vector(0.0, bq)
        p, m, _, denom = softmax(0, logits, m0, d0, masked=True)
        carry = (p, m, denom)
        start = jnp.maximum(full_steps, 1)
        carry = lax.fori_loop(1, start, lambda s, cr: step(s, cr, masked=False), carry)
        carry = lax.fori_loop(start, my_steps, lambda s, cr: step(s, cr, masked=True), carry)
        p, m, denom = carry
        issue_pv(my_steps - 1, p)
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(v_free.at[lax.rem(my_steps - 1, stages)])
        lax.fori_loop(my_steps, cta_steps, skip, None)
        return acc_o[...], m, denom

    return pl.run_scoped(body, plgpu.ACC((bq, head_dim), jnp.float32), plgpu.ACC((bq, bkv)))


# -------------------------------------------------------------------------- backward


def backward_dq(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    causal: bool,
    scale: float,
    kv_len: int,
    config: BackwardConfig,
    interpret: bool,
) -> jax.Array:
    """dQ for tile-padded inputs: each warpgroup owns block_q rows and streams K/V."""
    batch, t_pad, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    bq, bkv, stages, wgs = config.block_q, config.block_kv, config.num_stages, config.dq_compute_wgs
    num_q_tiles = t_pad // (bq * wgs)
    total_kv_steps = _cdiv(kv_len, bkv)
    dtype = q.dtype
    c = scale * LOG2E

    def steps_to(q_end: Any) -> Any:
        if not causal:
            return total_kv_steps
        return jnp.minimum(_cdiv(q_end, bkv), total_kv_steps)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scratch):
        q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, a_smem, barriers = scratch
        in_bar, k_bar, v_bar, k_free, v_free = barriers
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile = lax.axis_index("q_tiles")
        if causal:
            tile = num_q_tiles - 1 - tile
        kv_h = lax.div(h, group)
        cta_steps = steps_to((tile + 1) * (wgs * bq))

        @pl.when(wg < wgs)
        def _consumer():
            if not interpret:
                plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
            q_base = tile * (wgs * bq) + wg * bq
            rows = (b, pl.ds(q_base, bq), h)
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            my_a = a_smem.at[wg] if a_smem is not None else None
            plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, in_bar.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], my_do, in_bar.at[wg])
            plgpu.copy_gmem_to_smem(
                lse_ref.at[b, h, pl.ds(q_base, bq)], lse_smem.at[wg], in_bar.at[wg]
            )
            plgpu.copy_gmem_to_smem(
                delta_ref.at[b, h, pl.ds(q_base, bq)], delta_smem.at[wg], in_bar.at[wg]
            )
            plgpu.barrier_wait(in_bar.at[wg])
            lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            lse_b = lax.broadcast_in_dim(lse, (bq, bkv), (0,))
            delta_b = lax.broadcast_in_dim(delta, (bq, bkv), (0,))
            my_steps = steps_to(q_base + bq)
            if causal:
                full_steps = jnp.minimum((q_base + 1) // bkv, kv_len // bkv)
            else:
                full_steps = kv_len // bkv

            def step(s, dq, *, masked: bool):
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                if config.overlap:
                    plgpu.barrier_wait(v_bar.at[slot])
                    logits, dp = _mma2(my_q, k_smem.at[slot].T, my_do, v_smem.at[slot].T, (bq, bkv))
                else:
                    logits = _mma(my_q, k_smem.at[slot].T, (bq, bkv))
                p = jnp.exp2(logits * c - lse_b)
                if masked:
                    kv_idx = _iota((bq, bkv), 1) + s * bkv
                    keep = kv_idx < kv_len
                    if causal:
                        keep = keep & (_iota((bq, bkv), 0) + q_base >= kv_idx)
                    p = jnp.where(keep, p, 0.0)
                if not config.overlap:
                    plgpu.barrier_wait(v_bar.at[slot])
                    dp = _mma(my_do, v_smem.at[slot].T, (bq, bkv))
                plgpu.barrier_arrive(v_free.at[slot])
                ds = p * (dp - delta_b)
                dq = _mma_acc(dq, ds.astype(dtype), k_smem.at[slot], my_a, interpret)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            def skip(s, _):
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])

            dq = _zeros((bq, head_dim))
            dq = lax.fori_loop(0, full_steps, lambda s, a: step(s, a, masked=False), dq)
            dq = lax.fori_loop(full_steps, my_steps, lambda s, a: step(s, a, masked=True), dq)
            lax.fori_loop(my_steps, cta_steps, skip, None)
            my_q[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _producer():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")

            def load(step, slot):
                rows = (b, pl.ds(step * bkv, bkv), kv_h)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

            _stream(load, cta_steps, 0, stages, (k_free, v_free), total_kv_steps)

    scratch = (
        _smem((wgs, bq, head_dim), dtype),
        _smem((wgs, bq, head_dim), dtype),
        plgpu.SMEM((wgs, bq), jnp.float32),
        plgpu.SMEM((wgs, bq), jnp.float32),
        _smem((stages, bkv, head_dim), dtype),
        _smem((stages, bkv, head_dim), dtype),
        _smem((wgs, bq, bkv), dtype) if interpret else None,
        (
            plgpu.Barrier(num_arrivals=4, num_barriers=wgs),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        ),
    )
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=(scratch,),
        grid=(num_heads, num_q_tiles, batch),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q, k, v, do, lse, delta)


def backward_dkv(
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
    config: BackwardConfig,
    interpret: bool,
    outputs: str = "dkv",
) -> tuple[jax.Array, ...]:
    """dK and/or dV per q head ([B, S, N, H] each) for tile-padded inputs.

    Each warpgroup owns block_kv rows of K and V and streams Q, dO, lse and delta.
    Padded q rows carry dO = 0 and delta = 0, so they add nothing. `outputs` is "dkv",
    "dk" or "dv".
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
    num_kv_tiles = s_pad // (bkv * wgs)
    total_q_steps = _cdiv(q_len, bq)
    dtype = q.dtype
    c = scale * LOG2E
    if outputs not in ("dkv", "dk", "dv"):
        raise ValueError(f"outputs={outputs!r}; use 'dkv', 'dk' or 'dv'.")
    want_dk, want_dv = outputs in ("dkv", "dk"), outputs in ("dkv", "dv")
    num_out = int(want_dk) + int(want_dv)

    def first_step(kv_base: Any) -> Any:
        # Keys past the last query (causal, kv longer than q) see no q block at all.
        return jnp.minimum(kv_base // bq, total_q_steps) if causal else 0

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        out_refs, scratch = refs[:num_out], refs[num_out]
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, a_smem, barriers = scratch
        in_bar, q_bar, do_bar, q_free, do_free = barriers
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile = lax.axis_index("kv_tiles")
        kv_h = lax.div(h, group)
        cta_first = first_step(tile * (wgs * bkv))

        @pl.when(wg < wgs)
        def _consumer():
            if not interpret:
                plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
            kv_base = tile * (wgs * bkv) + wg * bkv
            rows = (b, pl.ds(kv_base, bkv), kv_h)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            my_a = a_smem.at[wg] if a_smem is not None else None
            plgpu.copy_gmem_to_smem(k_ref.at[rows], my_k, in_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], my_v, in_bar.at[wg])
            plgpu.barrier_wait(in_bar.at[wg])
            my_first = first_step(kv_base)
            # q blocks at or after this step see every key of the tile.
            full_from = _cdiv(kv_base + bkv - 1, bq) if causal else 0
            full_from = jnp.maximum(jnp.minimum(full_from, total_q_steps), my_first)

            def step(s, carry, *, masked: bool):
                dk, dv = carry
                slot = lax.rem(s - cta_first, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                overlap = config.overlap and want_dk
                if overlap:
                    plgpu.barrier_wait(do_bar.at[slot])
                    logits_t, dp_t = _mma2(
                        my_k, q_smem.at[slot].T, my_v, do_smem.at[slot].T, (bkv, bq)
                    )
                else:
                    logits_t = _mma(my_k, q_smem.at[slot].T, (bkv, bq))
                lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                p_t = jnp.exp2(logits_t * c - lax.broadcast_in_dim(lse, (bkv, bq), (1,)))
                if masked:
                    q_idx = _iota((bkv, bq), 1) + s * bq
                    p_t = jnp.where(q_idx >= _iota((bkv, bq), 0) + kv_base, p_t, 0.0)
                if not overlap:
                    plgpu.barrier_wait(do_bar.at[slot])
                if want_dv:
                    dv = _mma_acc(dv, p_t.astype(dtype), do_smem.at[slot], my_a, interpret)
                if want_dk:
                    if not overlap:
                        dp_t = _mma(my_v, do_smem.at[slot].T, (bkv, bq))
                    delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, (bkv, bq), (1,)))
                    dk = _mma_acc(dk, ds_t.astype(dtype), q_smem.at[slot], my_a, interpret)
                # lse and delta were read through the generic proxy; the producer's next
                # TMA into this slot writes through the async proxy. Pallas orders the two
                # only through commit_smem (fence.proxy.async) before the free: the race
                # detector reports the slot's reuse as a race without it (NOTES.md).
                plgpu.commit_smem()
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            def skip(s, _):
                slot = lax.rem(s - cta_first, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(do_bar.at[slot])
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])

            lax.fori_loop(cta_first, my_first, skip, None)
            carry = (
                _zeros((bkv, head_dim)) if want_dk else None,
                _zeros((bkv, head_dim)) if want_dv else None,
            )
            carry = lax.fori_loop(my_first, full_from, lambda s, a: step(s, a, masked=True), carry)
            carry = lax.fori_loop(
                full_from, total_q_steps, lambda s, a: step(s, a, masked=False), carry
            )
            dk, dv = carry
            results = []
            if want_dk:
                results.append((dk * scale, my_k))
            if want_dv:
                results.append((dv, my_v))
            out_rows = (b, pl.ds(kv_base, bkv), h)
            for value, buf in results:
                buf[...] = value.astype(dtype)
            plgpu.commit_smem()
            for (_, buf), out_ref in zip(results, out_refs, strict=True):
                plgpu.copy_smem_to_gmem(buf, out_ref.at[out_rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _producer():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")

            def load(step, slot):
                rows = (b, pl.ds(step * bq, bq), h)
                vec = (b, h, pl.ds(step * bq, bq))
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot], do_bar.at[slot])

            _stream(load, total_q_steps, cta_first, stages, (q_free, do_free), total_q_steps)

    scratch = (
        _smem((wgs, bkv, head_dim), dtype),
        _smem((wgs, bkv, head_dim), dtype),
        _smem((stages, bq, head_dim), dtype),
        _smem((stages, bq, head_dim), dtype),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        _smem((wgs, bkv, bq), dtype) if interpret else None,
        (
            plgpu.Barrier(num_arrivals=2, num_barriers=wgs),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        ),
    )
    out_type = tuple(
        jax.ShapeDtypeStruct((batch, s_pad, num_heads, head_dim), dtype) for _ in range(num_out)
    )
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=(scratch,),
        grid=(num_heads, num_kv_tiles, batch),
        grid_names=("heads", "kv_tiles", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q, k, v, do, lse, delta)
