"""Pipelines a Flax linen model without editing it: stage markers around its layer calls.

`pipeline(module, num_stages=...)` returns a `PipelinedModule` whose `apply` runs
the model under `nn.intercept_methods`. The repeated layers are the direct
submodules of the model called most often (or those of class `layer=`); after
the layer that ends each stage the interceptor applies `mark_stage_end` to the
layer's output. An `nn.scan` stack of layers is split into one `lax.scan` per
stage over slices of the same stacked parameters, so the parameter tree is
unchanged and the numbers equal the unsplit model.
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxpp._flax import _layout, _marking
from jaxpp._markers import mark_stage_end


@dataclasses.dataclass(frozen=True, slots=True)
class PipelinedModule:
    """A linen module whose `apply` ends a pipeline stage every few layers.

    `init` is the wrapped module's (same parameter tree); `apply` takes the same
    arguments as the module's and computes the same values, with `mark_stage_end`
    after the layer that ends each stage, and on the output when `mark_output`.

    Attributes:
        module: the wrapped linen module.
        layout: the layers per stage, or None to split evenly into `num_stages`.
        num_stages: used when `layout` is None.
        layer: the class of the repeated layer (an `nn.scan` of it counts too), or None to
            pick the direct submodule class the model calls most often.
        mark_output: also end the last stage on the model output.
    """

    module: nn.Module
    layout: _layout.Layout | None = None
    num_stages: int | None = None
    layer: type[nn.Module] | None = None
    mark_output: bool = True

    def init(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's `init` (the pipelined model has the same parameters)."""
        return self.module.init(*args, **kwargs)

    def apply(self, variables: Mapping, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's `apply`, with stage markers; same arguments and results."""
        found = _find_layers(self.module, self.layer, variables, args, kwargs)
        layout = self._resolve_layout(found)
        if found.scan_length is not None:
            out = _apply_split_scan(self.module, found, layout, variables, args, kwargs)
        else:
            marker = _StageMarker(found=found, layout=layout)
            with nn.intercept_methods(marker):
                out = self.module.apply(variables, *args, **kwargs)
            assert marker.num_calls == len(found.paths), "bug in jaxpp: layer calls changed"
        if not self.mark_output:
            return out
        if kwargs.get("mutable", False) is not False:
            out, state = out
            return mark_stage_end(out), state
        return mark_stage_end(out)

    def _resolve_layout(self, found: "_FoundLayers") -> _layout.Layout:
        if self.layout is None:
            return _layout.even_layout(found.num_layers, self.num_stages)
        if self.layout.num_layers != found.num_layers:
            raise ValueError(
                f"layout {self.layout} has {self.layout.num_layers} layers ('t') but "
                f"{type(self.module).__name__} runs {found.num_layers} layers of class "
                f"{found.class_name}. Fix: write {found.num_layers} 't's, e.g. "
                f"'{_layout.even_layout(found.num_layers, self.layout.num_stages)}'."
            )
        return self.layout


def pipeline_linen(
    module: nn.Module,
    *,
    num_stages: int | None = None,
    layout: str | _layout.Layout | None = None,
    layer: type[nn.Module] | None = None,
    mark_output: bool = True,
) -> PipelinedModule:
    """Wraps a linen module so that its `apply` ends a pipeline stage every few layers.

    Give either `num_stages` (layers split evenly, earlier stages take the extras)
    or `layout` (e.g. `"E tt|tt L"`; see `jaxpp.flax.parse_layout`). Works for
    unrolled layers (submodules the model calls in turn; remat inside the layer is
    fine, an `nn.remat(Layer)` class hides the calls and is refused) and for one
    `nn.scan` stack (params stacked on axis 0; split into per-stage scans over slices).

    Args:
        module: the model, e.g. `GPT(config)`; it is not modified.
        num_stages: number of pipeline stages.
        layout: layers per stage, as text or `Layout`.
        layer: the repeated layer class; default: the direct submodule class called most.
        mark_output: also mark the model output (the end of the last stage).

    Returns:
        A `PipelinedModule` with the module's `init` and a marked `apply`.

    Raises:
        ValueError: for neither or both of `num_stages` and `layout`, a layout whose
            layer count differs from the model's, or more stages than layers.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxpp.models import gpt
        >>> model = gpt.GPT(gpt.GPTConfig(num_layers=4, d_model=16, num_heads=2, vocab_size=8))
        >>> tokens = jnp.zeros((1, 4), jnp.int32)
        >>> pipelined = pipeline_linen(model, layout="E t|ttt L")
        >>> variables = jax.eval_shape(pipelined.init, jax.random.key(0), tokens)
        >>> jaxpr = jax.make_jaxpr(pipelined.apply)(variables, tokens)
        >>> sum(e.primitive.name == "jaxpp_stage_end" for e in jaxpr.eqns)
        2
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"pipeline_linen takes a flax.linen Module instance, got {type(module).__name__}."
        )
    if (num_stages is None) == (layout is None):
        raise ValueError(
            f"pass exactly one of num_stages= and layout= (got num_stages={num_stages}, "
            f"layout={layout!r}). Fix: e.g. num_stages=4 or layout='E tt|tt|tt|tt L'."
        )
    if isinstance(layout, str):
        layout = _layout.parse_layout(layout)
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1.")
    return PipelinedModule(
        module, layout=layout, num_stages=num_stages, layer=layer, mark_output=mark_output
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _FoundLayers:
    """What the probe found: the layer submodules' paths in call order, or one scan stack."""

    paths: tuple[tuple[str, ...], ...]
    class_name: str
    scan_length: int | None = None  # set when the layers are one nn.scan stack

    @property
    def num_layers(self) -> int:
        return self.scan_length if self.scan_length is not None else len(self.paths)


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    cls: type
    path: tuple[str, ...]


def _find_layers(
    module: nn.Module,
    layer: type[nn.Module] | None,
    variables: Mapping,
    args: tuple,
    kwargs: Mapping,
) -> _FoundLayers:
    """Traces `module.apply` abstractly; records its direct submodule calls and children."""
    calls: list[_Call] = []
    children: dict[str, nn.Module] = {}
    depth = [0]

    def record(next_fun, call_args, call_kwargs, context):
        path = _path(context.module)
        if path == () and context.method_name == "__call__":
            out = next_fun(*call_args, **call_kwargs)
            children.update(
                (name, child)
                for name, child in context.module._state.children.items()
                if isinstance(child, nn.Module)
            )
            return out
        if not _is_direct_call(context, path) or depth[0]:
            return next_fun(*call_args, **call_kwargs)
        depth[0] += 1
        try:
            out = next_fun(*call_args, **call_kwargs)
        finally:
            depth[0] -= 1
        calls.append(_Call(type(context.module), path))
        return out

    def probe(variables):
        with nn.intercept_methods(record):
            return module.apply(variables, *args, **kwargs)

    jax.eval_shape(probe, variables)
    return _choose_layers(type(module).__name__, layer, calls, children, variables)


def _choose_layers(name, layer, calls, children, variables) -> _FoundLayers:
    lifted = {n: (c, _lift_info(type(c))) for n, c in children.items()}
    lifted = {n: (c, info) for n, (c, info) in lifted.items() if info is not None}
    if layer is not None:
        calls = [c for c in calls if issubclass(c.cls, layer)]
        lifted = {n: ci for n, ci in lifted.items() if isinstance(ci[0], layer)}
    counts: dict[type, int] = {}
    for call in calls:
        counts[call.cls] = counts.get(call.cls, 0) + 1
    repeated = [cls for cls, n in counts.items() if n >= 2 or layer is not None]
    scans = {n: ci for n, ci in lifted.items() if ci[1].kind == "scan"}
    if repeated:
        best = max(repeated, key=lambda cls: counts[cls])
        paths = tuple(c.path for c in calls if c.cls is best)
        return _FoundLayers(paths, best.__name__)
    if len(scans) == 1:
        ((child_name, (child, info)),) = scans.items()
        length = info.options.get("length")
        if length is None:
            leaves = jax.tree.leaves({k: v.get(child_name, {}) for k, v in variables.items()})
            length = leaves[0].shape[0]
        return _FoundLayers(((child_name,),), type(child).__name__, int(length))
    if len(scans) > 1:
        raise NotImplementedError(
            f"{name} runs {len(scans)} nn.scan stacks ({sorted(scans)}); jaxpp.flax splits one. "
            f"Fix: scan all layers in one nn.scan, or unroll them."
        )
    if lifted:
        kinds = sorted({f"{type(c).__name__} ({info.kind})" for c, info in lifted.values()})
        raise NotImplementedError(
            f"{name}'s layers are wrapped in lifted transforms {kinds}, which hide each layer's "
            f"call from jaxpp.flax, so stage markers cannot go between them. Fix: apply the "
            f"transform inside the layer (e.g. `nn.remat` on a method, or jax.checkpoint in "
            f"__call__), or stack the layers with one nn.scan."
        )
    seen = sorted({c.cls.__name__ for c in calls})
    wanted = f"of class {layer.__name__} " if layer is not None else "called twice "
    raise ValueError(
        f"{name} calls no submodule {wanted}and runs no nn.scan stack, so jaxpp.flax cannot "
        f"find its repeated layers (direct submodule classes called: {seen}). Fix: pass "
        f"layer=<the layer class>."
    )


def _is_direct_call(context, path: tuple[str, ...] | None) -> bool:
    """`__call__` of a direct submodule of the root, called by the root (not a transform)."""
    return (
        path is not None
        and len(path) == 1
        and context.method_name == "__call__"
        and isinstance(context.module.parent, nn.Module)
    )


def _path(module: nn.Module) -> tuple[str, ...] | None:
    scope = getattr(module, "scope", None)
    return None if scope is None else tuple(scope.path)


class _StageMarker:
    """The interceptor: counts the root's layer calls and marks the stage ends."""

    def __init__(self, *, found: _FoundLayers, layout: _layout.Layout) -> None:
        self.layout = layout
        self.paths = frozenset(found.paths)
        self.num_calls = 0
        self.depth = 0

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context) -> Any:
        path = _path(context.module)
        if self.depth or path not in self.paths or not _is_direct_call(context, path):
            return next_fun(*args, **kwargs)
        self.depth += 1
        try:
            if self.num_calls == 0 and 0 in self.layout.boundaries:
                args = _marking.mark_arrays(args)
            out = next_fun(*args, **kwargs)
        finally:
            self.depth -= 1
        self.num_calls += 1
        if self.num_calls in self.layout.boundaries:
            out = mark_stage_end(out)
        return out


# --- nn.scan stacks: split the traced scan equation -------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _LiftInfo:
    kind: str  # the lifted transform: "scan", "checkpoint", "vmap", ...
    options: Mapping[str, Any]


def _lift_info(cls: type) -> _LiftInfo | None:
    """Which flax lifted transform built the module class `cls`, or None."""
    fn = cls.__dict__.get("__call__")
    while fn is not None:
        closure = inspect.getclosurevars(fn).nonlocals
        transform = closure.get("transform")
        if transform is not None and "trafo_kwargs" in closure:
            return _LiftInfo(getattr(transform, "__name__", "?"), dict(closure["trafo_kwargs"]))
        fn = getattr(fn, "__wrapped__", None)
    return None


def _apply_split_scan(
    module: nn.Module,
    found: _FoundLayers,
    layout: _layout.Layout,
    variables: Mapping,
    args: tuple,
    kwargs: Mapping,
) -> Any:
    """Traces `module.apply`, then evaluates it with its layer scan split per stage."""

    def apply(variables, args, kwargs):
        return module.apply(variables, *args, **kwargs)

    return _marking.call_with_split_scan(
        apply,
        (variables, args, kwargs),
        scan_length=found.scan_length,
        layout_for=lambda _: layout,
        what=f"the layer stack {found.class_name}",
    )
