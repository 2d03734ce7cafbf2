"""Pruned recurrent weights, packed once into the layout the sparse RNN kernels read.

The recurrent matrix `w` has shape `(hidden, gates * hidden)` and the recurrence computes
`m = h @ w` (Flax's convention). Its columns are the kernel's *rows*: gate-row `r = g * hidden
+ unit`. The kernels give each of `num_blocks` thread blocks `units = hidden // num_blocks`
consecutive units with all their gates, so the cell update is local to the block. Per row the
non-zeros are stored with their column (input unit) indices, padded to a multiple of `chunk`
slots (value 0, column repeated), in column order or, with `bank_aware=True`, round-robin over
the 32 shared-memory banks so that consecutive slots (a warp's lanes) read different banks.
Column order is the default: the kernel gathers through L1, where it touches fewer cache lines
per warp (1.5x faster on an H100, benchmarks/README.md).
The backward pass needs the transposed matrix; its layout is derived once here as indices into
the packed values, so training the values never needs a re-pack.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

_NUM_BANKS = 32
_CHUNK = 32
# The on-chip budget of one block: a Hopper SM has 256 KiB of registers and 228 KiB of shared
# memory; a packed slot costs a 2-byte value and a 2-byte column. 65536 slots = 256 KiB.
MAX_SLOTS_PER_BLOCK = 65536
_GATES = {"tanh": 1, "gru": 3, "lstm": 4}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, slots=True)
class SparseRecurrentWeights:
    """A pruned recurrent matrix packed for the sparse persistent RNN kernels.

    Build it with `SparseRecurrentWeights.prune` or `SparseRecurrentWeights.from_mask`. Only
    `values` is meant to be trained; the index arrays describe the fixed sparsity pattern.

    Attributes:
        values: `(num_blocks, gates, units, slots)` non-zero values (bf16/f16/f32), 0 in padding.
        columns: same shape, int32: the input unit each value reads.
        valid: same shape, bool: False in padding slots.
        transpose_rows: `(num_blocks, units, transpose_slots)` int32: for input unit
            `block * units + u`, the gate-rows it feeds (the transposed matrix's columns).
        transpose_source: same shape, int32: index of that entry in `values.ravel()`.
        transpose_valid: same shape, bool.
        hidden_size: H.
        num_gates: 1 (tanh), 3 (GRU) or 4 (LSTM).
    """

    values: jax.Array
    columns: jax.Array
    valid: jax.Array
    transpose_rows: jax.Array
    transpose_source: jax.Array
    transpose_valid: jax.Array
    hidden_size: int = dataclasses.field(metadata={"static": True})
    num_gates: int = dataclasses.field(metadata={"static": True})

    @property
    def num_blocks(self) -> int:
        """Thread blocks (programs) the rows are spread over."""
        return self.values.shape[0]

    @property
    def units_per_block(self) -> int:
        """Hidden units (with all their gates) owned by one block."""
        return self.values.shape[2]

    @property
    def slots(self) -> int:
        """Padded non-zeros per row (a multiple of the kernel's chunk)."""
        return self.values.shape[3]

    @property
    def nnz(self) -> int:
        """Number of stored non-zeros (padding excluded)."""
        return int(np.asarray(self.valid).sum())

    @property
    def density(self) -> float:
        """Fraction of the dense matrix that is stored."""
        return self.nnz / (self.hidden_size * self.hidden_size * self.num_gates)

    @classmethod
    def prune(
        cls,
        w_dense: jax.Array | np.ndarray,
        density: float,
        *,
        num_gates: int,
        num_blocks: int | None = None,
        dtype: jnp.dtype = jnp.bfloat16,
        bank_aware: bool = False,
    ) -> SparseRecurrentWeights:
        """Magnitude-prunes `w_dense` to `density` and packs it.

        Each row of the kernel (column of `w_dense`) keeps its `round(density * hidden)`
        largest-magnitude entries, so every block gets the same work.

        Args:
            w_dense: `(hidden, num_gates * hidden)` recurrent matrix, `m = h @ w_dense`.
            density: fraction of entries kept, in (0, 1].
            num_gates: 1 for tanh, 3 for GRU, 4 for LSTM.
            num_blocks: thread blocks to spread the rows over; default: the largest divisor of
                hidden that is at most 128.
            dtype: storage type of the values (accumulation is always float32).
            bank_aware: order each row's non-zeros so that a warp's lanes hit different
                shared-memory banks. Off by default: the kernel gathers through L1, where column
                order (fewer cache lines per warp) measured 1.5x faster on an H100.

        Raises:
            ValueError: density outside (0, 1], or a shape that does not match `num_gates`.

        Example:
            >>> w = np.random.default_rng(0).normal(size=(8, 32)).astype(np.float32)
            >>> packed = SparseRecurrentWeights.prune(w, 0.25, num_gates=4)
            >>> packed.nnz, packed.num_blocks
            (64, 8)
        """
        w = np.asarray(w_dense, dtype=np.float32)
        hidden = _check_shape(w, num_gates)
        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise ValueError(
                f"density={density!r} is outside (0, 1]. Fix: pass the fraction of weights to "
                "keep, e.g. density=0.1 for 10%."
            )
        keep = max(1, int(round(density * hidden)))
        order = np.argsort(-np.abs(w), axis=0, kind="stable")[:keep]
        mask = np.zeros(w.shape, dtype=bool)
        np.put_along_axis(mask, order, True, axis=0)
        return cls.from_mask(
            w, mask, num_gates=num_gates, num_blocks=num_blocks, dtype=dtype, bank_aware=bank_aware
        )

    @classmethod
    def from_mask(
        cls,
        w: jax.Array | np.ndarray,
        mask: jax.Array | np.ndarray,
        *,
        num_gates: int,
        num_blocks: int | None = None,
        dtype: jnp.dtype = jnp.bfloat16,
        bank_aware: bool = False,
    ) -> SparseRecurrentWeights:
        """Packs the entries of `w` where `mask` is True.

        Args:
            w: `(hidden, num_gates * hidden)` recurrent matrix.
            mask: boolean array of the same shape; True entries are kept.
            num_gates: 1 for tanh, 3 for GRU, 4 for LSTM.
            num_blocks: thread blocks; default: the largest divisor of hidden at most 128.
            dtype: storage type of the values.
            bank_aware: order each row's non-zeros so that a warp's lanes hit different
                shared-memory banks (off by default; see `prune`).

        Raises:
            ValueError: shapes that do not match, an empty row set, or a `num_blocks` that does
                not divide hidden.

        Example:
            >>> w = np.arange(8.0).reshape(2, 4)
            >>> mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
            >>> packed = SparseRecurrentWeights.from_mask(w, mask, num_gates=2, dtype=jnp.float32)
            >>> np.asarray(packed.to_dense()).tolist()
            [[0.0, 0.0, 2.0, 3.0], [0.0, 5.0, 6.0, 0.0]]
        """
        w = np.asarray(w, dtype=np.float32)
        mask = np.asarray(mask)
        hidden = _check_shape(w, num_gates)
        if mask.shape != w.shape:
            raise ValueError(
                f"mask shape {mask.shape} does not match weight shape {w.shape}. Fix: pass a "
                "boolean mask with the weight's shape."
            )
        mask = mask.astype(bool)
        if num_blocks is None:
            num_blocks = default_num_blocks(hidden)
        if not (isinstance(num_blocks, int) and num_blocks >= 1 and hidden % num_blocks == 0):
            raise ValueError(
                f"num_blocks={num_blocks!r} does not divide hidden={hidden}. Fix: pick a divisor "
                f"of {hidden}, e.g. {default_num_blocks(hidden)}."
            )
        units = hidden // num_blocks
        columns, valid = _pack_rows(mask, bank_aware=bank_aware)
        values = np.where(valid, np.take_along_axis(w, columns, axis=0), 0.0).T
        columns, valid = columns.T, valid.T
        slots = columns.shape[1]

        # Row r = g * hidden + block * units + u  ->  [block, g, u].
        def to_blocks(a: np.ndarray) -> np.ndarray:
            return a.reshape(num_gates, num_blocks, units, slots).transpose(1, 0, 2, 3).copy()

        values_b, columns_b, valid_b = map(to_blocks, (values, columns, valid))
        t_rows, t_source, t_valid = _transpose_layout(columns_b, valid_b, hidden, num_gates)
        return cls(
            values=jnp.asarray(values_b, dtype=dtype),
            columns=jnp.asarray(columns_b),
            valid=jnp.asarray(valid_b),
            transpose_rows=jnp.asarray(t_rows),
            transpose_source=jnp.asarray(t_source),
            transpose_valid=jnp.asarray(t_valid),
            hidden_size=hidden,
            num_gates=num_gates,
        )

    def with_values(self, values: jax.Array) -> SparseRecurrentWeights:
        """Returns a copy with new values (same pattern), e.g. trained ones.

        Example:
            >>> w = SparseRecurrentWeights.prune(np.ones((4, 4)), 0.5, num_gates=1)
            >>> float(w.with_values(2 * w.values).to_dense().sum())
            16.0
        """
        if values.shape != self.values.shape:
            raise ValueError(
                f"values shape {values.shape} != packed shape {self.values.shape}. Fix: pass "
                "values in the packed layout (e.g. a gradient returned for `values`)."
            )
        return dataclasses.replace(self, values=values)

    def to_dense(self) -> jax.Array:
        """Unpacks to the dense `(hidden, gates * hidden)` matrix, zeros where pruned.

        Example:
            >>> w = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
            >>> packed = SparseRecurrentWeights.prune(w, 1.0, num_gates=1, dtype=jnp.float32)
            >>> bool(np.allclose(packed.to_dense(), w))
            True
        """
        blocks, gates, units, slots = self.values.shape
        hidden = self.hidden_size
        unit = (
            jnp.arange(blocks)[:, None, None, None] * units + jnp.arange(units)[None, None, :, None]
        )
        row = jnp.arange(gates)[None, :, None, None] * hidden + unit
        row = jnp.broadcast_to(row, self.values.shape)
        vals = jnp.where(self.valid, self.values.astype(jnp.float32), 0.0)
        dense = jnp.zeros((hidden, gates * hidden), jnp.float32)
        return dense.at[self.columns.ravel(), row.ravel()].add(vals.ravel())

    def transpose_values(self) -> jax.Array:
        """The transposed matrix's values `(num_blocks, units, transpose_slots)`, from `values`."""
        flat = self.values.ravel()[self.transpose_source]
        return jnp.where(self.transpose_valid, flat, jnp.zeros((), flat.dtype))


def default_num_blocks(hidden: int, *, max_blocks: int = 128) -> int:
    """The largest divisor of `hidden` that is at most `max_blocks`.

    Example:
        >>> default_num_blocks(2304), default_num_blocks(1152), default_num_blocks(96)
        (128, 128, 96)
    """
    return max(d for d in range(1, min(hidden, max_blocks) + 1) if hidden % d == 0)


def num_gates_of(cell: str) -> int:
    """Gates per unit of a cell name.

    Example:
        >>> num_gates_of("lstm")
        4
    """
    if cell not in _GATES:
        raise ValueError(f"cell={cell!r} is not one of {sorted(_GATES)}. Fix: pick one of those.")
    return _GATES[cell]


def _check_shape(w: np.ndarray, num_gates: int) -> int:
    if num_gates not in (1, 2, 3, 4):
        raise ValueError(f"num_gates={num_gates!r}; use 1 (tanh), 3 (GRU) or 4 (LSTM).")
    if w.ndim != 2 or w.shape[1] != num_gates * w.shape[0] or w.shape[0] == 0:
        raise ValueError(
            f"recurrent weight shape {w.shape} does not match num_gates={num_gates}: expected "
            f"(hidden, {num_gates} * hidden). Fix: pass the matrix with m = h @ w."
        )
    return int(w.shape[0])


def _pack_rows(mask: np.ndarray, *, bank_aware: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per kernel row (column of `mask`), the kept input units in slot order, padded.

    Bank-aware order is round-robin over banks (`column % 32`): first the smallest kept column
    of each bank, then the second of each, and so on, so consecutive slots (a warp's lanes)
    read different banks while the row has columns in several banks.

    Returns:
        `(slots, rows)` columns (padding repeats the row's last column) and validity.
    """
    hidden, rows = mask.shape
    counts = mask.sum(axis=0)
    slots = _CHUNK * math.ceil(max(1, int(counts.max())) / _CHUNK)
    unit = np.arange(hidden)[:, None]
    if bank_aware:
        bank = unit % _NUM_BANKS
        rank = np.zeros(mask.shape, np.int64)
        for b in range(_NUM_BANKS):  # rank of each kept entry among its bank's entries
            rank[b::_NUM_BANKS] = np.cumsum(mask[b::_NUM_BANKS], axis=0) - 1
        key = rank * _NUM_BANKS + bank
    else:
        key = np.broadcast_to(unit, mask.shape).astype(np.int64)
    key = np.where(mask, key, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=0, kind="stable")[: min(slots, hidden)]
    if slots > hidden:
        order = np.concatenate([order, np.repeat(order[-1:], slots - hidden, axis=0)])
    valid = np.arange(slots)[:, None] < counts[None, :]
    last = order[np.maximum(counts - 1, 0), np.arange(rows)]
    columns = np.where(valid, order, last[None, :]).astype(np.int32)
    return columns, valid


def _transpose_layout(
    columns: np.ndarray, valid: np.ndarray, hidden: int, num_gates: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input unit, the (gate-row, flat value index) pairs that read it."""
    blocks, gates, units, slots = columns.shape
    flat_index = np.arange(columns.size).reshape(columns.shape)
    unit = np.arange(blocks)[:, None, None, None] * units + np.arange(units)[None, None, :, None]
    row = np.broadcast_to(np.arange(gates)[None, :, None, None] * hidden + unit, columns.shape)
    sel = valid.ravel()
    col, rows, src = columns.ravel()[sel], row.ravel()[sel], flat_index.ravel()[sel]
    order = np.lexsort((rows, col))
    col, rows, src = col[order], rows[order], src[order]
    counts = np.bincount(col, minlength=hidden)
    t_slots = _CHUNK * math.ceil(max(1, counts.max()) / _CHUNK)
    t_rows = np.zeros((hidden, t_slots), np.int32)
    t_source = np.zeros((hidden, t_slots), np.int32)
    t_valid = np.zeros((hidden, t_slots), bool)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(col)) - starts[col]
    t_rows[col, pos] = rows
    t_source[col, pos] = src
    t_valid[col, pos] = True
    # Padding repeats the last real row so the gather stays in a line already fetched.
    last = np.where(counts > 0, t_rows[np.arange(hidden), np.maximum(counts - 1, 0)], 0)
    t_rows = np.where(t_valid, t_rows, last[:, None])
    shape = (blocks, units, t_slots)
    return t_rows.reshape(shape), t_source.reshape(shape), t_valid.reshape(shape)
