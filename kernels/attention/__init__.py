"""kernels/attention: FlashAttention for Hopper (Pallas Mosaic GPU), a Pallas Triton
fallback and an XLA reference.

`dot_product_attention` is the entry point (BTNH, GQA/MQA, causal, forward and backward).
"""

from jaxpp.kernels.attention._api import dot_product_attention as dot_product_attention
from jaxpp.kernels.attention._configs import default_configs as default_configs
from jaxpp.kernels.attention._mosaic import BackwardConfig as BackwardConfig
from jaxpp.kernels.attention._mosaic import ForwardConfig as ForwardConfig
from jaxpp.kernels.attention._reference import xla_attention as xla_attention
from jaxpp.kernels.attention._triton import TritonConfig as TritonConfig

__all__ = [
    "BackwardConfig",
    "ForwardConfig",
    "TritonConfig",
    "default_configs",
    "dot_product_attention",
    "xla_attention",
]
