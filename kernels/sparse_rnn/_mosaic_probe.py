"""Feasibility probe: can Pallas Mosaic GPU hold a sparse persistent RNN step? (issue 8).

Three pieces, each small enough to lower for CUDA on a CPU machine
(`jax.export` with ``platforms=["cuda"]`` runs the whole Mosaic GPU lowering):

- `sync_probe`: a persistent grid (one CTA per SM) that loops over ``steps``
  timesteps and synchronises all CTAs after every step through one global
  semaphore (``pl.get_global`` + ``plgpu.semaphore_signal`` + a bounded spin on
  ``pl.semaphore_read``). Returns the spin count of every CTA; a count equal to
  ``spin_limit`` per step means the barrier gave up (CTAs not co-resident).
- `gather_probe`: the packed weights of one CTA (``slots`` 32-bit words) and the
  16-bit hidden state are copied once into shared memory; every step each warp
  takes a row, each lane reads a word (16-bit column, 16-bit bfloat16 weight),
  gathers the ``batch`` float16 values of that column from shared memory with
  one 8-byte load, and accumulates the products in float32; a warp shuffle tree
  sums the 32 lanes. Pallas offers no per-lane gather (see `FINDINGS`), so the
  step body is raw Mosaic GPU IR through ``plgpu.inline_mgpu``. With
  ``sync=True`` the steps are also separated by the grid barrier of
  `sync_probe`, which makes it a persistent step without the cell math.
- `gather_reference`: the same products in plain jnp.

Word format (this probe's own; `_weights.py` packs differently): bits 0-15 the
column, bits 16-31 the bfloat16 weight. The state is ``h[column, batch]``
float16, flattened.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpp.kernels.sparse_rnn import _mosaic_ir

#: What Mosaic GPU (jax 0.11.2) can express for the design, checked by
#: `tests/kernels/test_sparse_rnn_mosaic_probe.py` (each "no" with its error).
FINDINGS = {
    "a_persistent_grid": "yes: plgpu.kernel(grid=(132,)) + lax.fori_loop over steps",
    "b_grid_sync": (
        "yes: pl.get_global(plgpu.SemaphoreType.REGULAR(())), "
        "plgpu.semaphore_signal(sem, 1, memory_scope='gpu') (red.release.gpu.add), "
        "bounded spin lax.while_loop on pl.semaphore_read (ld.acquire.sys); "
        "global semaphores are zeroed by every call"
    ),
    "c_smem_resident": (
        "yes: scratch_types=[plgpu.SMEM(...)] up to 227 KiB (232,448 B) per CTA; "
        "198 KiB words + 18 KiB float16 state = 216 KiB lowers, 240 KiB is refused"
    ),
    "d_lane_gather": (
        "not in Pallas (ref[idx_vector] and plgpu.load of ref.at[idx_vector]: "
        "'int_indexer_shape non-empty'; jnp.take: 'Unsupported layout' (Lane) / "
        "'Unimplemented primitive ... gather' (Warpgroup)); scalar ref[dynamic_i] "
        "only (uniform). yes through plgpu.inline_mgpu: per-thread memref.load / "
        "llvm.load from the shared-memory buffer at a thread-dependent address"
    ),
    "e_f32_accumulation": "yes: arith.extf bf16/f16 -> f32 and vector fma inside inline_mgpu",
}

_WORD_COLUMN_BITS = 16


def pack_probe_words(columns: jax.Array, weights: jax.Array) -> jax.Array:
    """Packs int columns (< 2**16) and weights into uint32 words (bf16 high half)."""
    w_bits = jax.lax.bitcast_convert_type(weights.astype(jnp.bfloat16), jnp.uint16)
    return (w_bits.astype(jnp.uint32) << _WORD_COLUMN_BITS) | columns.astype(jnp.uint32)


def random_probe_inputs(
    key: jax.Array, *, grid: int, rows: int, slots_per_row: int, hidden: int, batch: int
) -> tuple[jax.Array, jax.Array]:
    """Random words ``(grid, rows * slots_per_row)``, float16 state ``(hidden * batch,)``."""
    k_col, k_w, k_h = jax.random.split(key, 3)
    shape = (grid, rows * slots_per_row)
    # Sorted within each row, as in the kernel's column order: the 32 lanes of a chunk read
    # ~32 / density neighbouring columns (uniform columns, not the exact sparsity pattern).
    columns = jax.random.randint(k_col, (grid, rows, slots_per_row), 0, hidden)
    columns = jnp.sort(columns, axis=-1).reshape(shape)
    weights = jax.random.normal(k_w, shape, jnp.float32) * 0.05
    h = jax.random.uniform(k_h, (hidden * batch,), jnp.float32, -1.0, 1.0)
    return pack_probe_words(columns, weights), h.astype(jnp.float16)


def gather_reference(words: jax.Array, h: jax.Array, *, rows: int, batch: int) -> jax.Array:
    """``y[cta, row, b] = sum_slot w * h[column, b]`` in float32; shape ``(grid, rows, batch)``."""
    columns = (words & 0xFFFF).astype(jnp.int32)
    w_bits = (words >> _WORD_COLUMN_BITS).astype(jnp.uint16)
    w = jax.lax.bitcast_convert_type(w_bits, jnp.bfloat16).astype(jnp.float32)
    state = h.astype(jnp.float32).reshape(-1, batch)
    prod = w[..., None] * state[columns]  # (grid, slots, batch)
    grid = words.shape[0]
    return prod.reshape(grid, rows, -1, batch).sum(axis=2)


def _grid_barrier(sem, step, *, arrivals: int, spin_limit: int) -> jax.Array:
    """Signals ``sem`` once (per warpgroup) and spins until all ``arrivals`` of ``step`` came.

    The counter only grows within a call (it starts at zero), so the target of
    step ``t`` is ``(t + 1) * arrivals``; the spin gives up after ``spin_limit``
    reads and returns how many reads it took.
    """
    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
    target = (step + 1) * arrivals

    def cond(carry):
        n, value = carry
        return jnp.logical_and(value < target, n < spin_limit)

    def body(carry):
        n, _ = carry
        return n + 1, pl.semaphore_read(sem)

    n, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), pl.semaphore_read(sem)))
    return n


def sync_probe(*, grid: int = 132, steps: int = 256, spin_limit: int = 1 << 14) -> jax.Array:
    """Runs ``steps`` grid barriers over ``grid`` CTAs; returns each CTA's total spin count."""

    def body(out_ref):
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR(()))

        def step(t, spins):
            return spins + _grid_barrier(sem, t, arrivals=grid, spin_limit=spin_limit)

        spins = jax.lax.fori_loop(0, steps, step, jnp.int32(0))
        out_ref[jax.lax.axis_index("cta")] = spins

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((grid,), jnp.int32),
        grid=(grid,),
        grid_names=("cta",),
    )
    return kernel()


def gather_probe(
    words: jax.Array,
    h: jax.Array,
    *,
    rows: int,
    batch: int = 4,
    steps: int = 1,
    sync: bool = False,
    num_warpgroups: int = 4,
    spin_limit: int = 1 << 14,
) -> tuple[jax.Array, jax.Array]:
    """Shared-memory gather steps; returns ``(y (grid, rows, batch) f32, spins (grid,) i32)``.

    ``words`` is ``(grid, rows * slots_per_row)`` uint32 with ``slots_per_row`` a
    multiple of 32; ``h`` is ``(hidden * batch,)`` float16 with ``batch == 4``.
    Every step recomputes ``y`` from the resident buffers (a block barrier
    between steps keeps the compiler from hoisting them).
    """
    grid, slots = words.shape
    if batch != 4:
        raise ValueError(f"batch must be 4 (one 8-byte load per gather), got {batch}")
    if slots % (rows * 32):
        raise ValueError(f"slots {slots} must be rows {rows} x a multiple of 32")
    chunks = slots // rows // 32
    state_len = h.shape[0]
    threads = 128 * num_warpgroups
    words_i32 = jax.lax.bitcast_convert_type(words, jnp.int32).reshape(-1)

    def body(w_gmem, h_gmem, y_gmem, spin_gmem, w_smem, h_smem):
        cta = jax.lax.axis_index("cta")
        ref = plgpu.RefType()
        copy_in = plgpu.inline_mgpu(arg_types=(ref, ref, ref, ref))(
            functools.partial(_copy_in, slots=slots, state_len=state_len, threads=threads)
        )
        copy_in(w_gmem, h_gmem, w_smem, h_smem)
        step_fn = plgpu.inline_mgpu(arg_types=(ref, ref, ref))(
            functools.partial(_gather_step, rows=rows, chunks=chunks, threads=threads)
        )
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR(())) if sync else None

        def step(t, spins):
            step_fn(w_smem, h_smem, y_gmem)
            if sync:
                spins = spins + _grid_barrier(
                    sem, t, arrivals=grid * num_warpgroups, spin_limit=spin_limit
                )
            return spins

        spins = jax.lax.fori_loop(0, steps, step, jnp.int32(0))
        spin_gmem[cta] = spins

    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((grid * rows * batch,), jnp.float32),
            jax.ShapeDtypeStruct((grid,), jnp.int32),
        ),
        grid=(grid,),
        grid_names=("cta",),
        num_threads=num_warpgroups,
        thread_name="wg",
        scratch_types=[
            plgpu.SMEM((slots,), jnp.int32),
            plgpu.SMEM((state_len,), jnp.float16),
        ],
    )
    y, spins = kernel(words_i32, h)
    return y.reshape(grid, rows, batch), spins


# ---- raw Mosaic GPU IR (per-thread code; the shared pieces are in `_mosaic_ir.py`) ----


def _copy_in(ctx, w_gmem, h_gmem, w_smem, h_smem, *, slots, state_len, threads):
    """Every thread copies a strided share of this CTA's words and of the state."""
    del ctx
    m = _mosaic_ir.mlir()
    index = m.ir.IndexType.get()
    cta = m.arith.index_cast(index, m.utils.block_idx())
    base = m.arith.muli(cta, m.utils.c(slots, index))
    _mosaic_ir.strided_copy(w_gmem, w_smem, slots, threads=threads, src_offset=base)
    _mosaic_ir.strided_copy(h_gmem, h_smem, state_len, threads=threads)
    m.gpu.barrier()


def _gather_step(ctx, w_smem, h_smem, y_gmem, *, rows, chunks, threads):
    """One step: warp w takes rows w, w + warps, ...; lane l the slots l, l + 32, ..."""
    del ctx
    m = _mosaic_ir.mlir()
    ir, arith, utils = m.ir, m.arith, m.utils
    i32 = ir.IntegerType.get_signless(32)
    index = ir.IndexType.get()
    cta = utils.block_idx()

    def store(row, lane, total):
        out = arith.muli(arith.addi(arith.muli(cta, utils.c(rows, i32)), row), utils.c(4, i32))
        with utils.when(arith.cmpi(arith.CmpIPredicate.eq, lane, utils.c(0, i32))):
            m.vector.store(total, y_gmem, [arith.index_cast(index, out)])

    _mosaic_ir.row_products(w_smem, h_smem, store, rows=rows, chunks=chunks, threads=threads,
                            batch=4)  # fmt: skip
    m.gpu.barrier()
