"""GPU checks of the Mosaic attention kernels at real sizes (run on an H100/H200).

JAX_PLATFORMS=cuda python -m pytest -q -o addopts="" tests/gpu/test_attention_gpu.py
"""

import jax
import jax.numpy as jnp
import pytest

from jaxpp.kernels import tuning
from jaxpp.kernels.attention import dot_product_attention, xla_attention

pytestmark = pytest.mark.skipif(
    jax.devices()[0].platform != "gpu" or "H" not in jax.devices()[0].device_kind,
    reason="needs a Hopper GPU",
)


def _inputs(key, batch, t, s, heads, kv_heads, head_dim, dtype):
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (batch, t, heads, head_dim), dtype)
    k = jax.random.normal(ks[1], (batch, s, kv_heads, head_dim), dtype)
    v = jax.random.normal(ks[2], (batch, s, kv_heads, head_dim), dtype)
    do = jax.random.normal(ks[3], (batch, t, heads, head_dim), dtype)
    return q, k, v, do


def _check(
    t,
    s,
    heads,
    kv_heads,
    head_dim,
    causal,
    dtype=jnp.bfloat16,
    batch=2,
    seed=0,
    implementation="mosaic",
):
    q, k, v, do = _inputs(jax.random.key(seed), batch, t, s, heads, kv_heads, head_dim, dtype)
    scale = head_dim**-0.5

    def ours(q, k, v):
        return dot_product_attention(q, k, v, causal=causal, implementation=implementation)

    def ref(q, k, v):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return xla_attention(*f32, causal=causal, scale=scale)

    out, pull = jax.jit(lambda q, k, v: jax.vjp(ours, q, k, v))(q, k, v)
    grads = jax.jit(pull)(do)
    ref_out, ref_pull = jax.vjp(ref, q, k, v)
    ref_grads = ref_pull(do.astype(jnp.float32))
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert tuning.relative_error(out, ref_out) < 1e-2
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        err = tuning.relative_error(g, r)
        assert err < 2e-2, f"{name} relative error {err:.3g}"


@pytest.mark.parametrize("head_dim", (64, 128, 256))
@pytest.mark.parametrize("causal", (False, True))
def test_mosaic_attention_real_size_matches_reference(head_dim, causal):
    _check(2048, 2048, 2048 // head_dim // 2, 2048 // head_dim // 2, head_dim, causal)


@pytest.mark.parametrize("causal", (False, True))
def test_mosaic_attention_ragged_gqa_matches_reference(causal):
    _check(1000, 1000, 8, 2, 128, causal)


def test_mosaic_attention_cross_lengths_matches_reference():
    _check(777, 1234, 4, 4, 64, True)


def test_mosaic_attention_float16_matches_reference():
    _check(1024, 1024, 4, 1, 128, False, dtype=jnp.float16)


def test_mosaic_attention_repeatable_backward_is_deterministic():
    q, k, v, do = _inputs(jax.random.key(3), 1, 1024, 1024, 4, 4, 128, jnp.bfloat16)
    f = jax.jit(
        lambda q, k, v, do: jax.vjp(
            lambda a, b, c: dot_product_attention(a, b, c, causal=True, implementation="mosaic"),
            q,
            k,
            v,
        )[1](do)
    )
    first, second = f(q, k, v, do), f(q, k, v, do)
    for a, b in zip(first, second, strict=True):
        assert bool(jnp.all(a == b))


@pytest.mark.parametrize("causal", (False, True))
def test_triton_attention_ragged_gqa_matches_reference(causal):
    _check(1000, 1000, 8, 2, 128, causal, implementation="triton")


def test_auto_on_hopper_picks_mosaic():
    q, k, v, _ = _inputs(jax.random.key(4), 1, 256, 256, 2, 2, 128, jnp.bfloat16)
    text = jax.jit(lambda q, k, v: dot_product_attention(q, k, v)).lower(q, k, v).as_text()
    assert "mosaic" in text.lower()
