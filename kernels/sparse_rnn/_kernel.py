"""Pallas (Triton) kernels of the sparse RNN: one step per launch, and persistent.

Both variants run the same per-block code. Block `p` owns hidden units
`[p * units, (p + 1) * units)` with all their gates; per step it gathers the previous hidden
state at its rows' column indices (wide loads: the batch is the minor axis, so one gather
fetches every batch element of a column), multiplies by its non-zeros, accumulates in
float32, and applies the cell.

All state lives in 2-D `(rows, batch)` float32 buffers whose time slabs follow each other:
`hbuf[(t + 1) * hidden + j]` is `h_t[j]`, slab 0 holds `h0`.

Persistent kernel: one launch for the whole sequence, one program per SM. After writing its
slice of `h_t`, a block publishes the step count `t + 1` in its own stamp (`atomic_xchg`,
release ordering, after a block barrier); a consumer spins with volatile loads until every
block's stamp is current (a Lamport clock per producer; no grid-wide barrier) and then reads
slab `t` with ordinary loads. Those loads cannot hit stale L1 lines: slab `t` is written once,
and no block reads it before its stamps say it is complete. Every spin is bounded; a block that
gives up counts a timeout, carries on (so the grid still finishes) and reports the count.

Weights: each non-zero is one int32 word, the 16-bit value (bf16/f16) in the high half and the
column in the low half, laid out `(block, gate, chunk, unit, 32)` so that one chunk of a row
group is one contiguous `(units, 32)` tile. The first `resident_chunks` chunks of each row are
loaded once before the time loop and stay in registers; the rest are reloaded every step with
`evict_last` (L1/L2 resident).

Gathers read the previous state with gathered global loads (L1-cached). Pallas-Triton offers no
shared-memory gather; a variant through Triton's `gather` op did not finish on an H100 within
the benchmark's limit and was dropped (see benchmarks/README.md).

Variants (off by default; NOTES.md models them and the next GPU run decides):
`state_dtype="float16"` makes the forward kernel also write a 16-bit copy of each `h_t` slab and
gather from it (half the bytes and cache lines per gather; the cell math and the float32 `h`
slabs are unchanged). `prefetch=True` software-pipelines the chunk loop: the weight words of
chunk `c + 2` and the gathered rows of chunk `c + 1` are loaded before the products of chunk `c`,
so the loop no longer waits on two dependent memory latencies per iteration. `unroll=k` handles
`k` chunks per loop iteration (k independent loads per row group in flight; the backward has one
row group per unit, not one per gate, so it has 4x fewer loads in flight than an LSTM forward).
The backward's own options: `dm_dtype` (gather a 16-bit copy of `dm`, float16 with a per-step
power-of-two scale), `backward_fold` (row groups under 16 units as one folded 16-row tile) and
`backward_preload` (a step's own inputs loaded before its wait); NOTES.md "Backward variants".
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxpp.kernels.sparse_rnn import _cells

CHUNK = 32
_FOLD_ROWS = 16  # a folded row group is a (16, CHUNK) tile, like a full group of 16 units
STATE_DTYPES = ("float32", "float16", "bfloat16")
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class KernelConfig:
    """Static shape and tuning of one kernel build (hashable, so it keys jit caches)."""

    cell: str
    hidden: int
    gates: int
    blocks: int
    units: int
    slots: int
    transpose_slots: int
    batch: int  # padded to a power of two
    steps: int
    num_warps: int = 8
    num_stages: int = 1
    resident_chunks: int = 0
    max_spins: int = 1 << 20
    interpret: bool = False
    value_dtype: str = "bfloat16"
    state_dtype: str = "float32"  # dtype of the state copy the forward gathers from
    prefetch: bool = False  # software-pipelined chunk loop
    unroll: int = 1  # chunks per loop iteration
    dm_dtype: str = "float32"  # dtype of the `dm` copy the backward gathers from
    backward_fold: bool = False  # the backward's row groups under 16 units folded to 16 rows
    backward_preload: bool = False  # the backward loads a step's own inputs before its wait

    def __post_init__(self):
        if not (isinstance(self.unroll, int) and self.unroll >= 1):
            raise ValueError(f"unroll={self.unroll!r}; use a positive int (chunks per iteration).")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"state_dtype={self.state_dtype!r} is not one of {STATE_DTYPES}. Fix: pick one."
            )
        if self.dm_dtype not in STATE_DTYPES:
            raise ValueError(
                f"dm_dtype={self.dm_dtype!r} is not one of {STATE_DTYPES}. Fix: pick one."
            )

    @property
    def dm_staged(self) -> bool:
        """Whether the backward gathers from a separate (16-bit) copy of `dm`."""
        return self.dm_dtype != "float32"

    @property
    def folded_groups(self) -> tuple[tuple[int, int], ...]:
        """The backward's row groups that `backward_fold` runs folded (fewer than 16 units)."""
        if not self.backward_fold:
            return ()
        return tuple((r0, size) for r0, size in self.row_groups if size < _FOLD_ROWS)

    @property
    def dm_scaled(self) -> bool:
        """Whether that copy carries a per-step power-of-two scale (float16's narrow range)."""
        return self.dm_dtype == "float16"

    @property
    def staged(self) -> bool:
        """Whether the forward gathers from a separate (16-bit) copy of the state."""
        return self.state_dtype != "float32"

    @property
    def row_groups(self) -> tuple[tuple[int, int], ...]:
        """The units of a block as power-of-two groups `(offset, size)`, e.g. 18 -> 16 + 2."""
        groups, offset = [], 0
        for bit in reversed(range(self.units.bit_length())):
            size = 1 << bit
            if self.units & size:
                groups.append((offset, size))
                offset += size
        return tuple(groups)

    @property
    def stamp_slots(self) -> int:
        return 1 << max(0, (self.blocks - 1).bit_length())


def _compiler_params(cfg: KernelConfig):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def pack(values: jax.Array, columns: jax.Array) -> jax.Array:
    """`(blocks, gates, units, slots)` values and columns -> int32 words, kernel layout.

    Returns `(blocks * gates * chunks * units, CHUNK)`: row `((p * gates + g) * chunks + c) *
    units + u` holds chunk `c` of unit `u`'s gate `g` row.
    """
    blocks, gates, units, slots = values.shape
    bits = jax.lax.bitcast_convert_type(values, jnp.uint16).astype(jnp.int32)
    words = jnp.left_shift(bits, 16) | columns.astype(jnp.int32)
    words = words.reshape(blocks, gates, units, slots // CHUNK, CHUNK).transpose(0, 1, 3, 2, 4)
    return words.reshape(-1, CHUNK)


def _load_chunk(cfg, w_ref, p, g, gates, n_chunks, r0, size, chunk, *, evict: bool):
    """`(size, CHUNK)` values (float32) and columns of one chunk of one row group."""
    words = _load_words(cfg, w_ref, p, g, gates, n_chunks, r0, size, chunk, evict=evict)
    return _decode(cfg, words)


def _load_words(cfg, w_ref, p, g, gates, n_chunks, r0, size, chunk, *, evict: bool):
    """`(size, CHUNK)` packed int32 words of one chunk of one row group."""
    row = ((p * gates + g) * n_chunks + chunk) * cfg.units + r0
    if evict:
        return plt.load(w_ref.at[pl.ds(row, size), :], eviction_policy="evict_last")
    return w_ref[pl.ds(row, size), :]


def _decode(cfg, words):
    """Packed words -> `(values as float32, columns)`."""
    high = jnp.right_shift(words, 16).astype(jnp.int16)
    vals = jax.lax.bitcast_convert_type(high, jnp.dtype(cfg.value_dtype)).astype(jnp.float32)
    return vals, jnp.bitwise_and(words, 0xFFFF)


def _gather_matvec(cfg, src_ref, src_row0, keys, resident, load, n_chunks):
    """Sparse products of several row groups at once -> `{key: (size, batch)}`.

    For each `(key, size)` computes `sum_k vals[r, k] * src[src_row0 + cols[r, k], :]`. One
    loop over the chunks serves every key, so each iteration has many independent gathers in
    flight (the loop is latency-bound otherwise), and the products accumulate elementwise in
    `(size, CHUNK, batch)` registers: one cross-thread reduction per key and step, not one per
    chunk. `resident[key]` holds the first chunks already in registers (decoded); `load(key,
    size, c)` loads the packed words of chunk `c`. The batch is the gathered rows' minor axis, so
    each gather is one wide load; a 16-bit `src` is widened to float32 after the gather.
    """

    def gather(cols):  # raw rows, in the source's dtype
        return src_ref[cols + src_row0, :]

    def term(vals, cols):
        return vals[:, :, None] * gather(cols).astype(jnp.float32)

    accs = []
    for key, size in keys:
        acc = jnp.zeros((size, CHUNK, cfg.batch), jnp.float32)
        for vals, cols in resident.get(key, ()):
            acc = acc + term(vals, cols)
        accs.append(acc)
    first = min((len(resident.get(key, ())) for key, _ in keys), default=0)
    k = cfg.unroll
    if first < n_chunks and not cfg.prefetch and k == 1:

        def body(c, accs):
            return tuple(
                acc + term(*_decode(cfg, load(key, size, c)))
                for (key, size), acc in zip(keys, accs, strict=True)
            )

        accs = jax.lax.fori_loop(first, n_chunks, body, tuple(accs))
    elif first < n_chunks:
        # `k` chunks per iteration (`unroll`): k independent loads per key in flight.
        groups = (n_chunks - first) // k

        def load_group(key, size, i):
            return tuple(load(key, size, first + i * k + j) for j in range(k))

        accs = tuple(accs)
        if groups and cfg.prefetch:
            accs = _pipelined_chunks(cfg, keys, accs, gather, load_group, groups)
        elif groups:

            def body(i, accs):
                return tuple(
                    acc + _total(term(*_decode(cfg, w)) for w in load_group(key, size, i))
                    for (key, size), acc in zip(keys, accs, strict=True)
                )

            accs = jax.lax.fori_loop(0, groups, body, accs)
        for c in range(first + groups * k, n_chunks):  # the tail, fewer than k chunks
            accs = tuple(
                acc + term(*_decode(cfg, load(key, size, c)))
                for (key, size), acc in zip(keys, accs, strict=True)
            )
    return {key: jnp.sum(acc, axis=1) for (key, _), acc in zip(keys, accs, strict=True)}


def _total(terms):
    return functools.reduce(operator.add, terms)


def _pipelined_chunks(cfg, keys, accs, gather, load_group, groups):
    """The chunk loop, software-pipelined by hand (Triton pipelines only loads feeding dots).

    Iteration `c` issues the word loads of group `c + 2` (`load_group(key, size, c)`: a tuple
    of `unroll` chunks), then the gathers of group `c + 1` (whose words arrived during the
    previous iteration), then the products of group `c` (whose gathered rows arrived during the
    previous iteration). Group indices past the end are clamped: the extra loads re-read the
    last group and are never used. The carried state is
    raw: packed words and gathered rows in the source dtype (a 16-bit source halves the
    carried rows), decoded and widened at use. Costs about `CHUNK * (2 + batch * bytes / 4) *
    rows / threads` more registers than the plain loop (NOTES.md has the measured counts).
    """
    last = groups - 1

    def words_of(c):
        return tuple(load_group(key, size, c) for key, size in keys)

    def rows_of(words):  # the gathered rows stay in the source dtype until used
        return tuple(tuple((w, gather(_decode(cfg, w)[1])) for w in group) for group in words)

    def products(group):
        return _total(
            _decode(cfg, w)[0][:, :, None] * rows.astype(jnp.float32) for w, rows in group
        )

    def body(c, state):
        accs, words_next, cur = state
        words_after = words_of(jnp.minimum(c + 2, last))
        nxt = rows_of(words_next)
        accs = tuple(acc + products(group) for acc, group in zip(accs, cur, strict=True))
        return accs, words_after, nxt

    state = (accs, words_of(min(1, last)), rows_of(words_of(0)))
    accs, _, _ = jax.lax.fori_loop(0, groups, body, state)
    return accs


def _forward_block(cfg, p, refs, offsets, resident, wait=None, staged=None):
    """One step for block `p`: reads slab offsets, writes `h_t`, `c_t` and `m_t` rows.

    `wait()`, if given, runs after the loads that do not depend on the previous step.
    `staged`, if given, is `(gather_ref, gather_row0, copy_ref, copy_row0)`: the products gather
    from `gather_ref` (a `state_dtype` copy of the previous state) instead of the float32 slab,
    and `h_t` is also written to `copy_ref` in `state_dtype` (None: not written).
    """
    x_ref, w_ref, src_ref, cprev_ref, h_ref, c_ref, m_ref = refs
    x_row0, src_row0, cprev_row0, h_row0, c_row0, m_row0 = offsets
    gather_ref, gather_row0, copy_ref, copy_row0 = staged or (src_ref, src_row0, None, 0)
    hidden = cfg.hidden
    keys = [((g, r0), size) for g in range(cfg.gates) for r0, size in cfg.row_groups]
    xs = {
        (g, r0): x_ref[pl.ds(x_row0 + g * hidden + p * cfg.units + r0, size), :]
        for (g, r0), size in keys
    }

    n_chunks = cfg.slots // CHUNK

    def load(key, size, c):
        g, r0 = key
        return _load_words(
            cfg, w_ref, p, g, cfg.gates, n_chunks, r0, size, c, evict=not cfg.interpret
        )

    if wait is not None:
        wait()
    ms = _gather_matvec(cfg, gather_ref, gather_row0, keys, resident, load, n_chunks)
    for r0, size in cfg.row_groups:
        unit0 = p * cfg.units + r0
        h_prev = src_ref[pl.ds(src_row0 + unit0, size), :] if cfg.cell == "gru" else None
        c_prev = cprev_ref[pl.ds(cprev_row0 + unit0, size), :] if cfg.cell == "lstm" else None
        gate_x = [xs[(g, r0)] for g in range(cfg.gates)]
        gate_m = [ms[(g, r0)] for g in range(cfg.gates)]
        h, c = _cells.cell_forward(cfg.cell, gate_x, gate_m, h_prev, c_prev)
        h_ref[pl.ds(h_row0 + unit0, size), :] = h
        if copy_ref is not None:
            copy_ref[pl.ds(copy_row0 + unit0, size), :] = h.astype(copy_ref.dtype)
        if cfg.cell == "lstm":
            c_ref[pl.ds(c_row0 + unit0, size), :] = c
        for g in range(cfg.gates):
            m_ref[pl.ds(m_row0 + g * hidden + unit0, size), :] = gate_m[g]


# The float16 `dm` copy (`dm_dtype="float16"`) holds `dm_t * 2^e_t`, one power of two per step
# that every block derives from the same numbers: the largest magnitude of the previous reverse
# step (`dm_{t+1}` and the carries, each block's maximum published next to its stamp) and of the
# incoming gradient `g_t`. That largest magnitude `A` lands in `[2^(K-1), 2^K)`, so `dm_t` may grow
# `2^(16-K)` times over `A` in one step before float16 (max 65504) overflows, and values down to
# `2^(-14-K)` of `A` keep all 11 bits (float16's smallest normal is 2^-14). A step that would
# overflow is counted; `sparse_rnn` then recomputes the backward with the float32 `dm`.
_DM_SCALE_EXP = 4  # K
_F16_MAX = 65504.0


def dm_scale(peak: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(2^e, 2^-e)` with `peak * 2^e` in `[2^(K-1), 2^K)` for `peak >= 0` (exact powers of two).

    Bit arithmetic on the float32 exponent (the same in XLA and in a Triton kernel); `e` is
    clamped to `[-100, 100]` (a zero peak gives 2^100: nothing to scale).

    Example:
        >>> [float(v) for v in dm_scale(jnp.float32(3.0))]
        [4.0, 0.25]
    """
    biased = jnp.bitwise_and(
        jnp.right_shift(jax.lax.bitcast_convert_type(peak, jnp.int32), 23), 0xFF
    )
    field = jnp.clip(_DM_SCALE_EXP + 253 - biased, 27, 227)

    def power(f):
        return jax.lax.bitcast_convert_type(jnp.left_shift(f, 23), jnp.float32)

    return power(field), power(254 - field)


def _reciprocal_power(scale: jax.Array) -> jax.Array:
    """`2^-e` for `scale = 2^e` (exact; `e` within dm_scale's clamp)."""
    biased = jnp.bitwise_and(
        jnp.right_shift(jax.lax.bitcast_convert_type(scale, jnp.int32), 23), 0xFF
    )
    return jax.lax.bitcast_convert_type(jnp.left_shift(254 - biased, 23), jnp.float32)


def _folded_matvec(cfg, p, tw_ref, src_ref, src_row0, r0, size, n_chunks):
    """The products of a small row group (`size` < 16 units) as a folded `(16, CHUNK)` tile.

    Unfolded, a group of 2 units is a `(2, CHUNK, batch)` tile that Triton spreads over all
    warps with one 4-byte (or 2-byte) element per thread, replicated: every warp spends about as
    many instructions on it per chunk as on the 16-unit group, for 1/8 of the products. Folded,
    virtual row `v` holds unit `v // f` and chunk `j * f + v % f` (`f = 16 // size`) at iteration
    `j`, so one `(16, CHUNK)` load serves `f` chunks of every unit with the same wide gathers as
    the full groups; chunks past the end read the last chunk with zero values. Returns
    `(size, batch)`.
    """
    fold = _FOLD_ROWS // size
    v = jnp.arange(_FOLD_ROWS, dtype=jnp.int32)
    unit, lane = v // fold, v % fold
    base = p * n_chunks * cfg.units + r0 + unit  # word row of chunk 0 of each virtual row

    def body(j, acc):
        chunk = j * fold + lane
        rows = base + jnp.minimum(chunk, n_chunks - 1) * cfg.units
        words = tw_ref[rows, :]
        vals, cols = _decode(cfg, words)
        vals = jnp.where((chunk < n_chunks)[:, None], vals, 0.0)
        return acc + vals[:, :, None] * src_ref[cols + src_row0, :].astype(jnp.float32)

    acc = jnp.zeros((_FOLD_ROWS, CHUNK, cfg.batch), jnp.float32)
    acc = jax.lax.fori_loop(0, -(-n_chunks // fold), body, acc)
    per_row = jnp.sum(acc, axis=1)  # (16, batch)
    # Sum the `fold` virtual rows of each unit: a one-hot (size, 16) selection (no reshape).
    owner = (v[None, :] // fold == jnp.arange(size, dtype=jnp.int32)[:, None]).astype(jnp.float32)
    return jnp.sum(owner[:, :, None] * per_row[None, :, :], axis=1)


def _peak(a: jax.Array) -> jax.Array:
    """The largest element of a 2-D tile (one axis at a time: lowers under an abstract mesh)."""
    return jnp.max(jnp.max(a, axis=1), axis=0)


def _backward_block(cfg, p, refs, offsets, carries, resident, wait=None, staged=None):
    """One reverse step for block `p`.

    `staged`, if given, is `(gather_ref, gather_row0, unscale, copy_ref, copy_row0, scale_fn)`:
    the products gather from `gather_ref` (a `dm_dtype` copy of `dm_{t+1}` holding `dm_{t+1} *
    2^e_{t+1}`) and are multiplied by `unscale` (`2^-e_{t+1}`, or None), and `dm_t * scale` is
    written to `copy_ref`, where `scale = scale_fn()` (called after `wait()`; None: unscaled).
    Returns `(carries, dm_peak, carry_peak, scale)`: the new `(dc, dh_direct)` per row group, the
    block's largest `|dm_t|` and largest carry magnitude (float32 scalars; only when scaled,
    else None) and the scale used.
    """
    g_ref, x_ref, m_ref, hprev_ref, cprev_ref, c_ref, tw_ref, dmsrc_ref, dm_ref, dx_ref = refs
    (g_row0, x_row0, m_row0, hprev_row0, cprev_row0, c_row0, dmsrc_row0, dm_row0) = offsets
    hidden, n_chunks = cfg.hidden, cfg.transpose_slots // CHUNK
    folded = cfg.folded_groups
    keys = [(r0, size) for r0, size in cfg.row_groups if (r0, size) not in folded]
    unstaged = (dmsrc_ref, dmsrc_row0, None, None, 0, None)
    src_ref, src_row0, unscale, copy_ref, copy_row0, scale_fn = staged or unstaged

    def load(key, size, c):
        return _load_words(cfg, tw_ref, p, 0, 1, n_chunks, key, size, c, evict=not cfg.interpret)

    def step_inputs(r0, size):  # written before the launch: independent of the other blocks
        unit0 = p * cfg.units + r0
        rows = [(g_ref, g_row0), (hprev_ref, hprev_row0), (cprev_ref, cprev_row0), (c_ref, c_row0)]
        rows += [(x_ref, x_row0 + g * hidden) for g in range(cfg.gates)]
        rows += [(m_ref, m_row0 + g * hidden) for g in range(cfg.gates)]
        return [ref[pl.ds(row0 + unit0, size), :] for ref, row0 in rows]

    # `backward_preload`: these loads (HBM: a new slab every step) go out before the wait and
    # the chunk loop, which hide their latency; otherwise they follow the loop.
    pre = {r0: step_inputs(r0, size) for r0, size in cfg.row_groups if cfg.backward_preload}
    if wait is not None:
        wait()
    # The scale's loads (a table row, after the wait) go out before the chunk loop hides them.
    scale = scale_fn() if scale_fn is not None else None
    dms_in = _gather_matvec(cfg, src_ref, src_row0, keys, resident, load, n_chunks)
    for r0, size in folded:
        dms_in[r0] = _folded_matvec(cfg, p, tw_ref, src_ref, src_row0, r0, size, n_chunks)
    if unscale is not None:
        dms_in = {key: v * unscale for key, v in dms_in.items()}
    new_carries = []
    dm_peak = carry_peak = None
    for (r0, size), (dc, direct) in zip(cfg.row_groups, carries, strict=True):
        unit0 = p * cfg.units + r0
        g_in, h_prev, c_prev, c, *xms = pre[r0] if r0 in pre else step_inputs(r0, size)
        xs, ms = xms[: cfg.gates], xms[cfg.gates :]
        dh = g_in + direct + dms_in[r0]
        dxs, dms, direct, dc = _cells.cell_backward(cfg.cell, xs, ms, h_prev, c_prev, c, dh, dc)
        for g in range(cfg.gates):
            dm_ref[pl.ds(dm_row0 + g * hidden + unit0, size), :] = dms[g]
            dx_ref[pl.ds(x_row0 + g * hidden + unit0, size), :] = dxs[g]
            if copy_ref is not None:
                scaled = dms[g] if scale is None else dms[g] * scale
                copy_ref[pl.ds(copy_row0 + g * hidden + unit0, size), :] = scaled.astype(
                    copy_ref.dtype
                )
        if scale is not None:
            group_dm = _peak(functools.reduce(jnp.maximum, [jnp.abs(d) for d in dms]))
            group_carry = _peak(jnp.maximum(jnp.abs(dc), jnp.abs(direct)))
            dm_peak = group_dm if dm_peak is None else jnp.maximum(dm_peak, group_dm)
            carry_peak = group_carry if carry_peak is None else jnp.maximum(carry_peak, group_carry)
        new_carries.append((dc, direct))
    return tuple(new_carries), dm_peak, carry_peak, scale


# ----------------------------------------------------------------------------------------------
# One step per launch (runs in interpret mode on the CPU; also on a GPU).


@functools.partial(jax.jit, static_argnames="cfg")
def forward_steps(cfg: KernelConfig, x, words, hbuf, cbuf):
    """Forward over all steps with one launch per step, inside `lax.scan`.

    Args: kernel layout; `x` is `(steps * gates * hidden, batch)`, `words` from `pack`,
    `hbuf`/`cbuf` are `((steps + 1) * hidden, batch)` with slab 0 filled.
    Returns `(hbuf, cbuf, m, timeouts)`.
    """
    hidden, gh, b = cfg.hidden, cfg.gates * cfg.hidden, cfg.batch

    def kernel(x_ref, w_ref, h_prev_ref, c_prev_ref, g_ref, h_ref, c_ref, m_ref):
        p = pl.program_id(0)
        refs = (x_ref, w_ref, h_prev_ref, c_prev_ref, h_ref, c_ref, m_ref)
        staged = (g_ref, 0, None, 0) if cfg.staged else None
        _forward_block(cfg, p, refs, (0, 0, 0, 0, 0, 0), resident={}, staged=staged)

    call = pl.pallas_call(
        kernel,
        grid=(cfg.blocks,),
        out_shape=(
            jax.ShapeDtypeStruct((hidden, b), jnp.float32),
            jax.ShapeDtypeStruct((hidden, b), jnp.float32),
            jax.ShapeDtypeStruct((gh, b), jnp.float32),
        ),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="sparse_rnn_forward_step",
    )

    def step(carry, x_t):
        h_prev, c_prev = carry
        # The staged variant gathers from a `state_dtype` copy of the previous state.
        h, c, m = call(x_t, words, h_prev, c_prev, h_prev.astype(cfg.state_dtype))
        if cfg.cell != "lstm":
            c = c_prev
        return (h, c), (h, c, m)

    carry0 = (hbuf[:hidden], cbuf[:hidden])
    _, (hs, cs, ms) = jax.lax.scan(step, carry0, x.reshape(cfg.steps, gh, b))
    hbuf = jnp.concatenate([carry0[0], hs.reshape(-1, b)])
    cbuf = jnp.concatenate([carry0[1], cs.reshape(-1, b)])
    return hbuf, cbuf, ms.reshape(-1, b), jnp.zeros((cfg.blocks,), jnp.int32)


@functools.partial(jax.jit, static_argnames="cfg")
def backward_steps(cfg: KernelConfig, g, x, m, hbuf, cbuf, twords):
    """Reverse recurrence with one launch per step.

    Returns `(dm, dx, dc0, dh_direct0, timeouts, overflows)`; `overflows` counts the steps whose
    scaled float16 `dm` copy would have overflowed (`dm_dtype="float16"`; zeros otherwise).
    """
    hidden, gh, b = cfg.hidden, cfg.gates * cfg.hidden, cfg.batch
    n_in = 10 + (1 if cfg.dm_staged else 0) + (3 if cfg.dm_scaled else 0)

    def kernel(*refs):
        p = pl.program_id(0)
        (g_ref, x_ref, m_ref, hp_ref, cp_ref, c_ref, tw_ref, dmn_ref, dc_ref, dd_ref) = refs[:10]
        extra, outs = refs[10:n_in], refs[n_in:]
        dm_ref, dx_ref, dc_out, dd_out = outs[:4]
        carries = []
        for r0, size in cfg.row_groups:
            rows = pl.ds(p * cfg.units + r0, size)
            carries.append((dc_ref[rows, :], dd_ref[rows, :]))
        staged = None
        if cfg.dm_scaled:
            copy_in, peaks_in, unscale_in, gmax_in = extra
            copy_out, peak_out, ovf_out = outs[4:]

            def scale_fn():
                peak = jnp.maximum(jnp.max(peaks_in[...]), jnp.max(gmax_in[...]))
                return dm_scale(peak)[0]

            staged = (copy_in, 0, jnp.max(unscale_in[...]), copy_out, 0, scale_fn)
        elif cfg.dm_staged:
            staged = (extra[0], 0, None, outs[4], 0, None)
        block_refs = (g_ref, x_ref, m_ref, hp_ref, cp_ref, c_ref, tw_ref, dmn_ref, dm_ref, dx_ref)
        carries, dm_peak, carry_peak, scale = _backward_block(
            cfg, p, block_refs, (0,) * 8, carries, resident={}, staged=staged
        )
        for (r0, size), (dc, direct) in zip(cfg.row_groups, carries, strict=True):
            rows = pl.ds(p * cfg.units + r0, size)
            dc_out[rows, :] = dc
            dd_out[rows, :] = direct
        if cfg.dm_scaled:
            peak_out[pl.ds(p, 1)] = jnp.full((1,), jnp.maximum(dm_peak, carry_peak), jnp.float32)
            over = (dm_peak * scale > _F16_MAX).astype(jnp.int32)
            ovf_out[pl.ds(p, 1)] = jnp.full((1,), over, jnp.int32)

    f32 = jnp.float32
    out_shape = (
        jax.ShapeDtypeStruct((gh, b), f32),
        jax.ShapeDtypeStruct((gh, b), f32),
        jax.ShapeDtypeStruct((hidden, b), f32),
        jax.ShapeDtypeStruct((hidden, b), f32),
    )
    if cfg.dm_staged:
        out_shape += (jax.ShapeDtypeStruct((gh, b), cfg.dm_dtype),)
    if cfg.dm_scaled:
        out_shape += (
            jax.ShapeDtypeStruct((cfg.blocks,), f32),
            jax.ShapeDtypeStruct((cfg.blocks,), jnp.int32),
        )
    call = pl.pallas_call(
        kernel,
        grid=(cfg.blocks,),
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="sparse_rnn_backward_step",
    )
    steps = cfg.steps
    hs = hbuf.reshape(steps + 1, hidden, b)
    cs = cbuf.reshape(steps + 1, hidden, b)
    pad = cfg.stamp_slots - cfg.blocks

    def step(carry, inputs):
        dm_next, dc, direct, extra = carry
        g_t, x_t, m_t, h_prev, c_prev, c_t, gmax_t = inputs
        scaled_in = (gmax_t,) if cfg.dm_scaled else ()
        outs = call(
            g_t, x_t, m_t, h_prev, c_prev, c_t, twords, dm_next, dc, direct, *extra, *scaled_in
        )
        dm, dx, dc, direct = outs[:4]
        ovf = jnp.zeros((cfg.blocks,), jnp.int32)
        if cfg.dm_scaled:
            copy, peaks, ovf = outs[4:]
            # The next launch's `unscale` is this launch's 2^-e_t, from the same numbers.
            unscale = dm_scale(jnp.maximum(jnp.max(extra[1]), gmax_t[0]))[1]
            extra = (copy, jnp.pad(peaks, (0, pad)), unscale[None])
        elif cfg.dm_staged:
            extra = (outs[4],)
        return (dm, dc, direct, extra), (dm, dx, ovf)

    zeros_h = jnp.zeros((hidden, b), f32)
    extra0 = ()  # slab T of the copy is zero: its peaks are zero and its scale is 1
    if cfg.dm_staged:
        extra0 = (jnp.zeros((gh, b), cfg.dm_dtype),)
    if cfg.dm_scaled:
        extra0 += (jnp.zeros((cfg.stamp_slots,), f32), jnp.ones((1,), f32))
    inputs = (
        g.reshape(steps, hidden, b),
        x.reshape(steps, gh, b),
        m.reshape(steps, gh, b),
        hs[:-1],
        cs[:-1],
        cs[1:],
        _step_peaks(cfg, g).reshape(steps, 1),
    )
    (_, dc0, dd0, _), (dms, dxs, ovfs) = jax.lax.scan(
        step, (jnp.zeros((gh, b), f32), zeros_h, zeros_h, extra0), inputs, reverse=True
    )
    timeouts = jnp.zeros((cfg.blocks,), jnp.int32)
    return dms.reshape(-1, b), dxs.reshape(-1, b), dc0, dd0, timeouts, jnp.sum(ovfs, axis=0)


def _step_peaks(cfg, g):
    """`(steps,)`: the largest `|g_t|` of each step (the float16 `dm` copy's scale uses it)."""
    return jnp.max(jnp.abs(g.reshape(cfg.steps, -1)), axis=1)


# ----------------------------------------------------------------------------------------------
# Persistent: one launch for the whole sequence.


def _wait_for(cfg, stamps_ref, target, timeouts):
    """Spins (bounded) until every block's stamp is >= target; returns whether it got there.

    After a first timeout the bound drops to one try, so a broken launch ends quickly.
    """
    bound = cfg.max_spins - (cfg.max_spins - 1) * jnp.minimum(timeouts, 1)

    def cond(state):
        spins, ready = state
        return jnp.logical_and(jnp.logical_not(ready), spins < bound)

    def body(state):
        spins, _ = state
        stamps = plt.load(stamps_ref.at[pl.ds(0, cfg.stamp_slots)], volatile=True)
        return spins + 1, jnp.min(stamps) >= target

    _, ready = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.bool_(False)))
    return ready


def _publish(stamps_ref, p, value):
    plt.debug_barrier()  # every thread's stores of this step come before the stamp
    plt.atomic_xchg(stamps_ref, (p,), value)


def _resident_chunks(cfg, w_ref, p, keys, gates, n_chunks):
    """The first `resident_chunks` chunks of every row group, loaded once."""
    n = min(cfg.resident_chunks, n_chunks)
    out = {}
    for key, size in keys:
        g, r0 = key if isinstance(key, tuple) else (0, key)
        out[key] = tuple(
            _load_chunk(cfg, w_ref, p, g, gates, n_chunks, r0, size, c, evict=False)
            for c in range(n)
        )
    return out


def stamp_init(cfg: KernelConfig) -> jax.Array:
    """Zero stamps for the blocks, `INT32_MAX` in the power-of-two padding."""
    ids = jnp.arange(cfg.stamp_slots)
    return jnp.where(ids < cfg.blocks, 0, _INT32_MAX).astype(jnp.int32)


class _Waiter:
    """Calls `_wait_for` once and remembers whether the stamps were current."""

    def __init__(self, cfg, stamps_ref, target, timeouts):
        self.args = (cfg, stamps_ref, target, timeouts)
        self.ready = None

    def __call__(self):
        self.ready = _wait_for(*self.args)


@functools.partial(jax.jit, static_argnames="cfg")
def forward_persistent(cfg: KernelConfig, x, words, hbuf, cbuf):
    """Forward over all steps in one launch. Returns `(hbuf, cbuf, m, timeouts)`."""
    hidden, gh, b, steps = cfg.hidden, cfg.gates * cfg.hidden, cfg.batch, cfg.steps
    n_chunks = cfg.slots // CHUNK

    def kernel(x_ref, w_ref, _h_in, _c_in, _s_in, *refs):
        if cfg.staged:
            _g_in, h_ref, c_ref, m_ref, stamps_ref, err_ref, g_ref = refs
        else:
            h_ref, c_ref, m_ref, stamps_ref, err_ref = refs
        p = pl.program_id(0)
        keys = [((g, r0), size) for g in range(cfg.gates) for r0, size in cfg.row_groups]
        resident = _resident_chunks(cfg, w_ref, p, keys, cfg.gates, n_chunks)

        def step(t, timeouts):
            wait = _Waiter(cfg, stamps_ref, t, timeouts)
            refs = (x_ref, w_ref, h_ref, c_ref, h_ref, c_ref, m_ref)
            offsets = (t * gh, t * hidden, t * hidden, (t + 1) * hidden, (t + 1) * hidden, t * gh)
            # Staged: gather slab t of the 16-bit copy, write slab t + 1 of it; the stamp
            # published below covers both copies (all stores precede the block barrier).
            staged = (g_ref, t * hidden, g_ref, (t + 1) * hidden) if cfg.staged else None
            _forward_block(cfg, p, refs, offsets, resident, wait, staged)
            _publish(stamps_ref, p, t + 1)
            return timeouts + 1 - wait.ready.astype(jnp.int32)

        timeouts = jax.lax.fori_loop(0, steps, step, jnp.int32(0))
        err_ref[pl.ds(p, 1)] = jnp.full((1,), timeouts, jnp.int32)

    out_shape = (
        jax.ShapeDtypeStruct(((steps + 1) * hidden, b), jnp.float32),
        jax.ShapeDtypeStruct(((steps + 1) * hidden, b), jnp.float32),
        jax.ShapeDtypeStruct((steps * gh, b), jnp.float32),
        jax.ShapeDtypeStruct((cfg.stamp_slots,), jnp.int32),
        jax.ShapeDtypeStruct((cfg.blocks,), jnp.int32),
    )
    args = (x, words, hbuf, cbuf, stamp_init(cfg))
    aliases = {2: 0, 3: 1, 4: 3}
    if cfg.staged:  # the 16-bit copy of the state: slab 0 from hbuf, the rest written
        out_shape += (jax.ShapeDtypeStruct(((steps + 1) * hidden, b), cfg.state_dtype),)
        args += (hbuf.astype(cfg.state_dtype),)
        aliases[5] = 5
    hbuf, cbuf, m, _, err, *_ = pl.pallas_call(
        kernel,
        grid=(cfg.blocks,),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="sparse_rnn_forward_persistent",
    )(*args)
    return hbuf, cbuf, m, err


@functools.partial(jax.jit, static_argnames="cfg")
def backward_persistent(cfg: KernelConfig, g, x, m, hbuf, cbuf, twords):
    """Reverse recurrence in one launch.

    Returns `(dm, dx, dc0, dh_direct0, timeouts, overflows)` (`overflows`: per block, the steps
    whose scaled float16 `dm` copy would have overflowed; zeros unless `dm_dtype="float16"`).
    With `dm_dtype` 16-bit the kernel also writes each `dm_t` slab as a 16-bit copy and gathers
    from it; with float16 each block also writes its peak magnitude of the step into a table
    (`(steps + 1) * stamp_slots` floats, row `t` for slab `t`) before publishing its stamp, and
    derives the scale of slab `t` from row `t + 1` (read with volatile loads after the wait).
    """
    hidden, gh, b, steps = cfg.hidden, cfg.gates * cfg.hidden, cfg.batch, cfg.steps
    n_chunks = cfg.transpose_slots // CHUNK
    slots = cfg.stamp_slots

    def kernel(g_ref, x_ref, m_ref, hb_ref, cb_ref, tw_ref, _dm_in, _s_in, *refs):
        n_extra_in = (1 if cfg.dm_staged else 0) + (2 if cfg.dm_scaled else 0)
        dm_ref, dx_ref, dc0_ref, dd0_ref, stamps_ref, err_ref = refs[n_extra_in : n_extra_in + 6]
        extra_out = refs[n_extra_in + 6 :]
        copy_ref = extra_out[0] if cfg.dm_staged else None
        if cfg.dm_scaled:
            gmax_ref = refs[n_extra_in - 1]
            peak_ref, ovf_ref = extra_out[1], extra_out[2]
        p = pl.program_id(0)
        keys = [(r0, size) for r0, size in cfg.row_groups if (r0, size) not in cfg.folded_groups]
        resident = _resident_chunks(cfg, tw_ref, p, keys, 1, n_chunks)

        def step(k, state):
            timeouts, carries, unscale, overflows = state
            t = steps - 1 - k
            wait = _Waiter(cfg, stamps_ref, k, timeouts)
            refs = (g_ref, x_ref, m_ref, hb_ref, cb_ref, cb_ref, tw_ref, dm_ref, dm_ref, dx_ref)
            offsets = (t * hidden, t * gh, t * gh, t * hidden, t * hidden, (t + 1) * hidden,
                       (t + 1) * gh, t * gh)  # fmt: skip
            staged = None
            if cfg.dm_scaled:

                def scale_fn():  # after the wait: row t + 1 of the peak table is complete
                    row = plt.load(peak_ref.at[pl.ds((t + 1) * slots, slots)], volatile=True)
                    gmax = jnp.max(gmax_ref[pl.ds(t, 1)])
                    return dm_scale(jnp.maximum(jnp.max(row), gmax))[0]

                staged = (copy_ref, (t + 1) * gh, unscale, copy_ref, t * gh, scale_fn)
            elif cfg.dm_staged:
                staged = (copy_ref, (t + 1) * gh, None, copy_ref, t * gh, None)
            carries, dm_peak, carry_peak, scale = _backward_block(
                cfg, p, refs, offsets, carries, resident, wait, staged
            )
            if cfg.dm_scaled:
                peak = jnp.full((1,), jnp.maximum(dm_peak, carry_peak), jnp.float32)
                peak_ref[pl.ds(t * slots + p, 1)] = peak
                overflows = overflows + (dm_peak * scale > _F16_MAX).astype(jnp.int32)
                unscale = _reciprocal_power(scale)  # the next step gathers this slab
            _publish(stamps_ref, p, k + 1)
            return timeouts + 1 - wait.ready.astype(jnp.int32), carries, unscale, overflows

        zeros = tuple(
            (jnp.zeros((size, b), jnp.float32), jnp.zeros((size, b), jnp.float32))
            for _, size in cfg.row_groups
        )
        state = (jnp.int32(0), zeros, jnp.float32(1.0), jnp.int32(0))
        timeouts, carries, _, overflows = jax.lax.fori_loop(0, steps, step, state)
        for (r0, size), (dc, direct) in zip(cfg.row_groups, carries, strict=True):
            rows = pl.ds(p * cfg.units + r0, size)
            dc0_ref[rows, :] = dc
            dd0_ref[rows, :] = direct
        err_ref[pl.ds(p, 1)] = jnp.full((1,), timeouts, jnp.int32)
        if cfg.dm_scaled:
            ovf_ref[pl.ds(p, 1)] = jnp.full((1,), overflows, jnp.int32)

    f32 = jnp.float32
    out_shape = (
        jax.ShapeDtypeStruct(((steps + 1) * gh, b), f32),
        jax.ShapeDtypeStruct((steps * gh, b), f32),
        jax.ShapeDtypeStruct((hidden, b), f32),
        jax.ShapeDtypeStruct((hidden, b), f32),
        jax.ShapeDtypeStruct((slots,), jnp.int32),
        jax.ShapeDtypeStruct((cfg.blocks,), jnp.int32),
    )
    args = (g, x, m, hbuf, cbuf, twords, jnp.zeros(((steps + 1) * gh, b), f32), stamp_init(cfg))
    aliases = {6: 0, 7: 4}
    if cfg.dm_staged:  # slab T of the copy (dm_T = 0) must be zero: a zero-filled input
        out_shape += (jax.ShapeDtypeStruct(((steps + 1) * gh, b), cfg.dm_dtype),)
        args += (jnp.zeros(((steps + 1) * gh, b), cfg.dm_dtype),)
        aliases[8] = 6
    if cfg.dm_scaled:  # the peak table (row T: zeros) and g's peak per step
        out_shape += (
            jax.ShapeDtypeStruct(((steps + 1) * slots,), f32),
            jax.ShapeDtypeStruct((cfg.blocks,), jnp.int32),
        )
        args += (jnp.zeros(((steps + 1) * slots,), f32), _step_peaks(cfg, g))
        aliases[9] = 7
    dm, dx, dc0, dd0, _, err, *extra = pl.pallas_call(
        kernel,
        grid=(cfg.blocks,),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="sparse_rnn_backward_persistent",
    )(*args)
    overflows = extra[2] if cfg.dm_scaled else jnp.zeros((cfg.blocks,), jnp.int32)
    return dm[: steps * gh], dx, dc0, dd0, err, overflows
