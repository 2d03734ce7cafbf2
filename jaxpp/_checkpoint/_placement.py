"""Where a pipelined step wants its inputs: restore targets for a new pipeline layout."""

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Sharding

from jaxpp import _mpmd


def input_shardings(step: _mpmd.MpmdFunction, *args) -> tuple:
    """The sharding each argument leaf of `step(*args)` is first needed on.

    A leaf goes to the rank of the first stage whose loop task reads it (a layer's
    weights: that layer's stage), else to the first rank whose code outside the loop
    reads it (e.g. optimizer moments: where their update runs), with the in-stage
    sharding the step was given (`in_shardings`). Restoring onto these shardings puts
    each array where the new pipeline computes with it, so nothing moves twice.
    Compiles `step` for `args` (cached: the next call with arrays of these types reuses it).

    Args:
        step: a function from `jaxpp.mpmd_jit_with_loop`.
        *args: its arguments: arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape`).

    Returns:
        One tree of `jax.sharding.Sharding`s per argument.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import jaxpp
        >>> mesh = jaxpp.MpmdMesh(
        ...     jax.sharding.Mesh(np.array(jax.devices()[:2]), ("stages",)), "stages")
        >>> def loss(w, x):
        ...     h = jaxpp.mark_stage_end(jnp.tanh(x @ w["a"]))
        ...     return jaxpp.mark_stage_end(jnp.mean((h @ w["b"]) ** 2))
        >>> def step(w, xs):
        ...     _, g = jaxpp.treduce(lambda x: jax.value_and_grad(loss)(w, x), xs,
        ...                          schedule=jaxpp.GPipe(2))
        ...     return jax.tree.map(lambda p, d: p - 0.1 * d, w, g)
        >>> w = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
        >>> shardings, _ = input_shardings(jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=mesh),
        ...                                w, jnp.ones((2, 1, 3)))
        >>> [s.device_set == {d} for s, d in zip(jax.tree.leaves(shardings), jax.devices())]
        [True, True]
    """
    compiled = step.compile(*args)
    graph, plan, executor = compiled.graph, compiled.plan, compiled.executor
    placement = plan.schedule.placement
    loop_ranks: dict[str, int] = {}
    for task in sorted(graph.loop_tasks.values(), key=lambda t: t.stage):
        for name in task.inputs:
            loop_ranks.setdefault(name, placement[task.stage])
    leaves, treedef = jax.tree.flatten(args)
    shardings = []
    for name, leaf in zip(graph.step_inputs, leaves, strict=True):
        readers = plan.input_ranks.get(name, ())
        rank = loop_ranks.get(name, readers[0] if readers else 0)
        shardings.append(executor._sharding_on(leaf, rank, executor.input_specs.get(name)))
    return tuple(jax.tree.unflatten(treedef, shardings))


def abstract_state(tree, shardings=None):
    """`jax.ShapeDtypeStruct`s of a tree's leaves, placed on `shardings` (a matching tree).

    Without `shardings`, each leaf keeps the sharding it has (arrays) or gets none.
    The result is a restore target: `CheckpointManager.restore(abstract_state(...))`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        >>> abstract_state({"w": jnp.ones((2, 3))}, {"w": where})["w"]
        ShapeDtypeStruct(shape=(2, 3), dtype=float32, sharding=SingleDeviceSharding(...))
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
            ),
            tree,
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=_check_sharding(s)),
        tree,
        shardings,
    )


def _check_sharding(s) -> Sharding:
    if not isinstance(s, Sharding):
        raise TypeError(
            f"abstract_state got {s!r} where a jax.sharding.Sharding belongs. Fix: pass a tree "
            f"of shardings shaped like the state, e.g. from input_shardings(step, state, batch)."
        )
    return s


def restore_target(step: Callable, state, *other_args):
    """Where `step(state, *other_args)` wants `state`, as a restore target.

    For a pipelined step (`mpmd_jit_with_loop`) each leaf goes where `input_shardings`
    says; for anything else (e.g. `jax.jit`) each leaf keeps the sharding it has.
    `jax.device_put(state, jax.tree.map(lambda t: t.sharding, target))` places a fresh
    state the same way, so the first step compiles once for its final placement.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> target = restore_target(jax.jit(lambda w, x: w * x), {"w": jnp.ones(2)}, 2.0)
        >>> target["w"].shape, target["w"].sharding.device_set == {jax.devices()[0]}
        ((2,), True)
    """
    if isinstance(step, _mpmd.MpmdFunction):
        shardings = input_shardings(step, state, *other_args)[0]
        return abstract_state(state, shardings)
    return abstract_state(state)
