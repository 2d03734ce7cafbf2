"""Raw Mosaic GPU IR shared by the probe (`_mosaic_probe.py`) and the Mosaic forward kernel.

Everything here runs inside `plgpu.inline_mgpu` bodies: per-thread MLIR built with the Python
bindings (like CUDA without the compiler's help). Pallas Mosaic GPU offers no per-lane gather
from shared memory (`_mosaic_probe.FINDINGS`), so the kernels' inner loops live here.

Word format (both kernels): bits 0-15 the column, bits 16-31 the 16-bit weight. The state in
shared memory is `h[column, batch]` in float16, flattened, so one gather reads the `batch`
values of one column (`2 * batch` bytes).
"""

from __future__ import annotations

import types


def mlir() -> types.SimpleNamespace:
    """The MLIR modules the IR builders use (imported lazily: they load jaxlib's MLIR)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, scf, vector
    from jax._src.lib.mlir.dialects import math as mlir_math
    from jax.experimental.mosaic.gpu import utils

    return types.SimpleNamespace(
        ir=ir, arith=arith, gpu=gpu, llvm=llvm, memref=memref, scf=scf, vector=vector,
        math=mlir_math, utils=utils,
    )  # fmt: skip


def strided_copy(src, dst, n: int, *, threads: int, src_offset=None) -> None:
    """`dst[j] = src[src_offset + j]` for `j < n`, element by element, threads striding."""
    m = mlir()
    index = m.ir.IndexType.get()
    tid = m.arith.index_cast(index, m.utils.thread_idx())
    step = m.utils.c(threads, index)

    @m.utils.fori(m.utils.c((n + threads - 1) // threads, index), None)
    def _(i, carry):
        j = m.arith.addi(tid, m.arith.muli(i, step))
        with m.utils.when(m.arith.cmpi(m.arith.CmpIPredicate.ult, j, m.utils.c(n, index))):
            src_j = j if src_offset is None else m.arith.addi(src_offset, j)
            m.memref.store(m.memref.load(src, [src_j]), dst, [j])
        return carry


def row_products(
    w_smem, h_smem, store, *, rows: int, chunks: int, threads: int, batch: int,
    value_dtype: str = "bfloat16", unroll: int = 1,
) -> None:  # fmt: skip
    """`store(row, lane, y)` with `y = sum_slot w * h[column, :]` (f32 `vector<batch>`).

    Warp `w` takes rows `w, w + warps, ...`; lane `l` the slots `l, l + 32, ...` of its row
    (`chunks * 32` slots per row, words row-major in `w_smem`). Each slot is one 4-byte word
    load and one `2 * batch`-byte gather, accumulated in float32; a shuffle tree sums the
    32 lanes and every lane gets the row's total (`store` decides who writes). `unroll`
    chunks per loop iteration (their loads first, then the products).
    """
    m = mlir()
    ir, arith, utils = m.ir, m.arith, m.utils
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    vacc = ir.VectorType.get((batch,), f32)
    vh = ir.VectorType.get((batch,), ir.F16Type.get())
    gather_ty = ir.IntegerType.get_signless(16 * batch)  # the address step of one column
    w_ty = ir.BF16Type.get() if value_dtype == "bfloat16" else ir.F16Type.get()
    index = ir.IndexType.get()
    warps = threads // 32
    tid = utils.thread_idx()
    warp = arith.shrui(tid, utils.c(5, i32))
    lane = arith.andi(tid, utils.c(31, i32))
    h_ptr = utils.memref_ptr(h_smem)
    row_slots = chunks * 32

    def load_slot(slot):
        word = m.memref.load(w_smem, [arith.index_cast(index, slot)])
        col = arith.andi(word, utils.c(0xFFFF, i32))
        w16 = arith.trunci(ir.IntegerType.get_signless(16), arith.shrui(word, utils.c(16, i32)))
        w = arith.extf(f32, arith.bitcast(w_ty, w16))
        addr = utils.getelementptr(h_ptr, [col], gather_ty)
        return w, m.llvm.load(vh, addr, alignment=2 * batch)

    def fma(acc, w, hv):
        return m.vector.fma(m.vector.broadcast(vacc, w), arith.extf(vacc, hv), acc)

    def chunk_group(acc, first, k0, count):
        loaded = [
            load_slot(arith.addi(first, arith.muli(arith.addi(k0, utils.c(j, i32)),
                                                   utils.c(32, i32))))
            for j in range(count)
        ]  # fmt: skip
        for w, hv in loaded:
            acc = fma(acc, w, hv)
        return acc

    @utils.fori(utils.c((rows + warps - 1) // warps, i32), None)
    def _(r, carry):
        row = arith.addi(warp, arith.muli(r, utils.c(warps, i32)))
        with utils.when(arith.cmpi(arith.CmpIPredicate.ult, row, utils.c(rows, i32))):
            first = arith.addi(arith.muli(row, utils.c(row_slots, i32)), lane)
            groups, tail = divmod(chunks, unroll)

            @utils.fori(utils.c(groups, i32), utils.c(0.0, vacc))
            def acc(i, acc):
                return chunk_group(acc, first, arith.muli(i, utils.c(unroll, i32)), unroll)

            total = acc.result
            if tail:
                total = chunk_group(total, first, utils.c(groups * unroll, i32), tail)
            for distance in (16, 8, 4, 2, 1):
                total = arith.addf(total, utils.shfl_bfly(total, distance))
            store(row, lane, total)
        return carry
