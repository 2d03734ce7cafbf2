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
_LOOKAHEAD_LAZY = ForwardConfig(block_kv=64, lookahead=True, lazy_rescale=True)
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
        (200, 200, 2, 1, 256, True, _LOOKAHEAD_LAZY, _FUSED_SPLIT),
        (256, 256, 2, 2, 128, False, _LOOKAHEAD_PP, _FUSED),
    ),
    ids=(
        "fused-d128-causal",
        "fused-d64-ragged",
        "lookahead-pingpong-d128-causal",
        "lookahead-lazy-fused-split-d256-ragged",
        "lookahead-fused-d128",
    ),
)
def test_variant_lowers_for_cuda(t, s, heads, kv_heads, head_dim, causal, fwd, bwd):
    _export_fwd_bwd(t, s, heads, kv_heads, head_dim, causal, fwd, bwd)


def test_default_configs_lower_for_cuda():
    _export_fwd_bwd(256, 256, 2, 2, 128, False, ForwardConfig(pingpong=True), None)
