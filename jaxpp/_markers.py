"""`mark_stage_end`: the identity that ends a pipeline stage, forward and backward.

The marker is a linear primitive. Its transpose is the same primitive with
`direction="backward"`, so `jax.grad` of a marked function carries matching
boundaries in its backward program: the compiler reads both to split a
microbatch step into per-stage forward and backward tasks.
"""

import enum

import jax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir


class Direction(enum.StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"


def mark_stage_end[T](x: T) -> T:
    """Ends the current pipeline stage; returns `x` unchanged.

    Call it on the values that flow from one stage into the next, and once more
    after the last stage (usually on the loss). Under `jax.jit` it is the identity.

    Args:
        x: any pytree of arrays.

    Returns:
        `x`, unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> mark_stage_end({"h": jnp.ones(2)})["h"].tolist()
        [1.0, 1.0]
    """
    leaves, treedef = jax.tree.flatten(x)
    if not leaves:
        return x
    out = stage_end_p.bind(*leaves, direction=Direction.FORWARD)
    return jax.tree.unflatten(treedef, out)


stage_end_p = jex_core.Primitive("jaxpp_stage_end")
stage_end_p.multiple_results = True


@stage_end_p.def_impl
def _impl(*args: jax.Array, direction: Direction) -> tuple[jax.Array, ...]:
    del direction
    return args


@stage_end_p.def_abstract_eval
def _abstract_eval(*avals: jax.core.ShapedArray, direction: Direction):
    del direction
    return avals


def _is_differentiable(aval: jax.core.ShapedArray) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and dtype != jax.dtypes.float0


def _flip(direction: Direction) -> Direction:
    return Direction.BACKWARD if direction is Direction.FORWARD else Direction.FORWARD


def _jvp(primals, tangents, *, direction: Direction):
    out = stage_end_p.bind(*primals, direction=direction)
    # Tangents of float values are materialised so that the tangent marker (and
    # therefore the backward marker) always exists, even for unused outputs.
    marked = [i for i, t in enumerate(tangents) if _is_differentiable(t.aval)]
    if not marked:
        return out, list(tangents)
    dense = [ad.instantiate_zeros(tangents[i]) for i in marked]
    marked_out = stage_end_p.bind(*dense, direction=direction)
    tangents_out = list(tangents)
    for i, t in zip(marked, marked_out, strict=True):
        tangents_out[i] = t
    return out, tangents_out


def _transpose(cotangents, *args, direction: Direction):
    del args
    marked = [i for i, ct in enumerate(cotangents) if _is_differentiable(ct.aval)]
    if not marked:
        return list(cotangents)
    dense = [ad.instantiate_zeros(cotangents[i]) for i in marked]
    marked_out = stage_end_p.bind(*dense, direction=_flip(direction))
    result = list(cotangents)
    for i, ct in zip(marked, marked_out, strict=True):
        result[i] = ct
    return result


def _batch(batched_args, batch_dims, *, direction: Direction):
    return stage_end_p.bind(*batched_args, direction=direction), batch_dims


ad.primitive_jvps[stage_end_p] = _jvp
ad.primitive_transposes[stage_end_p] = _transpose
batching.primitive_batchers[stage_end_p] = _batch
mlir.register_lowering(stage_end_p, lambda ctx, *args, direction: list(args))
