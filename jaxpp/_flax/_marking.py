"""Shared by the linen and NNX wrappers: marking array leaves, splitting a traced layer scan."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxpp._flax import _layout
from jaxpp._markers import mark_stage_end


def mark_arrays[T](tree: T) -> T:
    """`mark_stage_end` on the array leaves of `tree`; other leaves pass through."""
    leaves, treedef = jax.tree.flatten(tree)
    positions = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    marked = mark_stage_end([leaves[i] for i in positions])
    for i, value in zip(positions, marked, strict=True):
        leaves[i] = value
    return jax.tree.unflatten(treedef, leaves)


def call_with_split_scan(
    fun: Callable[..., Any],
    args: tuple,
    *,
    scan_length: int | None,
    layout_for: Callable[[int], _layout.Layout],
    what: str,
) -> Any:
    """`fun(*args)`, with its top-level layer `scan` run as one scan per stage.

    `fun` is traced to a jaxpr; the one top-level `scan` equation of length
    `scan_length` (or the only top-level scan, when None) is the layer stack. It is
    evaluated as consecutive scans over slices of its inputs (the stacked
    parameters), with `mark_stage_end` on the carry between them, so the result
    equals `fun(*args)`. `layout_for(length)` gives the stage sizes.
    """
    leaves, treedef = jax.tree.flatten(args)
    dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def flat_fun(*arrays):
        full = list(leaves)
        for i, array in zip(dynamic, arrays, strict=True):
            full[i] = array
        return fun(*jax.tree.unflatten(treedef, full))

    arrays = [leaves[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*arrays)
    targets = [
        i
        for i, eqn in enumerate(closed.jaxpr.eqns)
        if eqn.primitive.name == "scan"
        and (scan_length is None or eqn.params["length"] == scan_length)
    ]
    if len(targets) != 1:
        length = "" if scan_length is None else f" of length {scan_length}"
        raise NotImplementedError(
            f"jaxpp.flax expected one top-level scan{length} ({what}) in the traced model, "
            f"found {len(targets)}. Fix: unroll the layers into a list, or scan them with one "
            f"nn.scan / nnx.scan called directly from the model."
        )
    eqn = closed.jaxpr.eqns[targets[0]]
    layout = layout_for(int(eqn.params["length"]))
    outs = _eval_split(closed, targets[0], layout, arrays)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | jax.core.Tracer)


def _eval_split(closed, target: int, layout: _layout.Layout, args: list) -> list:
    """`jax.core.eval_jaxpr`, with equation `target` (a scan) run as one scan per stage."""
    jaxpr = closed.jaxpr
    env: dict = {}

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, closed.consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        if index == target:
            outs = _split_scan_eqn(eqn, invals, layout)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _split_scan_eqn(eqn, invals: list, layout: _layout.Layout) -> list:
    params = eqn.params
    if params["reverse"]:
        raise NotImplementedError("jaxpp.flax cannot split a reversed layer scan (reverse=True).")
    consts, carry, xs = (list(part) for part in params["ft_in"].update(invals).unpack())
    start, ys_parts = 0, []
    for stage, size in enumerate(layout.stage_sizes):
        if size:
            sliced = [x[start : start + size] for x in xs]
            stage_params = eqn.primitive.get_bind_params(dict(params, length=size))
            outs = eqn.primitive.bind(*consts, *carry, *sliced, **stage_params)
            carry, ys = (list(part) for part in params["ft_out"].update(outs).unpack())
            ys_parts.append(ys)
            start += size
        if stage < layout.num_stages - 1:
            carry = list(mark_stage_end(tuple(carry)))
    ys = [jnp.concatenate(parts) for parts in zip(*ys_parts, strict=True)]
    return [*carry, *ys]
