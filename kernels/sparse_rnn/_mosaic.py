"""The sparse RNN forward as one persistent Pallas Mosaic GPU kernel (the paper's design).

One CTA per block of units (`weights.num_blocks`, all co-resident: one per SM). Each CTA copies
its packed rows (`gates * units` rows of `slots` 4-byte words) into shared memory once and keeps
them there for all steps, next to a float16 copy of the whole hidden state `h[column, batch]`.
Per step, in raw IR (`_mosaic_ir`; Pallas has no per-lane gather):

1. gathers: warp per row, lane per slot, one `2 * batch`-byte load of `h[column]` from shared
   memory per slot, float32 accumulation, a shuffle tree per row -> `m` (shared memory);
2. cell: one thread per (unit, batch element): `x_proj` (loaded before the gathers) + `m`,
   the cell math in float32 (LSTM `c` / GRU `h` of the CTA's own units stay in shared memory),
   `h_t` written as float32 (output), as float16 (the exchange buffer), `c_t` and `m` (outputs,
   for the backward);
3. grid barrier: a CTA barrier, then thread 0 adds 1 to a global semaphore
   (`red.release.gpu`) and spins, bounded, on it (`ld.acquire.gpu`) until all CTAs of the step
   arrived; a CTA barrier releases the others. A spin that reaches `max_spins` counts a
   timeout (later spins then try once), the kernel finishes, and the caller poisons the
   outputs with NaN and raises (as the Triton kernel does);
4. refresh: every thread copies a share of the new float16 state slab from global memory into
   shared memory (16-byte volatile loads: they bypass L1, so no stale line can be read).

The backward is the Triton persistent backward (`_kernel.backward_persistent`) on this kernel's
float32 outputs. Slot order: "packed" (default) keeps the packing's column order;
"conflict_free" permutes each row's slots so that the lanes of every shared-memory wavefront
read distinct bank groups where the row allows it (`conflict_free_order`). Measured on an H100
(2026-11-22), "packed" was faster: 8.04 against 9.63 us/step at hidden 2304, batch 4, density
30% (neighbouring columns share lines of the float16 state; the permutation's bank gain did not
pay for that).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpp.kernels.sparse_rnn import _cells, _kernel, _mosaic_ir

SLOT_ORDERS = ("conflict_free", "packed")
#: Shared memory of one CTA on an H100 (227 KiB); Mosaic GPU refuses more.
MAX_SMEM_BYTES = 232448
BATCHES = (1, 2, 4, 8)
_FLAG_WORDS = 4


@dataclasses.dataclass(frozen=True, slots=True)
class MosaicConfig:
    """A Mosaic build: the Triton config's shapes (its backward runs on the outputs) + order."""

    base: _kernel.KernelConfig
    slot_order: str = "packed"

    def __post_init__(self):
        if self.slot_order not in SLOT_ORDERS:
            raise ValueError(
                f"slot_order={self.slot_order!r} is not one of {SLOT_ORDERS}. Fix: pick one."
            )

    @property
    def rows(self) -> int:
        return self.base.gates * self.base.units

    @property
    def threads(self) -> int:
        return 32 * self.base.num_warps

    def smem_bytes(self) -> int:
        """Shared memory per CTA: words, the float16 state, `m`, the cell state, flags."""
        b = self.base
        return 4 * (
            self.rows * b.slots + b.hidden * b.batch // 2 + self.rows * b.batch
            + b.units * b.batch + _FLAG_WORDS
        )  # fmt: skip


def check(cfg: MosaicConfig) -> None:
    """Raises `ValueError` (with the fix) for a build the Mosaic kernel cannot run."""
    b = cfg.base
    fix = "Fix: use implementation='persistent' (the Triton kernel)"
    if b.batch not in BATCHES:
        raise ValueError(
            f"implementation='mosaic' gathers batch {b.batch} (padded) values per column in one "
            f"load; it supports padded batches {BATCHES}. {fix}, or split the batch."
        )
    if b.num_warps % 4 or not 4 <= b.num_warps <= 32:
        raise ValueError(
            f"num_warps={b.num_warps}: implementation='mosaic' runs whole warpgroups (4 warps); "
            "use 4, 8, ..., 32."
        )
    if (b.hidden * b.batch * 2) % 16:
        raise ValueError(
            f"hidden={b.hidden} x batch {b.batch} float16 state slabs are not a multiple of "
            f"16 bytes (the refresh's load width). {fix}, or pad hidden to a multiple of 8."
        )
    if b.units * b.batch > cfg.threads * 8:
        raise ValueError(f"{b.units} units x batch {b.batch} per CTA is too many cells. {fix}.")
    if b.steps * b.gates * b.hidden * b.batch >= 1 << 31:
        raise ValueError(
            f"{b.steps} steps x {b.gates * b.hidden} gate-rows x batch {b.batch} overflows the "
            "kernel's 32-bit indices. Fix: split the sequence (pass the last h and c on)."
        )
    if cfg.smem_bytes() > MAX_SMEM_BYTES:
        raise ValueError(
            f"implementation='mosaic' keeps a block's {cfg.rows} rows x {b.slots} slots of "
            f"weights and the float16 state in shared memory: {cfg.smem_bytes()} bytes per CTA, "
            f"more than the {MAX_SMEM_BYTES} an H100 SM has. {fix}, a lower density, or more "
            "blocks (num_blocks)."
        )


# ---------------------------------------------------------------------------------- packing


def bank_groups(batch: int) -> int:
    """Lanes served by one shared-memory wavefront for a `2 * batch`-byte gather.

    A wavefront moves 128 bytes (32 banks of 4 bytes): 32 lanes of 2- or 4-byte gathers, 16
    lanes of 8-byte ones, 8 lanes of 16-byte ones.

    Example:
        >>> [bank_groups(b) for b in (1, 2, 4, 8)]
        [32, 32, 16, 8]
    """
    return 32 // max(1, (2 * batch) // 4)


def bank_group(columns: jax.Array, batch: int) -> jax.Array:
    """The bank group of each gathered column: lanes of one wavefront with distinct groups
    (or the same column) read without conflict.

    Example:
        >>> bank_group(jnp.array([0, 1, 16, 17, 33]), 4).tolist()
        [0, 1, 0, 1, 1]
    """
    groups = bank_groups(batch)
    first_bank = (columns * (2 * batch)) // 4
    return (first_bank // max(1, (2 * batch) // 4)) % groups


def conflict_free_order(columns: jax.Array, valid: jax.Array, batch: int) -> jax.Array:
    """Per row (last axis), a permutation of the slots: `new[..., s] = old[..., perm[..., s]]`.

    The row's valid slots are sorted by bank group (then column) and dealt out phase by
    phase: with `G = bank_groups(batch)` lanes per wavefront and `P = slots / G` wavefronts
    ("phases") per row, sorted item `i` goes to phase `i % P`, lane `i // P` of it. A group
    with at most `P` items so lands in distinct phases; a larger group (unavoidable when a
    group holds more than its share of the row) doubles up in as few phases as possible.
    Padding slots (value 0) come last in the sort. Jit-able (the pattern may be traced).

    Example:
        >>> cols = jnp.stack([jnp.arange(16), jnp.arange(16, 32)], 1).reshape(1, 32)
        >>> cols[0, :4].tolist()  # lanes 0 and 1 both read bank group 0, and so on
        [0, 16, 1, 17]
        >>> perm = conflict_free_order(cols, cols >= 0, batch=4)
        >>> int(wavefronts(cols, 4)[0]), int(wavefronts(jnp.take_along_axis(cols, perm, -1), 4)[0])
        (4, 2)
    """
    slots = columns.shape[-1]
    groups = bank_groups(batch)
    phases = slots // groups
    key = bank_group(columns, batch).astype(jnp.int32) * (1 << 16) + columns
    key = jnp.where(valid, key, (1 << 30) + jnp.arange(slots, dtype=jnp.int32))
    order = jnp.argsort(key, axis=-1, stable=True)
    s = jnp.arange(slots)
    return jnp.take(order, (s % groups) * phases + s // groups, axis=-1)


def conflict_free_slots(
    columns: jax.Array, valid: jax.Array, batch: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(perm, columns, valid)` in `conflict_free_order`; padding slots (value 0) read the
    column of their wavefront's first lane (always a valid slot), a broadcast, no conflict."""
    perm = conflict_free_order(columns, valid, batch)
    columns = jnp.take_along_axis(columns, perm, axis=-1)
    valid = jnp.take_along_axis(valid, perm, axis=-1)
    lead = jnp.repeat(columns[..., :: bank_groups(batch)], bank_groups(batch), axis=-1)
    return perm, jnp.where(valid, columns, lead), valid


def pack_words(values, columns, valid, *, batch: int, slot_order: str) -> jax.Array:
    """`(blocks, gates, units, slots)` -> int32 words `(blocks * gates * units * slots,)`.

    Per CTA, row `g * units + u`, slot-major within the row; word = 16-bit value << 16 |
    column. With "conflict_free", each row's slots are permuted (`conflict_free_order`) and
    padding slots read the column of their wavefront's first lane (a broadcast, no conflict).
    """
    values = values if values.dtype in (jnp.bfloat16, jnp.float16) else values.astype(jnp.bfloat16)
    columns = columns.astype(jnp.int32)
    if slot_order == "conflict_free":
        perm, columns, valid = conflict_free_slots(columns, valid, batch)
        values = jnp.take_along_axis(values, perm, axis=-1)
        values = jnp.where(valid, values, jnp.zeros((), values.dtype))
    bits = jax.lax.bitcast_convert_type(values, jnp.uint16).astype(jnp.int32)
    return (jnp.left_shift(bits, 16) | columns).reshape(-1)


def wavefronts(columns: jax.Array, batch: int) -> jax.Array:
    """Shared-memory wavefronts of each row's gathers, `(..., )`: per phase of
    `bank_groups(batch)` lanes, the most distinct columns any bank group gets (>= 1).

    Example:
        >>> cols = jnp.arange(32)[None]  # 32 neighbouring columns, B=4: 2 phases of 16
        >>> int(wavefronts(cols, 4)[0])
        2
    """
    groups = bank_groups(batch)
    c = columns.reshape(*columns.shape[:-1], -1, groups)  # (..., phases, lanes)
    g = bank_group(c, batch)
    same_group = g[..., :, None] == g[..., None, :]
    # A lane counts for its group unless an earlier lane of the phase reads the same column.
    lane = jnp.arange(groups)
    repeat = jnp.any((c[..., :, None] == c[..., None, :]) & (lane[None, :] < lane[:, None]), -1)
    distinct = same_group & ~repeat[..., None, :]
    return jnp.max(jnp.sum(distinct, axis=-1), axis=-1).sum(axis=-1)


# ----------------------------------------------------------------------------------- kernel


@functools.partial(jax.jit, static_argnames="cfg")
def forward(cfg: MosaicConfig, x, words, h0, s0):
    """The whole forward in one launch.

    Args: `x` `(steps * gates * hidden * batch,)` float32 (kernel layout: step, gate-row,
    batch), `words` from `pack_words`, `h0` `(hidden * batch,)` (float32), `s0` the same for
    the cell state (LSTM `c0`; GRU reads `h0`; tanh ignores it).

    Returns:
        `(h, c, m, timeouts)`: `h`, `c` `(steps * hidden * batch,)` float32 (`c` zeros for
        cells without one), `m` `(steps * gates * hidden * batch,)` the recurrent products,
        `timeouts` `(blocks,)` int32.
    """
    check(cfg)
    if cfg.base.interpret:  # no GPU: the same math and layouts in XLA (see `forward_emulated`)
        return forward_emulated(cfg, x, words, h0, s0)
    b = cfg.base
    hidden, batch, steps, gh = b.hidden, b.batch, b.steps, b.gates * b.hidden
    f32 = jnp.float32
    lstm = b.cell == "lstm"
    out_type = [
        jax.ShapeDtypeStruct((steps * hidden * batch,), f32),  # h
        jax.ShapeDtypeStruct((steps * gh * batch,), f32),  # m
        jax.ShapeDtypeStruct((steps * hidden * batch,), jnp.float16),  # the exchange buffer
        jax.ShapeDtypeStruct((b.blocks,), jnp.int32),  # timeouts
    ]
    if lstm:
        out_type.append(jax.ShapeDtypeStruct((steps * hidden * batch,), f32))  # c
    scratch = [
        plgpu.SMEM((hidden * batch,), jnp.float16),  # first: 16-byte aligned for the refresh
        plgpu.SMEM((cfg.rows * b.slots,), jnp.int32),
        plgpu.SMEM((cfg.rows * batch,), f32),
        plgpu.SMEM((b.units * batch,), f32),
        plgpu.SMEM((_FLAG_WORDS,), jnp.int32),
    ]
    ref = plgpu.RefType()
    n_refs = 5 + len(out_type) + len(scratch)  # inputs + semaphore + outputs + scratch

    def body(*refs):
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR(()))
        refs = refs[:4] + (sem,) + refs[4:]
        plgpu.inline_mgpu(arg_types=(ref,) * n_refs)(functools.partial(_kernel_ir, cfg=cfg))(*refs)

    kernel = plgpu.kernel(
        body,
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=(b.blocks,),
        grid_names=("cta",),
        num_threads=b.num_warps // 4,
        thread_name="wg",
        kernel_name="sparse_rnn_forward_mosaic",
    )
    h, m, _, timeouts, *c = kernel(x, words, h0.astype(jnp.float16), s0.astype(f32))
    c = c[0] if lstm else jnp.zeros_like(h)
    return h, c, m, timeouts


def forward_emulated(cfg: MosaicConfig, x, words, h0, s0):
    """`forward` in XLA, index for index (CPU tests: the kernel itself has no interpret mode).

    Decodes the same words, gathers the float16 state per CTA row (`g * units + u`), sums in
    float32, applies the cell and writes the same flat layouts, so the packing, the slot
    order and the wrapper's layouts are checked on a CPU; the raw IR is not.
    """
    b = cfg.base
    hidden, batch, gates, units, blocks = b.hidden, b.batch, b.gates, b.units, b.blocks
    gh = gates * hidden
    w = words.reshape(blocks, cfg.rows, b.slots)
    cols = w & 0xFFFF
    bits = jax.lax.shift_right_logical(w, 16).astype(jnp.uint16)
    vals = jax.lax.bitcast_convert_type(bits, jnp.dtype(b.value_dtype)).astype(jnp.float32)
    h16 = h0.astype(jnp.float16).reshape(hidden, batch)
    state = s0.astype(jnp.float32).reshape(hidden, batch)

    def step(carry, x_t):
        h16, state = carry
        rows = jnp.sum(vals[..., None] * h16.astype(jnp.float32)[cols], axis=2)
        m_t = rows.reshape(blocks, gates, units, batch).transpose(1, 0, 2, 3).reshape(gh, batch)
        xs = jnp.split(x_t.reshape(gh, batch), gates)
        ms = jnp.split(m_t, gates)
        h, c = _cells.cell_forward(b.cell, xs, ms, state, state)
        state = c if b.cell == "lstm" else h
        return (h.astype(jnp.float16), state), (h, c, m_t)

    _, (h, c, m) = jax.lax.scan(step, (h16, state), x.reshape(b.steps, -1))
    if b.cell != "lstm":
        c = jnp.zeros_like(h)
    timeouts = jnp.zeros((blocks,), jnp.int32)
    return h.reshape(-1), c.reshape(-1), m.reshape(-1), timeouts


def _kernel_ir(ctx, *refs, cfg: MosaicConfig):
    del ctx
    b = cfg.base
    lstm, gru = b.cell == "lstm", b.cell == "gru"
    x_g, w_g, h0_g, s0_g, sem, h_out, m_out, hx, err = refs[:9]
    c_out = refs[9] if lstm else None
    h_s, w_s, m_s, s_s, flag_s = refs[-5:]
    m = _mosaic_ir.mlir()
    ir, arith, utils, gpu = m.ir, m.arith, m.utils, m.gpu
    i32, f32, f16 = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.F16Type.get()
    index = ir.IndexType.get()
    hidden, batch, units, gates = b.hidden, b.batch, b.units, b.gates
    threads, rows = cfg.threads, cfg.rows
    cells = units * batch
    per_thread = -(-cells // threads)  # (unit, batch) pairs per thread

    def c_(v, ty=i32):
        return utils.c(v, ty)

    def idx(v):
        return arith.index_cast(index, v)

    def lt(a, bound):
        return arith.cmpi(arith.CmpIPredicate.slt, a, bound)

    tid = utils.thread_idx()
    cta = utils.block_idx()
    unit0 = arith.muli(cta, c_(units))  # the CTA's first unit
    is_first = arith.cmpi(arith.CmpIPredicate.eq, tid, c_(0))

    # -- once: weights, h0 (float16) and the CTA's cell state into shared memory.
    base = arith.muli(idx(cta), utils.c(rows * b.slots, index))
    _mosaic_ir.strided_copy(w_g, w_s, rows * b.slots, threads=threads, src_offset=base)
    _mosaic_ir.strided_copy(h0_g, h_s, hidden * batch, threads=threads)
    own = arith.muli(idx(unit0), utils.c(batch, index))
    _mosaic_ir.strided_copy(s0_g, s_s, cells, threads=threads, src_offset=own)
    with utils.when(is_first):
        m.memref.store(c_(0), flag_s, [utils.c(0, index)])
    gpu.barrier()

    def cell_slots():  # this thread's (unit, batch) pairs: (pair index e, valid flag)
        for k in range(per_thread):
            e = arith.addi(tid, c_(k * threads))
            yield e, lt(e, c_(cells))

    def sigmoid(a):
        one = utils.c(1.0, f32)
        return arith.divf(one, arith.addf(one, m.math.exp(arith.negf(a))))

    def row_store(row, lane, total):  # lane 0 writes the row's m (batch values) to SMEM
        with utils.when(arith.cmpi(arith.CmpIPredicate.eq, lane, c_(0))):
            m.vector.store(total, m_s, [idx(arith.muli(row, c_(batch)))])

    @utils.fori(c_(b.steps), None)
    def _(t, carry):
        # x_proj of this thread's cells, loaded before the gathers (off the critical path).
        xs = {}
        for k, (e, ok) in enumerate(cell_slots()):
            e = arith.select(ok, e, c_(0))
            u, bb = arith.divui(e, c_(batch)), arith.remui(e, c_(batch))
            for g in range(gates):
                row = arith.addi(arith.addi(arith.muli(t, c_(gates * hidden)), c_(g * hidden)),
                                 arith.addi(unit0, u))  # fmt: skip
                xs[k, g] = m.memref.load(x_g, [idx(arith.addi(arith.muli(row, c_(batch)), bb))])
        # 1. gathers -> m_s (rows x batch).
        _mosaic_ir.row_products(
            w_s, h_s, row_store, rows=rows, chunks=b.slots // 32, threads=threads,
            batch=batch, value_dtype=b.value_dtype, unroll=2,
        )  # fmt: skip
        gpu.barrier()
        # 2. the cell, one thread per (unit, batch element).
        for k, (e, ok) in enumerate(cell_slots()):
            with utils.when(ok):
                u, bb = arith.divui(e, c_(batch)), arith.remui(e, c_(batch))
                ms = [
                    m.memref.load(m_s, [idx(arith.addi(
                        arith.muli(arith.addi(c_(g * units), u), c_(batch)), bb))])
                    for g in range(gates)
                ]  # fmt: skip
                pre = [arith.addf(xs[k, g], ms[g]) for g in range(gates)]
                if lstm:
                    c_prev = m.memref.load(s_s, [idx(e)])
                    i_g, f_g, o_g = sigmoid(pre[0]), sigmoid(pre[1]), sigmoid(pre[3])
                    c_new = arith.addf(
                        arith.mulf(f_g, c_prev), arith.mulf(i_g, m.math.tanh(pre[2]))
                    )
                    h = arith.mulf(o_g, m.math.tanh(c_new))
                    m.memref.store(c_new, s_s, [idx(e)])
                elif gru:
                    h_prev = m.memref.load(s_s, [idx(e)])
                    r_g, z_g = sigmoid(pre[0]), sigmoid(pre[1])
                    n_g = m.math.tanh(arith.addf(xs[k, 2], arith.mulf(r_g, ms[2])))
                    one = utils.c(1.0, f32)
                    h = arith.addf(arith.mulf(arith.subf(one, z_g), n_g), arith.mulf(z_g, h_prev))
                    m.memref.store(h, s_s, [idx(e)])
                else:
                    h = m.math.tanh(pre[0])
                # Outputs: slab t of h, c, the float16 exchange copy, and m (gate rows).
                at = idx(arith.addi(
                    arith.muli(arith.addi(arith.muli(t, c_(hidden)), arith.addi(unit0, u)),
                               c_(batch)), bb))  # fmt: skip
                m.memref.store(h, h_out, [at])
                m.memref.store(arith.truncf(f16, h), hx, [at])
                if lstm:
                    m.memref.store(c_new, c_out, [at])
                for g in range(gates):
                    row = arith.addi(
                        arith.addi(arith.muli(t, c_(gates * hidden)), c_(g * hidden)),
                        arith.addi(unit0, u),
                    )
                    m.memref.store(ms[g], m_out, [idx(arith.addi(arith.muli(row, c_(batch)), bb))])
        # 3. grid barrier: one arrival per CTA, thread 0 spins (bounded).
        gpu.barrier()
        with utils.when(is_first):
            _grid_arrive_and_wait(m, sem, flag_s, arith.muli(arith.addi(t, c_(1)), c_(b.blocks)),
                                  b.max_spins)  # fmt: skip
        gpu.barrier()
        # 4. refresh the float16 state from slab t of the exchange buffer.
        _refresh(m, hx, h_s, t, hidden * batch, threads)
        gpu.barrier()
        return carry

    with utils.when(is_first):
        m.memref.store(m.memref.load(flag_s, [utils.c(0, index)]), err, [idx(cta)])


def _grid_arrive_and_wait(m, sem, flag_s, target, max_spins: int) -> None:
    """Thread 0: arrive (release) and spin (acquire) until `sem >= target`, bounded.

    After a first timeout (counted in `flag_s[0]`) the bound drops to one read, so a broken
    launch ends quickly.
    """
    ir, arith, utils, llvm, scf = m.ir, m.arith, m.utils, m.llvm, m.scf
    i32 = ir.IntegerType.get_signless(32)
    zero = utils.c(0, ir.IndexType.get())
    ptr = utils.memref_ptr(sem)
    always = utils.c(1, ir.IntegerType.get_signless(1))  # the caller runs this in thread 0 only
    utils.SemaphoreRef(ptr).signal(1, predicate=always, memory_scope="gpu")

    def read():
        return llvm.inline_asm(
            i32, [ptr], "ld.acquire.gpu.u32 $0,[$1];", "=r,l", has_side_effects=True
        )

    timeouts = m.memref.load(flag_s, [zero])
    bound = arith.select(
        arith.cmpi(arith.CmpIPredicate.eq, timeouts, utils.c(0, i32)),
        utils.c(max_spins, i32), utils.c(1, i32),
    )  # fmt: skip
    loop = scf.WhileOp([i32, i32], [utils.c(0, i32), read()])
    before = loop.before.blocks.append(i32, i32)
    with ir.InsertionPoint(before):
        n, value = before.arguments
        waiting = arith.cmpi(arith.CmpIPredicate.slt, value, target)
        scf.condition(
            arith.andi(waiting, arith.cmpi(arith.CmpIPredicate.slt, n, bound)), [n, value]
        )
    after = loop.after.blocks.append(i32, i32)
    with ir.InsertionPoint(after):
        n, _ = after.arguments
        scf.yield_([arith.addi(n, utils.c(1, i32)), read()])
    late = arith.cmpi(arith.CmpIPredicate.slt, loop.results[1], target)
    m.memref.store(arith.addi(timeouts, arith.extui(i32, late)), flag_s, [zero])


def _refresh(m, hx, h_s, t, n_halves: int, threads: int) -> None:
    """`h_s[:] = hx[t * n : (t + 1) * n]` in 16-byte volatile loads (L1 bypassed)."""
    ir, arith, utils, llvm = m.ir, m.arith, m.utils, m.llvm
    i32 = ir.IntegerType.get_signless(32)
    v4 = ir.VectorType.get((4,), i32)
    n_vec = n_halves // 8
    src = utils.memref_ptr(hx)
    dst = utils.memref_ptr(h_s)
    tid = utils.thread_idx()
    slab = arith.muli(t, utils.c(n_vec, i32))

    @utils.fori(utils.c(-(-n_vec // threads), i32), None)
    def _(i, carry):
        j = arith.addi(tid, arith.muli(i, utils.c(threads, i32)))
        with utils.when(arith.cmpi(arith.CmpIPredicate.slt, j, utils.c(n_vec, i32))):
            v = llvm.load(v4, utils.getelementptr(src, [arith.addi(slab, j)], v4), alignment=16,
                          volatile_=True)  # fmt: skip
            llvm.store(v, utils.getelementptr(dst, [j], v4), alignment=16)
        return carry
