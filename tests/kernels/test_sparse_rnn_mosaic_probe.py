"""CPU tests of the Mosaic GPU feasibility probe (`kernels/sparse_rnn/_mosaic_probe.py`).

`jax.export(..., platforms=["cuda"])` runs the Pallas Mosaic GPU lowering and the Mosaic GPU
dialect verifier; it does not run LLVM's NVPTX backend or ptxas (those run in the CUDA plugin,
absent here), and the kernels have no interpret mode (`inline_mgpu`, `pl.get_global`), so the
gathers' results are first checked on a GPU (`benchmarks/sparse_rnn_mosaic_probe.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpp.kernels.sparse_rnn import _mosaic_probe as mp

_HEAD = {"rows": 72, "slots_per_row": 704, "hidden": 2304, "batch": 4}


def _export(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


def test_reference_matches_a_loop():
    words, h = mp.random_probe_inputs(
        jax.random.key(1), grid=2, rows=3, slots_per_row=64, hidden=50, batch=4
    )
    y = np.asarray(mp.gather_reference(words, h, rows=3, batch=4))
    w_np = np.asarray(words)
    state = np.asarray(h, np.float32).reshape(50, 4)
    col = (w_np & 0xFFFF).astype(np.int64)
    w = np.asarray(
        jax.lax.bitcast_convert_type((words >> 16).astype(jnp.uint16), jnp.bfloat16), np.float32
    )
    expect = np.zeros((2, 3, 4), np.float32)
    for g in range(2):
        for s in range(3 * 64):
            expect[g, s // 64] += w[g, s] * state[col[g, s]]
    assert np.abs(expect).max() > 0.1
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)


def test_pack_round_trips():
    cols = jnp.array([0, 1, 2303, 65535])
    wts = jnp.array([0.5, -1.25, 3.0e-3, 7.0])
    words = mp.pack_probe_words(cols, wts)
    np.testing.assert_array_equal(np.asarray(words & 0xFFFF), np.asarray(cols))
    back = jax.lax.bitcast_convert_type((words >> 16).astype(jnp.uint16), jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(back, np.float32), np.asarray(wts), rtol=1e-2)


def test_sync_probe_lowers_for_cuda():
    exported = _export(lambda: mp.sync_probe(grid=132, steps=256))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("num_warpgroups", [4, 2])
def test_gather_probe_lowers_for_cuda_at_the_headline_size(sync, num_warpgroups):
    # 198 KiB of words + 18 KiB of float16 state resident in shared memory.
    words = jax.ShapeDtypeStruct((132, _HEAD["rows"] * _HEAD["slots_per_row"]), jnp.uint32)
    h = jax.ShapeDtypeStruct((_HEAD["hidden"] * _HEAD["batch"],), jnp.float16)
    exported = _export(
        lambda w, x: mp.gather_probe(
            w, x, rows=_HEAD["rows"], steps=256, sync=sync, num_warpgroups=num_warpgroups
        ),
        words,
        h,
    )
    assert exported.out_avals[0].shape == (132, _HEAD["rows"], 4)


def test_gather_probe_rejects_bad_shapes():
    words = jnp.zeros((2, 3 * 40), jnp.uint32)
    with pytest.raises(ValueError, match="multiple of 32"):
        mp.gather_probe(words, jnp.zeros((40,), jnp.float16), rows=3)
    with pytest.raises(ValueError, match="batch must be 4"):
        mp.gather_probe(words, jnp.zeros((40,), jnp.float16), rows=3, batch=2)


def _small_kernel(body, scratch, semantics=plgpu.LoweringSemantics.Lane):
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
        grid=(132,),
        grid_names=("cta",),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=semantics),
    )
    return _export(
        kernel,
        jax.ShapeDtypeStruct((2304 * 4,), jnp.float16),
        jax.ShapeDtypeStruct((128,), jnp.int32),
    )


def test_shared_memory_cap_is_227_kib():
    def body(h_ref, i_ref, o_ref, w_smem, h_smem):
        o_ref[...] = jnp.zeros((128,), jnp.float32)

    state = plgpu.SMEM((2304 * 4,), jnp.float16)
    _small_kernel(body, [plgpu.SMEM((50688,), jnp.uint32), state])
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _small_kernel(body, [plgpu.SMEM((56688,), jnp.uint32), state])


@pytest.mark.parametrize(
    "semantics", [plgpu.LoweringSemantics.Lane, plgpu.LoweringSemantics.Warpgroup]
)
def test_pallas_level_gathers_are_not_offered(semantics):
    # Finding d: a vector of indices into a shared-memory ref does not lower (either
    # semantics); if a JAX upgrade makes this pass, revisit FINDINGS and the notes.
    def body(h_ref, i_ref, o_ref, h_smem):
        o_ref[...] = h_smem[i_ref[...]].astype(jnp.float32)

    with pytest.raises(NotImplementedError, match="int_indexer_shape"):
        _small_kernel(body, [plgpu.SMEM((2304 * 4,), jnp.float16)], semantics)


def test_uniform_dynamic_index_lowers():
    def body(h_ref, i_ref, o_ref, h_smem):
        o_ref[...] = jnp.full((128,), h_ref[i_ref[3]].astype(jnp.float32))

    _small_kernel(body, [plgpu.SMEM((2304 * 4,), jnp.float16)])
