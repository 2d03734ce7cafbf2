"""`sparse_rnn`: the public entry point, its custom VJP and the implementation choice."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.kernels.sparse_rnn import _kernel, _mosaic, _reference, _weights

IMPLEMENTATIONS = ("auto", "persistent", "mosaic", "step", "reference")


class SparseRNNTimeoutError(RuntimeError):
    """A persistent kernel's block waited past its spin bound for another block's stamp."""


def sparse_rnn(
    x_proj: jax.Array,
    h0: jax.Array,
    weights: _weights.SparseRecurrentWeights,
    *,
    cell: str = "lstm",
    c0: jax.Array | None = None,
    implementation: str = "auto",
    num_warps: int = 16,
    num_stages: int = 1,
    resident_chunks: int = 0,
    max_spins: int = 1 << 20,
    check_timeouts: bool = True,
    state_dtype: str = "auto",
    prefetch: bool = False,
    unroll: int | None = None,
    slot_order: str = "packed",
    dm_dtype: str = "auto",
    backward_fold: bool = True,
    backward_preload: bool = True,
) -> jax.Array:
    """Runs a recurrence with a pruned recurrent matrix; returns all hidden states.

    `x_proj` is the input projection for every step (one large matmul done outside, biases
    included); the kernel computes `h_t = cell(x_proj[:, t], h_{t-1} @ w)` with `w` sparse.
    Differentiable in `x_proj`, `h0`, `c0` and `weights.values` (the gradient of the values is
    computed only at the stored non-zeros). The kernels read 16-bit values (float32 values are
    rounded to bfloat16) and accumulate in float32.

    Where it pays (H100, 256 steps, `benchmarks/README.md`): at batch 1-4 the forward runs
    2-13x faster than XLA's dense bf16 scan (LSTM hidden 2304, batch 4, 30% dense: 8.0 vs
    18.7 us/step); at batch 16 the dense scan wins (0.2-0.8x for LSTM), so keep a dense layer
    there.

    Args:
        x_proj: `(batch, steps, gates * hidden)`.
        h0: `(batch, hidden)` initial hidden state.
        weights: packed recurrent matrix (`SparseRecurrentWeights.prune` / `.from_mask`).
        cell: "lstm" (gates i, f, g, o), "gru" (r, z, n) or "tanh".
        c0: `(batch, hidden)` initial LSTM cell state; zeros if None.
        implementation: "persistent" (one Triton launch for the whole sequence, GPU),
            "mosaic" (one Pallas Mosaic GPU launch, weights and a float16 `h` in shared
            memory; forward only in Mosaic, its backward is the persistent one; experimental,
            Hopper, see NOTES.md), "step" (one Pallas launch per step; interpret mode on
            CPU), "reference" (dense masked `lax.scan`), or "auto": on Hopper the Mosaic
            forward where it fits (shared memory, padded batch <= 8; 2x the Triton forward's
            speed measured on an H100) unless a Triton-forward option is set (`state_dtype`,
            `prefetch`, `unroll`, `num_stages`, `resident_chunks`), else persistent on GPU,
            reference elsewhere.
        num_warps: warps per block of the Triton kernels.
        num_stages: software-pipelining depth of the kernels' chunk loops.
        resident_chunks: chunks of 32 non-zeros per row held in registers across all steps
            (persistent kernel); the rest are re-read from L1/L2 each step.
        max_spins: bound on each wait of the persistent kernel.
        check_timeouts: raise `SparseRNNTimeoutError` when a wait timed out (needs a CPU
            backend for the host callback; the outputs are NaN after a timeout either way).
        state_dtype: "float32", or "float16"/"bfloat16": the forward kernel also writes a
            16-bit copy of each hidden state and gathers the recurrent product's inputs from
            it (half the gathered bytes; the products round `h` to that type, the cell math
            stays float32). "auto" (default): "float16" for the persistent kernel where its
            slabs are cache-line aligned (`hidden * padded batch * 2` a multiple of 128
            bytes; fastest measured on an H100, NOTES.md), "float32" otherwise and for the
            one-step kernel.
        prefetch: software-pipeline the kernels' chunk loops (loads of the next chunks before
            the products of the current one). Experimental, see NOTES.md.
        unroll: chunks of 32 non-zeros per loop iteration of the kernels (more independent
            loads in flight); None (default): 2 with a 16-bit state, 1 with float32 (the
            measured best of each).
        slot_order: the Mosaic forward only: "packed" (default; the packing's column order,
            8.04 us/step on an H100 at the headline size) or "conflict_free" (each row's slots
            permuted so that a wavefront's lanes read distinct shared-memory bank groups where
            the row allows it; 9.63 us/step there).
        dm_dtype: the backward's gathered copy of the gate gradients `dm`: "float32" (no
            copy), "float16" (a copy scaled by one power of two per step, chosen from the
            previous step's largest magnitudes; a step that would still overflow makes the
            backward run again in float32) or "bfloat16" (unscaled); half the gathered bytes,
            accumulation stays float32. "auto" (default): "float16" for the persistent
            backward where its 16-bit slabs are cache-line aligned, else "float32". NOTES.md
            "Backward variants".
        backward_fold: the backward computes a block's row groups of fewer than 16 units (the
            2 of 18 units per block at hidden 2304) as one folded 16-row tile over several
            chunks, instead of a thinly spread tile per chunk (default on).
        backward_preload: the persistent backward loads each step's own inputs (`g`, `x`,
            `m`, `h`, `c` rows) before waiting for the other blocks, hiding their latency
            behind the wait and the chunk loop (default on). With the two options above the
            forward+backward at hidden 2304, batch 4, density 30% took 24.57 instead of 29.41
            us/step on an H100 (session 7); float32 / False / False is the plain backward.

    Returns:
        `(batch, steps, hidden)` hidden states in `x_proj`'s dtype.

    Raises:
        ValueError: mismatched shapes, an unknown cell or implementation, or a matrix too large
            for the kernel's on-chip budget.
        SparseRNNTimeoutError: a persistent-kernel wait timed out.

    Example:
        >>> from jaxpp.kernels.sparse_rnn import SparseRecurrentWeights
        >>> rng = np.random.default_rng(0)
        >>> w = SparseRecurrentWeights.prune(rng.normal(size=(8, 8)), 0.5, num_gates=1)
        >>> x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
        >>> hs = sparse_rnn(x, jnp.zeros((2, 8)), w, cell="tanh", implementation="step")
        >>> hs.shape
        (2, 3, 8)
    """
    gates = _weights.num_gates_of(cell)
    _check_inputs(x_proj, h0, c0, weights, gates, cell)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}. Fix: pick one."
        )
    config_args = (
        num_warps, num_stages, resident_chunks, max_spins, state_dtype, prefetch, unroll,
        dm_dtype, backward_fold, backward_preload,
    )  # fmt: skip
    if implementation == "auto":
        implementation = _auto_implementation(weights, cell, x_proj.shape, slot_order, config_args)
    if implementation in ("persistent", "mosaic") and jax.default_backend() != "gpu":
        raise ValueError(
            f"implementation={implementation!r} spins on GPU atomics and cannot run on the "
            f"{jax.default_backend()} backend. Fix: use implementation='step' (one launch per "
            f"step, runs in interpret mode) or 'reference'."
        )
    if c0 is None:
        c0 = jnp.zeros(h0.shape, jnp.float32)
    if implementation == "reference":
        hs = _reference.sparse_rnn_reference(x_proj, h0, weights.to_dense(), cell=cell, c0=c0)
        return hs.astype(x_proj.dtype)
    cfg = _config(weights, cell, x_proj.shape, implementation, *config_args)
    if implementation == "mosaic":
        cfg = _mosaic.MosaicConfig(cfg, slot_order)
        _mosaic.check(cfg)
    hs = _sparse_rnn_kernel(
        cfg,
        implementation,
        check_timeouts,
        x_proj.astype(jnp.float32),
        h0.astype(jnp.float32),
        c0.astype(jnp.float32),
        weights.values,
        weights.columns,
        weights.valid,
        weights.transpose_rows,
        weights.transpose_source,
        weights.transpose_valid,
    )
    return hs.astype(x_proj.dtype)


def _check_inputs(x_proj, h0, c0, weights, gates, cell) -> None:
    hidden = weights.hidden_size
    if weights.num_gates != gates:
        raise ValueError(
            f"weights have {weights.num_gates} gate(s) but cell={cell!r} needs {gates}. Fix: "
            f"pack the matrix with num_gates={gates}."
        )
    if x_proj.ndim != 3 or x_proj.shape[2] != gates * hidden:
        raise ValueError(
            f"x_proj shape {x_proj.shape} does not match (batch, steps, {gates} * {hidden}). "
            "Fix: pass the input projection for all steps, batch first."
        )
    if h0.shape != (x_proj.shape[0], hidden):
        raise ValueError(
            f"h0 shape {h0.shape} != (batch, hidden) = {(x_proj.shape[0], hidden)}. Fix: one "
            "initial state per batch element."
        )
    if c0 is not None and c0.shape != h0.shape:
        raise ValueError(f"c0 shape {c0.shape} != h0 shape {h0.shape}. Fix: match h0.")


def _config(
    weights,
    cell,
    x_shape,
    implementation,
    num_warps,
    num_stages,
    resident_chunks,
    max_spins,
    state_dtype="auto",
    prefetch=False,
    unroll=None,
    dm_dtype="auto",
    backward_fold=True,
    backward_preload=True,
):
    blocks, gates, units, slots = weights.values.shape
    if gates * units * slots > _weights.MAX_SLOTS_PER_BLOCK:
        raise ValueError(
            f"hidden={weights.hidden_size} at {weights.nnz} non-zeros needs "
            f"{gates * units * slots} slots per block, more than the kernel holds on chip "
            f"({_weights.MAX_SLOTS_PER_BLOCK}). Fix: lower the density, or pack with more "
            "blocks (num_blocks), or use implementation='reference'."
        )
    if gates * weights.hidden_size > 1 << 16:
        raise ValueError(
            f"hidden={weights.hidden_size} with {gates} gates has more than 65536 gate-rows; the "
            "kernels store indices in 16 bits. Fix: use implementation='reference'."
        )
    persistent = implementation in ("persistent", "mosaic")
    if persistent:
        sms = _multiprocessors()
        if sms is not None and blocks > sms:
            raise ValueError(
                f"the persistent kernel needs all {blocks} blocks co-resident but the device "
                f"has {sms} multiprocessors (one block each). Fix: pack with num_blocks <= {sms}."
            )
    hidden = weights.hidden_size
    if implementation == "mosaic":  # the Triton backward's config: float32 state
        state_dtype, unroll = "float32", 1 if unroll is None else unroll
    state_dtype, unroll = _resolve_state(
        state_dtype, unroll, hidden=hidden, batch=int(x_shape[0]), persistent=persistent
    )
    batch = _kernel_batch(hidden, int(x_shape[0]), persistent=persistent)
    dm_dtype = _resolve_dm_dtype(dm_dtype, gates * hidden * batch, persistent=persistent)
    return _kernel.KernelConfig(
        cell=cell,
        hidden=hidden,
        gates=gates,
        blocks=blocks,
        units=units,
        slots=slots,
        transpose_slots=weights.transpose_rows.shape[2],
        batch=batch,
        steps=int(x_shape[1]),
        num_warps=num_warps,
        num_stages=num_stages,
        value_dtype="float16" if weights.values.dtype == jnp.float16 else "bfloat16",
        resident_chunks=resident_chunks,
        max_spins=max_spins,
        interpret=jax.default_backend() != "gpu",
        state_dtype=state_dtype,
        prefetch=bool(prefetch),
        unroll=unroll,
        dm_dtype=dm_dtype,
        backward_fold=bool(backward_fold),
        backward_preload=bool(backward_preload),
    )


_LINE_BYTES = 128


def _resolve_dm_dtype(dm_dtype: str, slab_elements: int, *, persistent: bool) -> str:
    """The `dm` copy's dtype: "auto" is float16 where the persistent backward's 16-bit slabs
    are whole cache lines (as the state, see `_kernel_batch`), else float32; an explicit
    16-bit choice on slabs that are not raises.

    Example:
        >>> _resolve_dm_dtype("auto", 4 * 2304 * 4, persistent=True)
        'float16'
        >>> _resolve_dm_dtype("auto", 4 * 2304 * 4, persistent=False)
        'float32'
    """
    if dm_dtype not in ("auto", *_kernel.STATE_DTYPES):
        raise ValueError(
            f"dm_dtype={dm_dtype!r} is not one of {('auto', *_kernel.STATE_DTYPES)}. Fix: pick one."
        )
    aligned16 = (slab_elements * 2) % _LINE_BYTES == 0
    if dm_dtype == "auto":
        return "float16" if persistent and aligned16 else "float32"
    if persistent and dm_dtype != "float32" and not aligned16:
        raise ValueError(
            f"dm_dtype={dm_dtype!r} gives {slab_elements * 2}-byte dm slabs (gates * hidden * "
            "padded batch * 2), not a multiple of the 128-byte cache line. Fix: use "
            "dm_dtype='auto' or 'float32'."
        )
    return dm_dtype


def _kernel_batch(hidden: int, batch: int, *, persistent: bool) -> int:
    """The batch the kernels run: a power of two, and for the persistent kernel wide enough
    that every float32 state slab (`hidden * batch * 4` bytes) fills whole cache lines.

    A consumer reads slab t with ordinary (L1-cached) loads; if slab t + 1 shared a line with
    slab t, a gather of slab t could pull the not yet written head of slab t + 1 into L1 and a
    later step read it stale. Padding the batch (extra columns of zeros) keeps the slabs apart;
    it widens each gather, so it only happens for hidden sizes with few factors of two.

    Example:
        >>> _kernel_batch(2304, 3, persistent=True), _kernel_batch(24, 1, persistent=True)
        (4, 4)
        >>> _kernel_batch(24, 1, persistent=False)
        1
    """
    padded = 1 << max(0, (batch - 1).bit_length())
    if not persistent:
        return padded
    while (hidden * padded * 4) % _LINE_BYTES:
        padded *= 2
    return padded


def _resolve_state(
    state_dtype: str, unroll: int | None, *, hidden: int, batch: int, persistent: bool
) -> tuple[str, int]:
    """The `(state_dtype, unroll)` a kernel build uses, from `sparse_rnn`'s arguments.

    "auto" is float16 for the persistent kernel when its 16-bit slabs are whole cache lines,
    else float32 (never an error); an explicit 16-bit `state_dtype` on slabs that are not
    raises. `unroll=None` is 2 with a 16-bit state and 1 with float32 (the measured best).

    Example:
        >>> _resolve_state("auto", None, hidden=2304, batch=4, persistent=True)
        ('float16', 2)
        >>> _resolve_state("auto", None, hidden=24, batch=1, persistent=True)
        ('float32', 1)
    """
    if state_dtype not in ("auto", *_kernel.STATE_DTYPES):
        raise ValueError(
            f"state_dtype={state_dtype!r} is not one of {('auto', *_kernel.STATE_DTYPES)}. "
            "Fix: pick one."
        )
    padded = _kernel_batch(hidden, batch, persistent=persistent)
    aligned16 = (hidden * padded * 2) % _LINE_BYTES == 0
    if state_dtype == "auto":
        state_dtype = "float16" if persistent and aligned16 else "float32"
    elif persistent and state_dtype != "float32" and not aligned16:
        # Slab t + 1 must not share a cache line with slab t (see `_kernel_batch`).
        raise ValueError(
            f"state_dtype={state_dtype!r} with hidden={hidden} and batch padded to {padded} "
            f"gives {hidden * padded * 2}-byte state slabs, not a multiple of the 128-byte "
            "cache line. Fix: use state_dtype='auto' or 'float32', or a hidden size (or "
            "batch) for which hidden * batch * 2 is a multiple of 128."
        )
    if unroll is None:
        unroll = 1 if state_dtype == "float32" else 2
    return state_dtype, unroll


def _kernel_values(values: jax.Array) -> jax.Array:
    """The kernels store 16-bit values; float32 values are rounded to bfloat16."""
    return values if values.dtype in (jnp.bfloat16, jnp.float16) else values.astype(jnp.bfloat16)


#: Device kinds (substrings) where "auto" picks the Mosaic GPU forward (sm_90a only).
_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def chosen_implementation(weights, cell: str, x_shape, **options) -> str:
    """The implementation `sparse_rnn(x_proj, h0, weights, cell=cell, **options)` runs here for
    an `x_proj` of shape `x_shape`: `options["implementation"]`, or what "auto" picks.

    Example:
        >>> from jaxpp.kernels.sparse_rnn import SparseRecurrentWeights
        >>> w = SparseRecurrentWeights.prune(np.ones((8, 8)), 0.5, num_gates=1)
        >>> chosen_implementation(w, "tanh", (2, 3, 8))  # on a CPU
        'reference'
    """
    args = inspect.signature(sparse_rnn).bind_partial(**options)
    args.apply_defaults()
    a = args.arguments
    if a["implementation"] != "auto":
        return a["implementation"]
    config_args = tuple(a[name] for name in _CONFIG_OPTIONS)
    return _auto_implementation(weights, cell, x_shape, a["slot_order"], config_args)


# `sparse_rnn`'s options `_config` takes, in its order.
_CONFIG_OPTIONS = (
    "num_warps", "num_stages", "resident_chunks", "max_spins", "state_dtype", "prefetch",
    "unroll", "dm_dtype", "backward_fold", "backward_preload",
)  # fmt: skip


def _auto_implementation(weights, cell, x_shape, slot_order, config_args) -> str:
    """ "auto": reference off the GPU; on Hopper the Mosaic forward where it fits and no
    Triton-forward option is set; else the Triton kernel."""
    if jax.default_backend() != "gpu":
        return "reference"
    options = dict(zip(_CONFIG_OPTIONS, config_args, strict=True))
    if _sets_triton_forward_option(**options) or not _on_hopper():
        return "persistent"
    try:
        mosaic_cfg = _config(weights, cell, x_shape, "mosaic", *config_args)
    except ValueError:  # no kernel holds it: the persistent build raises the error next
        return "persistent"
    return "mosaic" if _mosaic_fits(mosaic_cfg, slot_order) else "persistent"


def _on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and any(k in device.device_kind for k in _HOPPER_KINDS)


_TRITON_FORWARD_OPTIONS = ("state_dtype", "prefetch", "unroll", "num_stages", "resident_chunks")


def _sets_triton_forward_option(**options) -> bool:
    """Whether the caller changed from `sparse_rnn`'s default an option only the Triton forward
    has (then "auto" keeps the Triton kernel)."""
    defaults = inspect.signature(sparse_rnn).parameters
    return any(options[name] != defaults[name].default for name in _TRITON_FORWARD_OPTIONS)


def _mosaic_fits(cfg: _kernel.KernelConfig, slot_order: str) -> bool:
    """Whether "auto" runs the Mosaic forward (on Hopper): when `_mosaic.check` accepts it.

    Measured on an H100 (NOTES.md, session 7): 8.04 us/step forward at hidden 2304, batch 4,
    density 30% against the Triton kernel's 16.2; where it does not fit (shared memory,
    batch) the Triton kernel runs.
    """
    try:
        _mosaic.check(_mosaic.MosaicConfig(cfg, slot_order))
    except ValueError:
        return False
    return True


def _multiprocessors() -> int | None:
    device = jax.devices()[0]
    return getattr(device, "core_count", None) if device.platform == "gpu" else None


def _report_timeouts(out: jax.Array, timeouts: jax.Array, check: bool) -> jax.Array:
    """NaN-poisons `out` if any block timed out, and raises on the host when it can.

    The raise goes through `jax.debug.callback`, which needs a CPU backend; with
    `JAX_PLATFORMS=cuda` alone only the NaNs remain.
    """
    if check and _has_cpu_backend():
        jax.debug.callback(_raise_on_timeouts, timeouts)
    return jnp.where(jnp.any(timeouts > 0), jnp.nan, out)


def _has_cpu_backend() -> bool:
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def _raise_on_timeouts(timeouts: np.ndarray) -> None:
    bad = np.flatnonzero(np.asarray(timeouts))
    if bad.size:
        raise SparseRNNTimeoutError(
            f"sparse_rnn persistent kernel: blocks {bad.tolist()[:8]} timed out waiting for "
            "another block's step stamp (not all blocks were resident, or one faulted). Fix: "
            "run with fewer blocks, nothing else on the GPU, or implementation='step'."
        )


# ----------------------------------------------------------------------------------------------
# Layout conversion and the custom VJP.


def _to_kernel(a: jax.Array, batch: int) -> jax.Array:
    """`(batch, steps, rows)` -> `(steps * rows, padded batch)` float32."""
    a = a.astype(jnp.float32)
    a = jnp.pad(a, ((0, batch - a.shape[0]), (0, 0), (0, 0)))
    return jnp.transpose(a, (1, 2, 0)).reshape(-1, batch)


def _from_kernel(a: jax.Array, batch: int, steps: int) -> jax.Array:
    """`(steps * rows, padded batch)` -> `(batch, steps, rows)`."""
    return jnp.transpose(a.reshape(steps, -1, a.shape[-1]), (2, 0, 1))[:batch]


def _state_buffer(s0: jax.Array, cfg) -> jax.Array:
    """`((steps + 1) * hidden, padded batch)` with slab 0 = `s0`."""
    s0 = jnp.pad(s0.astype(jnp.float32), ((0, cfg.batch - s0.shape[0]), (0, 0))).T
    return jnp.concatenate([s0, jnp.zeros((cfg.steps * cfg.hidden, cfg.batch), jnp.float32)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sparse_rnn_kernel(cfg, mode, check, x, h0, c0, values, columns, valid, t_rows, t_src, t_valid):
    """`mode`: "step", "persistent" (Triton) or "mosaic" (`cfg` is then a `MosaicConfig`)."""
    hs, _ = _kernel_fwd(cfg, mode, check, x, h0, c0, values, columns, valid, t_rows, t_src, t_valid)
    return hs


def _kernel_fwd(cfg, mode, check, x, h0, c0, values, columns, valid, t_rows, t_src, t_valid):
    batch = x.shape[0]
    base = cfg.base if mode == "mosaic" else cfg
    xk = _to_kernel(x, base.batch)
    h0buf, c0buf = _state_buffer(h0, base), _state_buffer(c0, base)
    if mode == "mosaic":
        words = _mosaic.pack_words(
            values, columns, valid, batch=base.batch, slot_order=cfg.slot_order
        )
        first = slice(0, base.hidden)
        s0 = h0buf[first] if base.cell == "gru" else c0buf[first]
        h, c, m, timeouts = _mosaic.forward(
            cfg, xk.reshape(-1), words, h0buf[first].reshape(-1), s0.reshape(-1)
        )
        hbuf = jnp.concatenate([h0buf[first], h.reshape(-1, base.batch)])
        cbuf = jnp.concatenate([c0buf[first], c.reshape(-1, base.batch)])
        m = m.reshape(-1, base.batch)
    else:
        run = _kernel.forward_persistent if mode == "persistent" else _kernel.forward_steps
        words = _kernel.pack(_kernel_values(values), columns)
        hbuf, cbuf, m, timeouts = run(cfg, xk, words, h0buf, c0buf)
    if mode != "step":
        hbuf = _report_timeouts(hbuf, timeouts, check)
    hs = _from_kernel(hbuf[base.hidden :], batch, base.steps)
    residuals = (xk, m, hbuf, cbuf, values, columns, valid, t_rows, t_src, t_valid, h0, c0)
    return hs, residuals


def _kernel_bwd(cfg, mode, check, residuals, g):
    xk, m, hbuf, cbuf, values, columns, valid, t_rows, t_src, t_valid, h0, c0 = residuals
    cfg = cfg.base if mode == "mosaic" else cfg  # the Mosaic forward's backward is Triton's
    batch = h0.shape[0]
    flat = _kernel_values(values).ravel()[t_src]
    t_vals = jnp.where(t_valid, flat, jnp.zeros((), flat.dtype))
    twords = _kernel.pack(t_vals[:, None], t_rows[:, None])
    gk = _to_kernel(g, cfg.batch)
    run = _kernel.backward_steps if mode == "step" else _kernel.backward_persistent
    dm, dx, dc0, dd0, timeouts, overflows = run(cfg, gk, xk, m, hbuf, cbuf, twords)
    if cfg.dm_scaled:  # a step's scaled float16 dm would have overflowed: again in float32
        exact = dataclasses.replace(cfg, dm_dtype="float32")
        dm, dx, dc0, dd0, timeouts = jax.lax.cond(
            jnp.any(overflows > 0),
            lambda: run(exact, gk, xk, m, hbuf, cbuf, twords)[:5],
            lambda: (dm, dx, dc0, dd0, timeouts),
        )
    if mode != "step":
        dm = _report_timeouts(dm, timeouts, check)
    gh = cfg.gates * cfg.hidden
    # dh0 = direct part + W^T dm_0, through the transposed layout.
    dm0 = dm[:gh]
    t_v = t_vals.reshape(cfg.hidden, -1).astype(jnp.float32)
    dh0 = dd0 + jnp.einsum("jk,jkb->jb", t_v, dm0[t_rows.reshape(cfg.hidden, -1)])
    # dW at the non-zeros: sum over steps and batch of dm_t[row] * h_{t-1}[col]. At these
    # densities one dense product on the matrix units, then sampling, beats a gather per entry.
    hprev = hbuf[: cfg.steps * cfg.hidden].reshape(cfg.steps, cfg.hidden, cfg.batch)
    dense = jnp.einsum("tjb,trb->jr", hprev, dm.reshape(cfg.steps, gh, cfg.batch))
    blocks, gates, units, _ = values.shape
    unit = jnp.arange(blocks)[:, None, None, None] * units + jnp.arange(units)[None, None, :, None]
    row = jnp.broadcast_to(jnp.arange(gates)[None, :, None, None] * cfg.hidden + unit, values.shape)
    dvalues = jnp.where(valid, dense[columns, row], 0.0).astype(values.dtype)
    dx = _from_kernel(dx, batch, cfg.steps)
    return (dx, dh0.T[:batch], dc0.T[:batch], dvalues, None, None, None, None, None)


_sparse_rnn_kernel.defvjp(_kernel_fwd, _kernel_bwd)
