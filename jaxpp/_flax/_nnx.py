"""Pipelines a Flax NNX model without editing it: stage markers around its layer calls.

`pipeline_nnx(model, num_stages=...)` returns a copy of the model (same state
tree, same values) whose classes are swapped for marking subclasses: the layer
that ends each stage marks its output (the first layer marks its input when the
first stage holds only the embedding) and the model marks its output. A stack of
layers run by one `nnx.scan` is split into one scan per stage over slices of the
stacked parameters.
"""

from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from jaxpp._flax import _layout, _marking


def pipeline_nnx(
    model: nnx.Module,
    *,
    num_stages: int | None = None,
    layout: str | _layout.Layout | None = None,
    layer: type[nnx.Module] | None = None,
    mark_output: bool = True,
) -> nnx.Module:
    """Returns a copy of an NNX model that ends a pipeline stage every few layers.

    The layers are the model's one attribute that is a list (or `nnx.List`) of at
    least two modules of one class (or of class `layer`), called in list order, each
    once. If there is no such list, the model's one top-level `nnx.scan` is taken
    as the layer stack and split per stage. The copy has the same state
    (`nnx.state(copy)` equals `nnx.state(model)`); the original is not modified.

    Args:
        model: the NNX model.
        num_stages: number of stages (layers split evenly, earlier stages take extras).
        layout: layers per stage as text (e.g. `"E tt|tt L"`) or `Layout`.
        layer: the layer class, when the model has several lists of modules.
        mark_output: also mark the model output (the end of the last stage).

    Returns:
        The marked copy.

    Raises:
        ValueError: for neither or both of `num_stages` and `layout`, a layout whose
            layer count differs from the model's, or several candidate layer lists.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxpp.models import gpt, gpt_nnx
        >>> cfg = gpt.GPTConfig(num_layers=4, d_model=16, num_heads=2, vocab_size=8)
        >>> model = nnx.eval_shape(lambda: gpt_nnx.GPT(cfg, rngs=nnx.Rngs(0)))  # or a real one
        >>> pipelined = pipeline_nnx(model, num_stages=2)
        >>> graphdef, state = nnx.split(pipelined)
        >>> forward = lambda state, tokens: nnx.merge(graphdef, state)(tokens)
        >>> jaxpr = jax.make_jaxpr(forward)(state, jnp.zeros((1, 4), jnp.int32))
        >>> sum(e.primitive.name == "jaxpp_stage_end" for e in jaxpr.eqns)
        2
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"pipeline_nnx takes an nnx.Module, got {type(model).__name__}.")
    if (num_stages is None) == (layout is None):
        raise ValueError(
            f"pass exactly one of num_stages= and layout= (got num_stages={num_stages}, "
            f"layout={layout!r}). Fix: e.g. num_stages=4 or layout='E tt|tt|tt|tt L'."
        )
    if isinstance(layout, str):
        layout = _layout.parse_layout(layout)
    name = type(model).__name__

    def layout_for(num_layers: int) -> _layout.Layout:
        if layout is None:
            return _layout.even_layout(num_layers, num_stages)
        if layout.num_layers != num_layers:
            raise ValueError(
                f"layout {layout} has {layout.num_layers} layers ('t') but {name} runs "
                f"{num_layers} layers. Fix: write {num_layers} 't's, e.g. "
                f"'{_layout.even_layout(num_layers, layout.num_stages)}'."
            )
        return layout

    copy = nnx.merge(*nnx.split(model))
    layers = _find_layer_list(copy, layer)
    if layers is not None:
        chosen = layout_for(len(layers))
        for index, module in enumerate(layers):
            mark_in = index == 0 and 0 in chosen.boundaries
            mark_out = index + 1 in chosen.boundaries
            if mark_in or mark_out:
                module.__class__ = _marking_subclass(type(module), mark_in, mark_out)
        root_call = None
    else:
        root_call = layout_for
    copy.__class__ = _pipelined_root(type(copy), mark_output, root_call)
    return copy


def _find_layer_list(model: nnx.Module, layer: type | None) -> Sequence[nnx.Module] | None:
    candidates = []
    for attribute, value in vars(model).items():
        if not isinstance(value, list | tuple | nnx.List):
            continue
        items = list(value)
        if len(items) < 2 or not all(isinstance(item, nnx.Module) for item in items):
            continue
        if len({type(item) for item in items}) != 1:
            continue
        if layer is not None and not isinstance(items[0], layer):
            continue
        candidates.append((attribute, items))
    if len(candidates) > 1:
        names = [attribute for attribute, _ in candidates]
        raise ValueError(
            f"{type(model).__name__} has several lists of modules that could be its layers: "
            f"{names}. Fix: pass layer=<the layer class>."
        )
    return candidates[0][1] if candidates else None


def _marking_subclass(cls: type, mark_input: bool, mark_output: bool) -> type:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if mark_input:
            args, kwargs = _marking.mark_arrays((args, kwargs))
        out = cls.__call__(self, *args, **kwargs)
        return _marking.mark_arrays(out) if mark_output else out

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def _pipelined_root(
    cls: type, mark_output: bool, split_scan: Callable[[int], _layout.Layout] | None
) -> type:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if split_scan is None:
            out = cls.__call__(self, *args, **kwargs)
        else:
            graphdef, state = nnx.split(self)

            def call(state, args, kwargs):
                return cls.__call__(nnx.merge(graphdef, state), *args, **kwargs)

            out = _marking.call_with_split_scan(
                call,
                (state, args, kwargs),
                scan_length=None,
                layout_for=split_scan,
                what=f"the layer stack of {cls.__name__}",
            )
        return _marking.mark_arrays(out) if mark_output else out

    namespace = {"__call__": __call__, "__module__": cls.__module__}
    return type(f"Pipelined{cls.__name__}", (cls,), namespace)
