"""CPU tests of the Mosaic GPU forward (`kernels/sparse_rnn/_mosaic.py`).

The kernel itself has no interpret mode (`inline_mgpu`, `pl.get_global`): here it is lowered for
CUDA (`jax.export`: the Pallas lowering and the Mosaic GPU dialect verifier run; LLVM's NVPTX
backend and ptxas do not, so the raw IR is first compiled on a GPU, tests/gpu). Its packing,
slot order and layouts are checked through `forward_emulated`, which follows the kernel index
for index, against the dense masked reference and the step kernel's residuals.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sparse_rnn_problems import GATES, problem, rel

from jaxpp.kernels import sparse_rnn as sr
from jaxpp.kernels.sparse_rnn import _api, _kernel, _mosaic

pytestmark = pytest.mark.filterwarnings("ignore:.*Pallas Triton backend is deprecated")


def _config(weights, cell, x, slot_order="conflict_free"):
    base = _api._config(weights, cell, x.shape, "mosaic", 16, 1, 0, 1 << 20)
    return _mosaic.MosaicConfig(base, slot_order)


def _pattern_args(weights):
    return (
        weights.values, weights.columns, weights.valid, weights.transpose_rows,
        weights.transpose_source, weights.transpose_valid,
    )  # fmt: skip


@pytest.mark.parametrize(
    "cell,slot_order,batch",
    [("lstm", "conflict_free", 4), ("lstm", "packed", 3), ("gru", "conflict_free", 2),
     ("tanh", "conflict_free", 1)],
)  # fmt: skip
def test_emulated_forward_matches_reference_and_step_residuals(cell, slot_order, batch):
    # The Mosaic path's packing, slot order and layouts (the kernel's own index math, in XLA)
    # against the dense masked reference, and its residuals against the step kernel's (the
    # backward that consumes them is the tested Triton one).
    weights, x, h0, c0, _ = problem(cell, 128, batch, 5, 0.4, seed=len(cell) + batch, num_blocks=8)
    cfg = _config(weights, cell, x, slot_order)
    assert cfg.base.interpret and cfg.base.state_dtype == "float32"
    args = (x, h0, c0, *_pattern_args(weights))
    hs, res = _api._kernel_fwd(cfg, "mosaic", False, *args)
    hs_step, res_step = _api._kernel_fwd(cfg.base, "step", False, *args)
    ref = sr.sparse_rnn(x, h0, weights, cell=cell, c0=c0, implementation="reference")
    assert hs.shape == ref.shape
    assert rel(hs, ref) < 2e-3  # the products read h rounded to float16
    for name, a, b in zip(("xk", "m", "hbuf", "cbuf"), res[:4], res_step[:4], strict=True):
        assert a.shape == b.shape, name
        if cell != "lstm" and name == "cbuf":
            assert not bool(jnp.any(a[cfg.base.hidden :])), "cbuf of a cell without c"
            continue
        assert rel(a, b) < 3e-3, name


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_conflict_free_order_is_a_row_permutation_and_keeps_products(batch):
    weights, *_ = problem("lstm", 256, 1, 1, 0.3, seed=batch, num_blocks=16)
    args = (weights.values, weights.columns, weights.valid)
    words = {o: _mosaic.pack_words(*args, batch=batch, slot_order=o) for o in _mosaic.SLOT_ORDERS}
    shape = weights.values.shape
    h = jax.random.normal(jax.random.key(batch), (256, batch), jnp.float32)

    def products(w):
        w = w.reshape(shape)
        bits = jax.lax.shift_right_logical(w, 16).astype(jnp.uint16)
        vals = jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32)
        return jnp.sum(vals[..., None] * h[w & 0xFFFF], axis=3)

    np.testing.assert_allclose(
        products(words["conflict_free"]), products(words["packed"]), rtol=1e-5, atol=1e-5
    )
    for name, w in words.items():
        w = np.asarray(w).reshape(shape)
        nonzero = np.sort(np.where(w >> 16 != 0, w, 0), axis=-1)
        expect = np.sort(np.asarray(words["packed"]).reshape(shape), axis=-1)
        expect = np.sort(np.where(expect >> 16 != 0, expect, 0), axis=-1)
        np.testing.assert_array_equal(nonzero, expect, err_msg=name)


def test_conflict_free_order_needs_fewer_wavefronts_than_column_order():
    # Headline-like rows (B=4: 16 lanes per wavefront): the order must beat column order and
    # reach the bound set by the row's largest bank group (which a row can exceed, NOTES.md).
    batch = 4
    weights, *_ = problem("lstm", 512, 1, 1, 0.3, seed=3, num_blocks=8)
    cols, valid = weights.columns, weights.valid
    _, tuned, _ = _mosaic.conflict_free_slots(cols, valid, batch)
    packed_w = np.asarray(_mosaic.wavefronts(cols, batch))
    tuned_w = np.asarray(_mosaic.wavefronts(tuned, batch))
    groups = _mosaic.bank_groups(batch)
    phases = cols.shape[-1] // groups
    group = np.asarray(_mosaic.bank_group(cols, batch))
    counts = np.stack([np.sum((group == k) & np.asarray(valid), -1) for k in range(groups)], -1)
    lower = np.maximum(phases, counts.max(-1))  # each phase >= 1; a group's items >= 1 each
    print(f"wavefronts per row: packed {packed_w.mean():.1f}, tuned {tuned_w.mean():.1f}")
    assert tuned_w.mean() < 0.8 * packed_w.mean()
    assert np.all(tuned_w >= lower)
    assert np.all(tuned_w <= phases + np.maximum(counts - phases, 0).sum(-1))


def test_conflict_free_order_rows_with_small_groups_are_conflict_free():
    # Every bank group at most `phases` times: one wavefront per phase exactly.
    cols = jnp.asarray(np.random.default_rng(0).permutation(32)[None] * 3)  # 2 per group
    _, tuned, _ = _mosaic.conflict_free_slots(cols, jnp.ones_like(cols, bool), 4)
    assert int(_mosaic.wavefronts(tuned, 4)[0]) == 2


def _export(cfg):
    b = cfg.base
    spec = jax.ShapeDtypeStruct
    args = (
        spec((b.steps * b.gates * b.hidden * b.batch,), jnp.float32),
        spec((b.blocks * cfg.rows * b.slots,), jnp.int32),
        spec((b.hidden * b.batch,), jnp.float32),
        spec((b.hidden * b.batch,), jnp.float32),
    )
    fn = jax.jit(lambda *a: _mosaic.forward(cfg, *a))
    return jax.export.export(fn, platforms=["cuda"])(*args)


def _headline(cell, **kw):
    gates = GATES[cell]
    base = _kernel.KernelConfig(
        cell=cell, hidden=2304, gates=gates, blocks=128, units=18, slots=704,
        transpose_slots=800, batch=4, steps=256, num_warps=16, **kw,
    )  # fmt: skip
    return _mosaic.MosaicConfig(base)


@pytest.mark.parametrize("cell", ["lstm", "tanh"])
def test_forward_lowers_for_cuda_at_the_headline_size(cell):
    cfg = _headline(cell)
    assert cfg.smem_bytes() <= _mosaic.MAX_SMEM_BYTES
    exported = _export(cfg)
    assert [a.shape for a in exported.out_avals] == [(2304 * 4 * 256,)] * 2 + [
        (2304 * 4 * 256 * GATES[cell],),
        (128,),
    ]


def test_gru_and_small_batches_lower_for_cuda():
    for cell, batch, warps in (("gru", 2, 8), ("lstm", 8, 32), ("tanh", 1, 4)):
        base = _kernel.KernelConfig(
            cell=cell, hidden=256, gates=GATES[cell], blocks=16, units=16, slots=96,
            transpose_slots=128, batch=batch, steps=4, num_warps=warps,
        )  # fmt: skip
        _export(_mosaic.MosaicConfig(base, "packed"))


def test_api_forward_and_gradient_lower_for_cuda(monkeypatch):
    # Through `sparse_rnn`: the Mosaic forward and, for the gradient, the Triton backward.
    monkeypatch.setattr(_api.jax, "default_backend", lambda: "gpu")
    weights, *_ = problem("lstm", 256, 4, 8, 0.3, seed=5, num_blocks=16)

    def loss(x, h0, c0, values):
        hs = sr.sparse_rnn(
            x, h0, weights.with_values(values), cell="lstm", c0=c0, implementation="mosaic",
            check_timeouts=False,
        )  # fmt: skip
        return jnp.sum(hs)

    spec = jax.ShapeDtypeStruct
    args = (
        spec((4, 8, 1024), jnp.float32), spec((4, 256), jnp.float32),
        spec((4, 256), jnp.float32), spec(weights.values.shape, weights.values.dtype),
    )  # fmt: skip
    dev = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
    )
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    ):
        exported = jax.export.export(
            jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
            disabled_checks=checks,
        )(*args)  # fmt: skip
    text = exported.mlir_module()
    assert "mosaic_gpu" in text and "sparse_rnn_backward_persistent" in text


def test_mosaic_on_cpu_raises_with_fix():
    weights, x, h0, *_ = problem("tanh", 64, 1, 2, 0.5, seed=0, num_blocks=4)
    with pytest.raises(ValueError, match="implementation='mosaic' spins on GPU atomics"):
        sr.sparse_rnn(x, h0, weights, cell="tanh", implementation="mosaic")


def test_mosaic_shapes_it_cannot_hold_raise_with_fix():
    # H=4096 d=10% LSTM: 208 KiB of words + 32 KiB of state > 227 KiB.
    base = _kernel.KernelConfig(
        cell="lstm", hidden=4096, gates=4, blocks=128, units=32, slots=416,
        transpose_slots=448, batch=4, steps=8, num_warps=16,
    )  # fmt: skip
    with pytest.raises(ValueError, match="more than the 232448 an H100 SM has"):
        _mosaic.check(_mosaic.MosaicConfig(base))
    small = dict(cell="tanh", hidden=256, gates=1, blocks=16, units=16, slots=96,
                 transpose_slots=128, steps=4)  # fmt: skip
    with pytest.raises(ValueError, match="supports padded batches"):
        _mosaic.check(_mosaic.MosaicConfig(_kernel.KernelConfig(batch=16, num_warps=16, **small)))
    with pytest.raises(ValueError, match="whole warpgroups"):
        _mosaic.check(_mosaic.MosaicConfig(_kernel.KernelConfig(batch=4, num_warps=6, **small)))
    with pytest.raises(ValueError, match="slot_order='rows' is not one of"):
        _mosaic.MosaicConfig(_kernel.KernelConfig(batch=4, **small), "rows")


def test_auto_picks_mosaic_only_where_it_fits():
    # "auto" on Hopper: the Mosaic forward for the headline case (LSTM 2304, batch 4, 30%, as
    # packed by default with 128 blocks), the Triton kernel where shared memory or the batch
    # rules Mosaic out (H=4096 at 10%; batch 16).
    def fits(hidden, batch, density):
        w = np.random.default_rng(hidden).normal(size=(hidden, 4 * hidden)).astype(np.float32)
        weights = sr.SparseRecurrentWeights.prune(w, density, num_gates=4, bank_aware=False)
        cfg = _api._config(weights, "lstm", (batch, 8, 4 * hidden), "mosaic", 16, 1, 0, 1 << 20)
        return _api._mosaic_fits(cfg, "packed")

    assert fits(2304, 4, 0.3)
    assert not fits(4096, 4, 0.1)
    assert not fits(2304, 16, 0.3)
    # A Triton-forward option set by the caller keeps the Triton forward under "auto".
    defaults = dict(state_dtype="auto", prefetch=False, unroll=None, num_stages=1,
                    resident_chunks=0)  # fmt: skip
    assert not _api._sets_triton_forward_option(**defaults)
    for name, value in [("state_dtype", "float32"), ("prefetch", True), ("unroll", 2),
                        ("num_stages", 2), ("resident_chunks", 4)]:  # fmt: skip
        assert _api._sets_triton_forward_option(**(defaults | {name: value})), name
