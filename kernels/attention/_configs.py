"""Per-device-kind default tile configurations of the Mosaic kernels."""

from __future__ import annotations

import types

from jaxpp.kernels.attention._mosaic import BackwardConfig, ForwardConfig

# (device-kind family, head_dim) -> configs. Families are matched by substring of
# `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3" -> "H100").
_HOPPER_FORWARD = types.MappingProxyType(
    {
        64: ForwardConfig(block_q=64, block_kv=128, num_stages=2, compute_wgs=2),
        # ping-pong measured +11% forward geomean at head dim 128 (NOTES.md, run 2)
        128: ForwardConfig(block_q=64, block_kv=128, num_stages=2, compute_wgs=2, pingpong=True),
        256: ForwardConfig(block_q=64, block_kv=64, num_stages=2, compute_wgs=2),
    }
)
_HOPPER_BACKWARD = types.MappingProxyType(
    {
        64: BackwardConfig(block_q=64, block_kv=64, num_stages=2),
        128: BackwardConfig(block_q=64, block_kv=64, num_stages=2, overlap=True),
        256: BackwardConfig(
            block_q=64,
            block_kv=64,
            num_stages=2,
            dq_compute_wgs=1,
            dkv_compute_wgs=1,
            split_dkv=True,
        ),
    }
)
DEFAULTS = types.MappingProxyType(
    {
        "H100": (_HOPPER_FORWARD, _HOPPER_BACKWARD),
        "H200": (_HOPPER_FORWARD, _HOPPER_BACKWARD),
        "H800": (_HOPPER_FORWARD, _HOPPER_BACKWARD),
        "H20": (_HOPPER_FORWARD, _HOPPER_BACKWARD),
    }
)
HOPPER_FAMILIES = tuple(DEFAULTS)


def default_configs(device_kind: str, head_dim: int) -> tuple[ForwardConfig, BackwardConfig]:
    """The shipped forward/backward configs for a device kind and head dim.

    Unknown kinds get the Hopper defaults (the kernels only run on sm_90a anyway).

    Example:
        >>> fwd, bwd = default_configs("NVIDIA H100 80GB HBM3", 128)
        >>> fwd.block_kv, bwd.block_q
        (128, 64)
    """
    for family, (forward, backward) in DEFAULTS.items():
        if family in device_kind:
            return forward[head_dim], backward[head_dim]
    return _HOPPER_FORWARD[head_dim], _HOPPER_BACKWARD[head_dim]
