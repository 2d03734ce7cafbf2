"""`pipeline`: one entry point for linen and NNX models."""

from typing import Any

import flax.linen as nn
from flax import nnx

from jaxpp._flax import _layout, _linen, _nnx


def pipeline(
    model: nn.Module | nnx.Module,
    *,
    num_stages: int | None = None,
    layout: str | _layout.Layout | None = None,
    layer: type | None = None,
    mark_output: bool = True,
) -> Any:
    """Pipelines a Flax model: `pipeline_linen` for linen modules, `pipeline_nnx` for NNX.

    Args:
        model: a linen `Module` instance or an NNX `Module`.
        num_stages: number of stages; layers are split evenly.
        layout: or a layout string such as `"E tt|tt L"` (see `parse_layout`).
        layer: the repeated layer class, when it cannot be found automatically.
        mark_output: also end the last stage on the model output.

    Returns:
        A `PipelinedModule` (linen) or a marked copy of the model (NNX).

    Raises:
        TypeError: if `model` is neither.

    Example:
        >>> from jaxpp.models import gpt
        >>> model = gpt.GPT(gpt.GPTConfig(num_layers=2, d_model=16, num_heads=2))
        >>> pipeline(model, num_stages=2).layout is None
        True
    """
    options = dict(num_stages=num_stages, layout=layout, layer=layer, mark_output=mark_output)
    if isinstance(model, nn.Module):
        return _linen.pipeline_linen(model, **options)
    if isinstance(model, nnx.Module):
        return _nnx.pipeline_nnx(model, **options)
    raise TypeError(
        f"jaxpp.flax.pipeline takes a flax.linen or flax.nnx Module, got "
        f"{type(model).__name__}. Fix: pass the model instance, e.g. GPT(config)."
    )
