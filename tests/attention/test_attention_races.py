"""The Hopper attention kernels under the Mosaic GPU interpreter's race detector (CPU).

Each kernel runs with `InterpretGPUParams(detect_races=True)` (the kernels' private
`interpret` hook, `_mosaic.interpret_params`) on shapes with several streamed blocks,
two consumer warpgroups (one at head dim 256), causal and not, ragged lengths; the
detector's verdict is read after every kernel (it is reset when the next one starts),
and the results are compared with the float32 reference. What the detector models and
what it cannot see: kernels/attention/NOTES.md, "Race detector (CPU)".
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpp.kernels import tuning
from jaxpp.kernels.attention import _api, _mosaic, _mosaic_fused, default_configs, xla_attention

_DETECT = plgpu.InterpretGPUParams(detect_races=True)
_KERNELS = ((_mosaic, "forward"), (_mosaic, "backward_dq"), (_mosaic, "backward_dkv"))
_KERNELS += ((_mosaic_fused, "backward_fused"),)


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    yield
    gpu_callbacks.reset_gpu_interpret_mode_state()  # after a failed kernel, too


@pytest.fixture
def verdicts(monkeypatch):
    """Wraps every kernel so that each call records (name, races found) once it is done."""
    seen = []

    def checked(name, kernel):
        def run(*args, **kwargs):
            out = jax.block_until_ready(kernel(*args, **kwargs))
            races = gpu_callbacks.get_races()
            # an empty access log would mean the detector never ran (a cached trace)
            assert races.reads or races.writes, f"{name}: race detection did not run"
            seen.append((name, races.races_found))
            return out

        return run

    for module, name in _KERNELS:
        monkeypatch.setattr(module, name, checked(name, getattr(module, name)))
    return seen


def _inputs(seed, t, s, head_dim):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (1, t, 1, head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, s, 1, head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, s, 1, head_dim), jnp.bfloat16)
    do = jax.random.normal(ks[3], (1, t, 1, head_dim), jnp.bfloat16)
    return q, k, v, do


def _run(q, k, v, do, *, causal, fused=False):
    """(out, dq, dk, dv) from the kernels, run eagerly one by one under the detector."""
    forward, backward = default_configs("NVIDIA H100 80GB HBM3", q.shape[-1])
    if fused:
        backward = dataclasses.replace(backward, fused=True)
    static = _api._Static(
        implementation="mosaic",
        causal=causal,
        scale=q.shape[-1] ** -0.5,
        q_len=q.shape[1],
        kv_len=k.shape[1],
        forward=forward,
        backward=backward,
        triton=None,
        interpret=_DETECT,
    )
    out, residuals = _api._kernel_fwd(q, k, v, static)
    return (out, *_api._kernel_bwd(static, residuals, do))


def _check_matches_reference(got, q, k, v, do, causal):
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    scale = q.shape[-1] ** -0.5
    out, pull = jax.vjp(
        lambda a, b, c: xla_attention(a, b, c, causal=causal, scale=scale), *f32[:3]
    )
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (out, *pull(f32[3])), strict=True):
        err = tuning.relative_error(g, w)
        assert err < 1.5e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize(
    ("t", "s", "head_dim", "causal"),
    (
        # 2 q tiles x 2 consumers, 2 kv blocks of 128 in the forward and 4 of 64 in dQ,
        # 2 kv tiles in dK/dV with 3 q blocks each: every ring slot is reused; ragged
        (150, 200, 64, False),
        (150, 200, 64, True),  # causal: masked diagonal blocks and skip steps
        # head dim 128 defaults: ping-pong forward, overlapped S/dP backward
        (150, 150, 128, True),
        # head dim 256 defaults: one consumer, dK and dV in two passes
        (150, 100, 256, False),
    ),
)
def test_default_kernels_have_no_race(verdicts, t, s, head_dim, causal):
    q, k, v, do = _inputs(t + s + head_dim, t, s, head_dim)
    got = _run(q, k, v, do, causal=causal)
    names = [name for name, _ in verdicts]
    assert names[:3] == ["forward", "backward_dq", "backward_dkv"]
    assert [name for name, raced in verdicts if raced] == []
    _check_matches_reference(got, q, k, v, do, causal)


def test_fused_backward_one_kv_tile_has_no_race(verdicts):
    # one kv tile (2 consumers x 64 rows): 3 q blocks through the 2-slot ring,
    # the shared dS^T tile, the dQ staging tiles and the writer, all inside one CTA
    q, k, v, do = _inputs(1, 150, 100, 64)
    got = _run(q, k, v, do, causal=True, fused=True)
    assert verdicts == [("forward", False), ("backward_fused", False)]
    _check_matches_reference(got, q, k, v, do, True)


def test_fused_backward_two_kv_tiles_races_only_on_the_cross_tile_dq_adds(verdicts, capsys):
    # Two kv tiles add into the same dQ rows. On the GPU a global semaphore orders the
    # tiles; interpret mode has none (the interpreter runs CTAs in order but models them
    # as concurrent), so exactly those GMEM accesses of the dQ writer are reported.
    q, k, v, do = _inputs(2, 100, 200, 64)
    got = _run(q, k, v, do, causal=False, fused=True)
    assert verdicts == [("forward", False), ("backward_fused", True)]
    reports = capsys.readouterr().out.split("RACE DETECTED")[1:]
    assert reports
    for report in reports:
        accesses = re.findall(r"(read|write) of HostAllocationKey\(memory_space_id=(\d+).*", report)
        assert len(accesses) == 2, report
        assert all(space == "0" for _, space in accesses), report  # GMEM, not SMEM
        assert report.count("_dq_writer") == 2 and "_add" in report, report
    _check_matches_reference(got, q, k, v, do, False)


@pytest.mark.parametrize("per_consumer", (False, True))
def test_detector_sees_the_lazy_rescale_scratch_pattern(per_consumer):
    # A model, not the lazy kernel (its code is gone; the interpreter evaluates jnp.max
    # on whole arrays and never sees Mosaic's reduction scratch): the cross-warp
    # reduction of the old lazy-rescale flag lowers to partials stored at one static
    # SMEM offset indexed by the warp within its warpgroup only, with a warpgroup-local
    # barrier, so both consumers use the same words. Written out at the Pallas level
    # that is `red.at[0]` below, which the detector reports; a slot per consumer
    # (`red.at[wg]`, the fix NOTES.md proposes) is clean.
    def kernel(x_ref, o_ref, x_smem, red, o_smem, bar):
        wg = jax.lax.axis_index("wg")
        plgpu.copy_gmem_to_smem(x_ref.at[wg], x_smem.at[wg], bar.at[wg])
        plgpu.barrier_wait(bar.at[wg])
        slot = red.at[wg] if per_consumer else red.at[0]
        slot[...] = x_smem.at[wg][...]  # this consumer's partials
        plgpu.commit_smem()  # the warpgroup barrier of the lowering
        o_smem.at[wg][...] = slot[...] * 2.0
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[wg])
        plgpu.wait_smem_to_gmem(0)

    smem = plgpu.SMEM((2, 128), jnp.float32)
    run = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((2, 128), jnp.float32),
        scratch_types=(smem, smem, smem, plgpu.Barrier(num_barriers=2)),
        num_threads=2,
        thread_name="wg",
        interpret=_DETECT,
    )
    x = jax.random.normal(jax.random.key(3), (2, 128), jnp.float32)
    y = jax.block_until_ready(run(x))
    assert gpu_callbacks.get_races().races_found == (not per_consumer)
    if per_consumer:
        assert jnp.array_equal(y, 2.0 * x)
