"""`dot_product_attention`: argument checks, implementation choice, custom VJP."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxpp.kernels.attention import _configs, _mosaic, _mosaic_fused, _reference, _triton

IMPLEMENTATIONS = ("auto", "mosaic", "triton", "xla")
MOSAIC_HEAD_DIMS = (64, 128, 256)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    implementation: str = "auto",
    compute_dtype: jnp.dtype | None = None,
    forward_config: _mosaic.ForwardConfig | None = None,
    backward_config: _mosaic.BackwardConfig | None = None,
    triton_config: _triton.TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Scaled dot-product attention in BTNH layout, differentiable.

    Same semantics as `jax.nn.dot_product_attention(q, k, v, scale=..., is_causal=...)`:
    q is [batch, q_len, num_heads, head_dim], k and v are [batch, kv_len, num_kv_heads,
    head_dim] with num_heads a multiple of num_kv_heads (GQA/MQA); causal masking is
    top-left aligned (query i sees keys j <= i).

    Args:
        q, k, v: inputs of one dtype (float16 or bfloat16 for the kernels; float32 runs
            on "xla", or on a kernel in `compute_dtype` when given).
        causal: mask keys after the query position.
        scale: logit scale; default 1/sqrt(head_dim).
        implementation: "mosaic" (Pallas Mosaic GPU, Hopper sm_90a), "triton" (Pallas
            Triton, FA2-style, for other GPUs; checked in interpret mode only so far),
            "xla" (reference, any backend) or "auto" (mosaic on Hopper for the supported
            head dims and dtypes, else xla; xla on CPU).
        compute_dtype: float32 inputs only: run the kernel in this 16-bit dtype
            (e.g. jnp.bfloat16) and return float32.
        forward_config, backward_config: override the per-device default Mosaic tiles.
        triton_config: override the Triton tiles.
        interpret: run the Pallas kernels in interpret mode (CPU tests).

    Returns:
        The attention output, shape and dtype of q.

    Raises:
        ValueError: for inconsistent shapes or dtypes, or an unknown implementation.
        NotImplementedError: for a combination the chosen implementation cannot run.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> q = jax.random.normal(jax.random.key(0), (1, 8, 4, 64), jnp.bfloat16)
        >>> kv = jax.random.normal(jax.random.key(1), (1, 8, 2, 64), jnp.bfloat16)
        >>> dot_product_attention(q, kv, kv, causal=True).shape
        (1, 8, 4, 64)
    """
    _check_inputs(q, k, v, implementation)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    device = _device_of(q)
    on_gpu, device_kind = device.platform == "gpu", device.device_kind
    kernel_dtype = q.dtype if compute_dtype is None else jnp.dtype(compute_dtype)
    if implementation == "auto":
        hopper = on_gpu and any(f in device_kind for f in _configs.HOPPER_FAMILIES)
        ok = head_dim in MOSAIC_HEAD_DIMS and kernel_dtype in (jnp.float16, jnp.bfloat16)
        implementation = "mosaic" if (hopper and ok) or interpret else "xla"
    if implementation == "xla":
        return _reference.xla_attention(q, k, v, causal=causal, scale=scale)
    _check_kernel(implementation, head_dim, kernel_dtype)
    fwd_default, bwd_default = _configs.default_configs(device_kind, head_dim)
    static = _Static(
        implementation=implementation,
        causal=bool(causal),
        scale=scale,
        q_len=q.shape[1],
        kv_len=k.shape[1],
        forward=forward_config or fwd_default,
        backward=backward_config or bwd_default,
        triton=triton_config or _triton.TritonConfig(),
        interpret=bool(interpret),
    )
    out_dtype = q.dtype
    q, k, v = (x.astype(kernel_dtype) for x in (q, k, v))
    return _kernel_attention(q, k, v, static).astype(out_dtype)


def _device_of(x: jax.Array) -> jax.Device:
    """The device x lives on; under tracing, the default device."""
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "devices"):
        return jax.devices()[0]
    return next(iter(x.devices()))


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is unknown; use one of {IMPLEMENTATIONS}."
        )
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be 4-D [batch, seq, heads, head_dim] (BTNH); got ranks "
            f"{q.ndim}, {k.ndim}, {v.ndim}. Add a batch axis with x[None]."
        )
    if k.shape != v.shape:
        raise ValueError(f"k.shape {k.shape} != v.shape {v.shape}; k and v must match.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {q.shape} and k {k.shape} differ in batch or head_dim; they must match."
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"num_heads={q.shape[2]} is not a multiple of num_kv_heads={k.shape[2]}; "
            "GQA needs each kv head shared by the same number of q heads."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype."
        )
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"empty sequence (q_len={q.shape[1]}, kv_len={k.shape[1]}).")


def _check_kernel(implementation: str, head_dim: int, kernel_dtype: jnp.dtype) -> None:
    if head_dim not in MOSAIC_HEAD_DIMS:
        raise NotImplementedError(
            f"implementation={implementation!r} supports head_dim in {MOSAIC_HEAD_DIMS}, got "
            f"{head_dim}; use implementation='xla' (or 'auto')."
        )
    if kernel_dtype not in (jnp.float16, jnp.bfloat16):
        raise NotImplementedError(
            f"implementation={implementation!r} computes in float16/bfloat16, got "
            f"{kernel_dtype}; pass compute_dtype=jnp.bfloat16 to run float32 inputs in "
            "bfloat16, or use implementation='xla'."
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Static:
    implementation: str  # "mosaic" or "triton"
    causal: bool
    scale: float
    q_len: int
    kv_len: int
    forward: _mosaic.ForwardConfig
    backward: _mosaic.BackwardConfig
    triton: _triton.TritonConfig
    interpret: bool  # or plgpu.InterpretGPUParams (private hook: tests/attention/)

    def padded_lengths(self) -> tuple[int, int]:
        if self.implementation == "triton":
            q_mult = kv_mult = math.lcm(self.triton.block_q, self.triton.block_kv)
        else:
            f, b = self.forward, self.backward
            q_mult = math.lcm(f.block_q * f.compute_wgs, b.block_q * b.dq_compute_wgs, b.block_q)
            kv_mult = math.lcm(f.block_kv, b.block_kv * b.dkv_compute_wgs, b.block_kv)
        return -(-self.q_len // q_mult) * q_mult, -(-self.kv_len // kv_mult) * kv_mult


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, static: _Static) -> jax.Array:
    return _kernel_fwd(q, k, v, static)[0]


def _kernel_fwd(q, k, v, static: _Static):
    t_pad, s_pad = static.padded_lengths()
    qp, kp, vp = _pad_seq(q, t_pad), _pad_seq(k, s_pad), _pad_seq(v, s_pad)
    common = dict(
        causal=static.causal, scale=static.scale, kv_len=static.kv_len, interpret=static.interpret
    )
    if static.implementation == "triton":
        out, lse = _triton.forward(qp, kp, vp, config=static.triton, **common)
    else:
        out, lse = _mosaic.forward(qp, kp, vp, config=static.forward, **common)
    return out[:, : static.q_len], (qp, kp, vp, out, lse)


def _kernel_bwd(static: _Static, residuals, d_out):
    qp, kp, vp, out, lse = residuals
    q_len, kv_len = static.q_len, static.kv_len
    dop = _pad_seq(d_out.astype(qp.dtype), qp.shape[1])
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), dop.astype(jnp.float32))
    args = (qp, kp, vp, dop, lse, delta)
    common = dict(causal=static.causal, scale=static.scale, interpret=static.interpret)
    if static.implementation == "triton":
        dq, dk, dv = _triton.backward(
            *args, q_len=q_len, kv_len=kv_len, config=static.triton, **common
        )
    elif static.backward.fused:
        fused = functools.partial(
            _mosaic_fused.backward_fused, *args, q_len=q_len, kv_len=kv_len, **common
        )
        if static.backward.split_dkv:  # fused dK + dQ kernel, then the dV pass
            dq_acc, dk = fused(config=static.backward, outputs="dk")
            (dv,) = _mosaic.backward_dkv(
                *args, q_len=q_len, outputs="dv", config=static.backward, **common
            )
        else:
            dq_acc, dk, dv = fused(config=static.backward)
        dq = (dq_acc[:, :q_len] * static.scale).astype(qp.dtype)
    else:
        common["config"] = static.backward
        dq = _mosaic.backward_dq(*args, kv_len=kv_len, **common)
        if static.backward.split_dkv:
            (dk,) = _mosaic.backward_dkv(*args, q_len=q_len, outputs="dk", **common)
            (dv,) = _mosaic.backward_dkv(*args, q_len=q_len, outputs="dv", **common)
        else:
            dk, dv = _mosaic.backward_dkv(*args, q_len=q_len, outputs="dkv", **common)
    batch, s_pad, num_heads, head_dim = dk.shape
    num_kv_heads = kp.shape[2]
    if num_heads != num_kv_heads:  # dK, dV come per q head: sum each kv head's group
        shape = (batch, s_pad, num_kv_heads, num_heads // num_kv_heads, head_dim)
        dk = dk.reshape(shape).sum(axis=3, dtype=jnp.float32).astype(kp.dtype)
        dv = dv.reshape(shape).sum(axis=3, dtype=jnp.float32).astype(vp.dtype)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


_kernel_attention.defvjp(_kernel_fwd, _kernel_bwd)
