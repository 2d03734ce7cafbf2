"""CPU tests of the sparse RNN kernel variants (`state_dtype`, `prefetch`): their math through
the one-step kernel in interpret mode, and that every persistent variant lowers for CUDA
(`jax.export` with an abstract H100 runs the whole Pallas-Triton lowering; it does not run
Triton's own compiler, so layout or register problems still show only on a GPU)."""

import jax
import jax.numpy as jnp
import pytest
from sparse_rnn_problems import GATES, export_backward, export_cuda, problem, rel

from jaxpp.kernels import sparse_rnn as sr
from jaxpp.kernels.sparse_rnn import _kernel

pytestmark = pytest.mark.filterwarnings("ignore:.*Pallas Triton backend is deprecated")
# (state_dtype, prefetch, resident_chunks): the default and every variant the bench names.
_VARIANTS = [
    ("float32", False, 0, 1),
    ("float32", True, 0, 1),
    ("float16", False, 0, 1),
    ("float16", True, 0, 1),
    ("bfloat16", True, 0, 1),
    ("float16", True, 1, 1),
    ("float16", False, 0, 2),
    ("float16", True, 0, 2),
]


@pytest.mark.parametrize(
    "cell,state_dtype,prefetch,resident,unroll",
    [
        ("lstm", "float32", True, 0, 2),  # pipelined groups of 2 chunks, then a 1-chunk tail
        ("lstm", "float16", True, 1, 1),  # pipelined after a resident chunk
        ("gru", "float16", False, 0, 2),  # plain loop over groups of 2, then the tail
    ],
)
def test_variant_step_kernel_forward_and_gradients_match_reference(
    cell, state_dtype, prefetch, resident, unroll
):
    # Rows of 40 (hidden 48) or 70 (hidden 80) non-zeros: 2 or 3 chunks of 32, so the
    # pipelined loop's prologue, steady state and clamped end, and the unrolled tail, all run.
    hidden, chunks = (80, 3) if unroll > 1 else (48, 2)
    seed = len(cell) + resident
    # 16 units per block: one row group per gate (fewer kernel ops to interpret).
    weights, x, h0, c0, ct = problem(cell, hidden, 2, 2, 0.875, seed, num_blocks=hidden // 16)
    assert weights.slots == chunks * _kernel.CHUNK

    def loss(impl, x, h0, c0, values, **kw):
        hs = sr.sparse_rnn(
            x, h0, weights.with_values(values), cell=cell, c0=c0, implementation=impl, **kw
        )
        return jnp.sum(hs * ct), hs

    kw = dict(state_dtype=state_dtype, prefetch=prefetch, resident_chunks=resident, unroll=unroll)
    grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    (_, hs), grads = grad("step", x, h0, c0, weights.values, **kw)
    (_, hs_ref), grads_ref = grad("reference", x, h0, c0, weights.values)
    # A 16-bit state copy rounds the gathered h (f16: 2^-11, bf16: 2^-8 relative).
    tol = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}[state_dtype]
    assert rel(hs, hs_ref) < tol
    for name, a, b in zip(("dx", "dh0", "dc0"), grads, grads_ref, strict=False):
        if name == "dc0" and cell != "lstm":
            continue
        assert rel(a, b) < 3 * tol + 1e-2 * (name == "dvalues"), name
    assert rel(grads[3], grads_ref[3]) < 3e-2  # the kernel reads bf16-rounded values


def test_state_dtype_unknown_raises_with_choices():
    weights, x, h0, _, _ = problem("tanh", 16, 1, 2, 0.5, seed=0)
    with pytest.raises(ValueError, match="state_dtype='int8' is not one of"):
        sr.sparse_rnn(x, h0, weights, cell="tanh", implementation="step", state_dtype="int8")


@pytest.mark.parametrize(
    "cell,state_dtype,prefetch,resident,unroll",
    [("lstm", *v) for v in _VARIANTS] + [("gru", "float16", True, 0, 2)],
)
def test_persistent_variant_lowers_for_cuda(cell, state_dtype, prefetch, resident, unroll):
    hidden, batch, steps, blocks = 256, 4, 8, 16
    gates = GATES[cell]
    units = hidden // blocks
    cfg = _kernel.KernelConfig(
        cell=cell, hidden=hidden, gates=gates, blocks=blocks, units=units, slots=96,
        transpose_slots=128, batch=batch, steps=steps, num_warps=16,
        resident_chunks=resident, state_dtype=state_dtype, prefetch=prefetch, unroll=unroll,
    )  # fmt: skip
    f32 = jnp.float32
    gh = gates * hidden
    spec = jax.ShapeDtypeStruct
    state = spec(((steps + 1) * hidden, batch), f32)
    words = spec((blocks * gates * 3 * units, _kernel.CHUNK), jnp.int32)
    fwd = export_cuda(
        lambda x, w, h, c: _kernel.forward_persistent(cfg, x, w, h, c),
        spec((steps * gh, batch), f32), words, state, state,
    )  # fmt: skip
    assert "sparse_rnn_forward_persistent" in fwd
    assert "sparse_rnn_backward_persistent" in export_backward(cfg)


def test_state_dtype_with_slabs_not_line_aligned_raises_before_launch(monkeypatch):
    from jaxpp.kernels.sparse_rnn import _api

    monkeypatch.setattr(_api.jax, "default_backend", lambda: "gpu")
    weights, x, h0, _, _ = problem("tanh", 24, 1, 2, 0.5, seed=1)  # 24 * 1 * 2 = 48 bytes
    with pytest.raises(ValueError, match="not a multiple of the 128-byte"):
        sr.sparse_rnn(
            x, h0, weights, cell="tanh", implementation="persistent", state_dtype="float16"
        )


def _persistent_config(weights, x, **kw):
    from jaxpp.kernels.sparse_rnn import _api

    opts = dict(state_dtype="auto", prefetch=False, unroll=None) | kw
    return _api._config(
        weights, "tanh", x.shape, "persistent", 16, 1, 0, 1 << 20,
        opts["state_dtype"], opts["prefetch"], opts["unroll"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "hidden,batch,expect",
    [
        (256, 4, ("float16", 2, 4)),  # 16-bit slabs of 2 KiB: the measured best (f16_u2)
        (64, 1, ("float16", 2, 1)),  # 128-byte 16-bit slabs
        (96, 1, ("float32", 1, 1)),  # 192-byte 16-bit slabs: float32 (384 bytes), no error
        (24, 1, ("float32", 1, 4)),  # 96-byte float32 slabs: the batch is padded to 4
    ],
)
def test_default_state_persistent_picks_float16_where_line_aligned(hidden, batch, expect):
    weights, x, _, _, _ = problem("tanh", hidden, batch, 2, 0.5, seed=2, num_blocks=8)
    cfg = _persistent_config(weights, x)
    assert (cfg.state_dtype, cfg.unroll, cfg.batch) == expect
    assert (cfg.hidden * cfg.batch * 4) % 128 == 0  # float32 slabs never share a line
    if cfg.state_dtype == "float16":
        assert (cfg.hidden * cfg.batch * 2) % 128 == 0


def test_default_state_step_kernel_stays_float32():
    from jaxpp.kernels.sparse_rnn import _api

    weights, x, _, _, _ = problem("tanh", 256, 4, 2, 0.5, seed=2, num_blocks=8)
    cfg = _api._config(weights, "tanh", x.shape, "step", 16, 1, 0, 1 << 20)
    assert (cfg.state_dtype, cfg.unroll, cfg.batch) == ("float32", 1, 4)


def test_explicit_unroll_and_float32_state_are_kept():
    weights, x, _, _, _ = problem("tanh", 256, 4, 2, 0.5, seed=2, num_blocks=8)
    cfg = _persistent_config(weights, x, state_dtype="float32", unroll=3)
    assert (cfg.state_dtype, cfg.unroll) == ("float32", 3)
    cfg = _persistent_config(weights, x, state_dtype="float16")
    assert (cfg.state_dtype, cfg.unroll) == ("float16", 2)


def test_padded_batch_for_line_alignment_matches_reference():
    # hidden 24, batch 1: the persistent build pads the batch to 4 (96-byte float32 slabs);
    # the same build through the one-step kernel checks the padded columns change nothing.
    from jaxpp.kernels.sparse_rnn import _api

    weights, x, h0, c0, ct = problem("lstm", 24, 1, 3, 0.5, seed=4, num_blocks=3)
    # A float32 dm (the default's float16 copy is checked in test_sparse_rnn_backward.py).
    cfg = _api._config(
        weights, "lstm", x.shape, "persistent", 16, 1, 0, 1 << 20, dm_dtype="float32"
    )
    assert cfg.batch == 4 and cfg.state_dtype == "float32"

    def kernel_loss(x, h0, c0, values):
        hs = _api._sparse_rnn_kernel(
            cfg, "step", True, x, h0, c0, values, weights.columns, weights.valid,
            weights.transpose_rows, weights.transpose_source, weights.transpose_valid,
        )  # fmt: skip
        return jnp.sum(hs * ct), hs

    def ref_loss(x, h0, c0, values):
        hs = sr.sparse_rnn(
            x, h0, weights.with_values(values), cell="lstm", c0=c0, implementation="reference"
        )
        return jnp.sum(hs * ct), hs

    args = (x, h0, c0, weights.values)
    (_, hs), grads = jax.value_and_grad(kernel_loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    (_, hs_ref), refs = jax.value_and_grad(ref_loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    assert hs.shape == (1, 3, 24)
    assert rel(hs, hs_ref) < 1e-5
    for name, a, b in zip(("dx", "dh0", "dc0"), grads, refs, strict=False):
        assert rel(a, b) < 1e-5, name
    assert rel(grads[3], refs[3]) < 3e-2  # the kernel reads bf16-rounded values
