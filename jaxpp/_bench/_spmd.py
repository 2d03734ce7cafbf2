"""Sharding rules for the GPT's parameters: data parallel, FSDP, Megatron tensor parallel.

Each parameter is found by its path in the GPT's tree (`layers_3/q/kernel`, or
`layers/q/kernel` with a leading layer axis under `scan_layers`). Tensor parallelism
shards the attention and MLP projections Megatron-style: `q`, `k`, `v`, `up` (and the
unembedding, vocab-parallel) by output columns over the "model" axis, `out` and `down`
by input rows. FSDP (ZeRO-3) also shards every matrix over the "data" axis on its other
dimension; XLA gathers them where they are used. Norm scales stay replicated.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.models import gpt

DATA = "data"
MODEL = "model"
_FSDP, _TP = "fsdp", "tp"

# (module, parameter) -> per-dimension role: "tp" = the model axis, "fsdp" = the data
# axis under FSDP, None = replicated.
RULES: Mapping[tuple[str, str], tuple[str | None, ...]] = {
    ("tokens", "embedding"): (_TP, _FSDP),  # [vocab, d_model], vocab-parallel
    ("embed", "positions"): (None, _FSDP),  # [max_seq_len, d_model]
    ("q", "kernel"): (_FSDP, _TP),  # column parallel
    ("k", "kernel"): (_FSDP, _TP),
    ("v", "kernel"): (_FSDP, _TP),
    ("out", "kernel"): (_TP, _FSDP),  # row parallel
    ("up", "kernel"): (_FSDP, _TP),
    ("down", "kernel"): (_TP, _FSDP),
    ("unembed", "kernel"): (_FSDP, _TP),  # [d_model, vocab], vocab-parallel logits
    ("attn_norm", "scale"): (None,),
    ("attn_norm", "bias"): (None,),
    ("mlp_norm", "scale"): (None,),
    ("mlp_norm", "bias"): (None,),
    ("norm", "scale"): (None,),
    ("norm", "bias"): (None,),
}
_TOP = ("embed", "head", "layers")


class UnknownParameterError(ValueError):
    """A parameter path that no sharding rule covers."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """How the devices split the work: `data` x `model` devices, FSDP or plain DP.

    Example:
        >>> Layout(data=2, model=2, fsdp=True).num_devices
        4
    """

    data: int = 1
    model: int = 1
    fsdp: bool = False

    def __post_init__(self) -> None:
        if self.data < 1 or self.model < 1:
            raise ValueError(f"Layout data={self.data}, model={self.model}: both must be >= 1.")

    @property
    def num_devices(self) -> int:
        """Devices the layout spans."""
        return self.data * self.model


def make_mesh(layout: Layout, devices: tuple | list | None = None) -> Mesh:
    """A ("data", "model") mesh of the first `layout.num_devices` devices.

    Raises:
        ValueError: if fewer devices are visible.

    Example:
        >>> dict(make_mesh(Layout(data=2, model=2)).shape)
        {'data': 2, 'model': 2}
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < layout.num_devices:
        raise ValueError(
            f"layout {layout} needs {layout.num_devices} devices, but {len(devices)} are visible. "
            f"Fix: pick a smaller layout, or on a CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={layout.num_devices}."
        )
    grid = np.array(devices[: layout.num_devices]).reshape(layout.data, layout.model)
    return Mesh(grid, (DATA, MODEL))


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], layout: Layout) -> P:
    """The PartitionSpec of the GPT parameter at `path` (names from the params root).

    Raises:
        UnknownParameterError: if no rule knows the path (the message lists the known ones).
        ValueError: if a sharded dimension does not divide by its axis size.

    Example:
        >>> param_spec(("layers_0", "down", "kernel"), (64, 32), Layout(data=2, model=2, fsdp=True))
        P('model', 'data')
    """
    where = "/".join(path)
    path = _normalize(tuple(path)) if path else path
    roles = RULES.get((path[-2], path[-1])) if len(path) >= 2 and path[0] in _TOP else None
    if roles is None:
        raise UnknownParameterError(_unknown(where))
    if len(shape) == len(roles) + 1 and path[0] == "layers":  # nn.scan stacks the layers
        roles = (None, *roles)
    if len(shape) != len(roles):
        raise ValueError(
            f"parameter {where} has shape {shape}, but its rule {roles} is for {len(roles)} "
            f"dimensions. Fix: update jaxpp._bench._spmd.RULES for the changed GPT."
        )
    axes = []
    for size, role in zip(shape, roles, strict=True):
        axis, count = None, 1
        if role == _TP and layout.model > 1:
            axis, count = MODEL, layout.model
        elif role == _FSDP and layout.fsdp and layout.data > 1:
            axis, count = DATA, layout.data
        if size % count:
            raise ValueError(
                f"parameter {where} of shape {shape}: dimension {size} does not split over "
                f"the {count} devices of mesh axis {axis!r}. Fix: choose sizes divisible by "
                f"{count} (e.g. heads, d_ff, vocab) or a smaller {axis} axis."
            )
        axes.append(axis)
    return P(*axes)


def state_specs(state: Any, layout: Layout) -> Any:
    """PartitionSpecs for a whole train state: parameters and every optimizer leaf that
    mirrors one (AdamW's `mu`, `nu`) by the parameter's rule; scalars replicated.

    Raises:
        UnknownParameterError: for an array leaf that is not under a GPT parameter path.

    Example:
        >>> state = {"params": {"head": {"norm": {"scale": np.ones(4)}}}, "step": np.int32(0)}
        >>> state_specs(state, Layout())
        {'params': {'head': {'norm': {'scale': P(None,)}}}, 'step': P()}
    """

    def spec(path, leaf) -> P:
        shape = tuple(np.shape(leaf))
        if not shape:
            return P()
        names = tuple(_key_name(k) for k in path)
        for i, name in enumerate(names):
            if name in _TOP or (name.startswith("layers_") and name[7:].isdigit()):
                return param_spec(names[i:], shape, layout)
        raise UnknownParameterError(_unknown("/".join(names)))

    return jax.tree_util.tree_map_with_path(spec, state)


def state_shardings(state: Any, layout: Layout, mesh: Mesh) -> Any:
    """`state_specs` as NamedShardings on `mesh`.

    Example:
        >>> mesh = make_mesh(Layout(data=2))
        >>> state_shardings({"step": np.int32(0)}, Layout(data=2), mesh)["step"].spec
        P()
    """
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, layout))


def activation_sharding(layout: Layout, mesh: Mesh) -> gpt.ActivationSharding:
    """The GPT's activations under `layout`: batch over "data", heads and MLP width over
    "model" (Megatron), the residual stream whole.

    Both mesh axes are named even where one has size 1 (`dp4`'s "model", `tp4`'s "data"):
    splitting over one device is free, but an axis the attention's `shard_map` leaves out
    gets a `psum` of q, k and v's cotangents in the backward pass (a collective per layer
    per microbatch, over one device).

    Example:
        >>> layout = Layout(data=4)
        >>> activation_sharding(layout, make_mesh(layout)).heads
        P('data', None, 'model', None)
    """
    if dict(mesh.shape) != {DATA: layout.data, MODEL: layout.model}:
        raise ValueError(
            f"mesh {dict(mesh.shape)} does not match layout {layout}. "
            f"Fix: build the mesh with make_mesh(layout)."
        )
    return gpt.ActivationSharding(mesh, (DATA,), MODEL)


def batch_spec(layout: Layout) -> P:
    """Spec of a microbatched token array [microbatches, batch, seq]: batch over "data".

    Example:
        >>> batch_spec(Layout(data=4))
        P(None, 'data')
    """
    return P(None, DATA) if layout.data > 1 else P()


def _normalize(names: tuple[str, ...]) -> tuple[str, ...]:
    # "layers_3/q/kernel" and "layers/q/kernel" both start at the top module.
    head = "layers" if names[0].startswith("layers") else names[0]
    return (head, *names[1:])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _unknown(where: str) -> str:
    known = ", ".join("/".join(k) for k in RULES)
    return (
        f"no sharding rule for GPT parameter {where!r}. Known (module/param): {known}. "
        f"Fix: add its rule to jaxpp._bench._spmd.RULES."
    )
