"""The Mosaic attention variants lower for CUDA on a CPU machine (jax.export, no GPU).

`jax.export.export(..., platforms=["cuda"])` runs the whole Pallas Mosaic GPU lowering
(layouts, transforms, barriers, TMA descriptors) without running anything, so a variant
that cannot compile for the GPU fails here in CI instead of in a GPU session.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxpp.kernels.attention import BackwardConfig, ForwardConfig, dot_product_attention

_FUSED = BackwardConfig(block_q=64, block_kv=64, num_stages=2, fused=True)
_LOOKAHEAD_PP = ForwardConfig(pingpong=True, lookahead=True)
_LOOKAHEAD_64 = ForwardConfig(block_kv=64, lookahead=True)
_FUSED_SPLIT = BackwardConfig(  # head dim 256: fused dK + dQ kernel (1-slot ring), dV pass
    block_q=64, block_kv=64, dq_compute_wgs=1, dkv_compute_wgs=1, split_dkv=True, fused=True
)


def _export_fwd_bwd(t, s, heads, kv_heads, head_dim, causal, fwd, bwd):
    def fwd_bwd(q, k, v, do):
        out, pull = jax.vjp(
            lambda a, b, c: dot_product_attention(
                a,
                b,
                c,
                causal=causal,
                implementation="mosaic",
                forward_config=fwd,
                backward_config=bwd,
            ),
            q,
            k,
            v,
        )
        return (out, *pull(do))

    q = jax.ShapeDtypeStruct((1, t, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, s, kv_heads, head_dim), jnp.bfloat16)
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"])(q, kv, kv, q)
    text = exported.mlir_module()
    assert text.count("mosaic_gpu") >= 2  # forward and backward kernels
    return text


@pytest.mark.parametrize(
    ("t", "s", "heads", "kv_heads", "head_dim", "causal", "fwd", "bwd"),
    (
        (256, 256, 2, 1, 128, True, None, _FUSED),
        (200, 330, 2, 2, 64, False, None, _FUSED),
        (256, 256, 2, 2, 128, True, _LOOKAHEAD_PP, None),
        (200, 200, 2, 1, 256, True, _LOOKAHEAD_64, _FUSED_SPLIT),
        (256, 256, 2, 2, 128, False, _LOOKAHEAD_PP, _FUSED),
    ),
    ids=(
        "fused-d128-causal",
        "fused-d64-ragged",
        "lookahead-pingpong-d128-causal",
        "lookahead-fused-split-d256-ragged",
        "lookahead-fused-d128",
    ),
)
def test_variant_lowers_for_cuda(t, s, heads, kv_heads, head_dim, causal, fwd, bwd):
    _export_fwd_bwd(t, s, heads, kv_heads, head_dim, causal, fwd, bwd)


def test_default_configs_lower_for_cuda():
    _export_fwd_bwd(256, 256, 2, 2, 128, False, ForwardConfig(pingpong=True), None)


# jax 0.11 deprecates Pallas Triton (a warning at lowering); the "triton" path stays
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("causal", (False, True))
def test_triton_lowers_for_an_h100(causal):
    # Pallas Triton needs a GPU kind to lower: an abstract H100 stands in for it. Checks
    # the Pallas -> Triton IR step of the forward, dQ and dK/dV kernels (ragged GQA);
    # Triton's own compile to PTX happens in XLA on the GPU (tests/gpu).
    from jax._src.mesh import AbstractDevice

    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)

    def fwd_bwd(q, k, v, do):
        attn = lambda a, b, c: dot_product_attention(  # noqa: E731
            a, b, c, causal=causal, implementation="triton"
        )
        out, pull = jax.vjp(attn, q, k, v)
        return (out, *pull(do))

    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=[triton]
        )(q, kv, kv, q)
    assert exported.mlir_module().count("xla.gpu.triton") == 3  # forward, dQ, dK/dV
