"""Sharding annotations inside a stage, moved onto the rank that runs it.

A pipelined step is traced once, but each rank runs its tasks on its own devices. So
users write their in-stage annotations (`with_sharding_constraint`, `jax.shard_map`)
against a *template* mesh with the rank meshes' axis names and sizes, such as
`mpmd_mesh.rank_mesh(0)`. While a task is traced for rank r (`on_rank`), the equations
it binds (`rank_params`) use, in place of every such mesh, the same mesh on rank r's
devices: in the `sharding` of sharding constraints, the `mesh` of shard_maps, any
`NamedSharding`, and inside nested jaxprs (jit, remat, scan, cond, while, shard_map,
custom_jvp/custom_vjp bodies).
"""

import contextvars
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from jax._src import source_info_util
from jax.extend import core as jex_core
from jax.sharding import Mesh, NamedSharding


class MeshMismatchError(ValueError):
    """A sharding annotation names a mesh the rank's mesh cannot stand in for."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Rank:
    """The rank a task is being traced for, and what was already moved onto it."""

    rank: int
    mesh: Mesh
    meshes: dict = dataclasses.field(default_factory=dict)  # template -> moved
    jaxprs: dict = dataclasses.field(default_factory=dict)  # id -> (original, moved)


_TRACING: contextvars.ContextVar[_Rank | None] = contextvars.ContextVar(
    "jaxpp_rank_mesh", default=None
)


def on_rank(fn: Callable[..., Any], rank: int, mesh: Mesh) -> Callable[..., Any]:
    """`fn` traced for `rank`: its equations' template meshes become `mesh`.

    Only equations bound through `rank_params` are moved (the compiler's task functions
    bind all theirs so); anything else `fn` does is unchanged.

    Example:
        >>> import jax, numpy as np
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
        >>> on_rank(lambda x: x + 1, 0, mesh)(1)
        2
    """

    @functools.wraps(fn)
    def traced_for_rank(*args: Any) -> Any:
        token = _TRACING.set(_Rank(rank, mesh))
        try:
            return fn(*args)
        finally:
            _TRACING.reset(token)

    return traced_for_rank


def rank_params(eqn: jex_core.JaxprEqn) -> Mapping[str, Any]:
    """`eqn.params` for the rank being traced (the same object outside `on_rank`).

    Raises:
        MeshMismatchError: if a mesh in them has other axis names or sizes than the
            rank's mesh; says which and how to fix it.

    Example:
        >>> import jax
        >>> eqn = jax.make_jaxpr(lambda x: x + 1)(1).eqns[0]
        >>> rank_params(eqn) is eqn.params
        True
    """
    target = _TRACING.get()
    if target is None:
        return eqn.params
    return _move_params(eqn, target)


def _move_params(eqn: jex_core.JaxprEqn, target: _Rank) -> Mapping[str, Any]:
    moved = {k: _move_value(v, eqn, target) for k, v in eqn.params.items()}
    if all(moved[k] is v for k, v in eqn.params.items()):
        return eqn.params
    return moved


def _move_value(value: Any, eqn: jex_core.JaxprEqn, target: _Rank) -> Any:
    if isinstance(value, Mesh):
        return _move_mesh(value, eqn, target)
    if isinstance(value, NamedSharding):
        mesh = value.mesh
        if not isinstance(mesh, Mesh):
            return value  # an abstract mesh names no devices
        moved = _move_mesh(mesh, eqn, target)
        return value if moved is mesh else value.update(mesh=moved)
    if isinstance(value, jex_core.Jaxpr):
        return _move_jaxpr(value, target)
    if type(value) in (tuple, list):
        items = [_move_value(v, eqn, target) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    return value


def _move_jaxpr(jaxpr: jex_core.Jaxpr, target: _Rank) -> jex_core.Jaxpr:
    # One jaxpr may be shared by many equations (a function jitted once, called often).
    done = target.jaxprs.get(id(jaxpr))
    if done is not None:
        return done[1]
    eqns = list(jaxpr.eqns)
    changed = False
    for i, inner in enumerate(eqns):
        params = _move_params(inner, target)
        if params is not inner.params:
            eqns[i] = inner.replace(params=dict(params))
            changed = True
    moved = jaxpr.replace(eqns=eqns) if changed else jaxpr
    target.jaxprs[id(jaxpr)] = (jaxpr, moved)  # keeps `jaxpr` alive, so its id stays its own
    return moved


def _move_mesh(mesh: Mesh, eqn: jex_core.JaxprEqn, target: _Rank) -> Mesh:
    if mesh.empty or mesh is target.mesh:
        return mesh
    moved = target.meshes.get(mesh)
    if moved is not None:
        return moved
    if mesh.shape_tuple != target.mesh.shape_tuple:
        where = source_info_util.summarize(eqn.source_info)
        raise MeshMismatchError(
            f"`{eqn.primitive.name}` at {where} shards over a mesh with axes "
            f"{dict(mesh.shape)}, but rank {target.rank} runs its stage on a mesh with axes "
            f"{dict(target.mesh.shape)}: a sharding annotation inside a pipeline stage must "
            f"name the axes of a rank's mesh. Fix: build it on a template mesh with those "
            f"axes, e.g. `mpmd_mesh.rank_mesh(0)` (jaxpp moves it onto each rank's "
            f"devices), not on the whole mesh with the stage axis."
        )
    moved = Mesh(target.mesh.devices, mesh.axis_names, axis_types=mesh.axis_types)
    if moved == target.mesh:
        moved = target.mesh
    target.meshes[mesh] = moved
    return moved
