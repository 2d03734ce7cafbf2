"""`treduce`: the gradient-accumulation loop over microbatches that jaxpp pipelines.

Under `jax.jit` (or eagerly) it is a plain sequential loop, the reference
semantics. Under `mpmd_jit_with_loop` the compiler finds its equation, splits the
body into per-stage tasks and runs them in the order the schedule gives.
"""

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from jax._src.interpreters import partial_eval as pe
from jax.extend import core as jex_core
from jax.interpreters import ad, mlir

from jaxpp import schedules


class Operation(Protocol):
    """How one output of the loop body combines across microbatches."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Concat:
    """Stacks the per-microbatch values on a new leading axis (e.g. losses)."""

    name: str = "concat"


@dataclasses.dataclass(frozen=True, slots=True)
class Add:
    """Sums the per-microbatch values (e.g. gradients)."""

    name: str = "add"


@dataclasses.dataclass(frozen=True, slots=True)
class Mean:
    """Averages the per-microbatch values."""

    name: str = "mean"


@dataclasses.dataclass(frozen=True, slots=True)
class Max:
    """Elementwise maximum over microbatches."""

    name: str = "max"


_OPERATIONS = ("concat", "add", "mean", "max")
ScheduleLike = schedules.ScheduleBuilder | schedules.Schedule


def treduce[T](
    fun: Callable[..., T],
    xs,
    schedule: ScheduleLike,
    operation=(Concat(), Add()),
) -> T:
    """Runs `fun` on every microbatch of `xs` (its axis 0) and reduces the results.

    Args:
        fun: the per-microbatch step, e.g. `jax.value_and_grad` of a loss whose
            stages end with `mark_stage_end`.
        xs: a pytree whose leaves all have the number of microbatches as axis 0.
        schedule: a schedule builder (e.g. `jaxpp.Std1F1B(4)`) or a concrete
            `Schedule`; used by `mpmd_jit_with_loop`, ignored by plain `jax.jit`.
        operation: a pytree prefix of `fun`'s output with one `Concat`, `Add`,
            `Mean` or `Max` per subtree.

    Returns:
        `fun`'s output structure, each leaf reduced over microbatches.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxpp import schedules
        >>> xs = jnp.arange(6.0).reshape(3, 2)
        >>> out = treduce(lambda x: (x.sum(), x), xs, schedules.GPipe(1), (Concat(), Add()))
        >>> out[0].tolist(), out[1].tolist()
        ([1.0, 5.0, 9.0], [6.0, 9.0])
    """
    leaves, in_tree = jax.tree.flatten(xs)
    num_microbatches = _num_microbatches(leaves)
    _check_schedule(schedule, num_microbatches)
    mb_avals = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in leaves]

    def flat_fun(*mb_leaves):
        return fun(jax.tree.unflatten(in_tree, mb_leaves))

    closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*mb_avals)
    out_leaves, out_tree = jax.tree.flatten(out_shape)
    operations = _expand_operations(operation, out_shape, out_tree)
    body = jex_core.ClosedJaxpr(pe.convert_constvars_jaxpr(closed.jaxpr), ())
    outs = treduce_p.bind(
        *closed.consts,
        *leaves,
        body=body,
        num_consts=len(closed.consts),
        operations=operations,
        schedule=schedule,
        num_microbatches=num_microbatches,
    )
    return jax.tree.unflatten(out_tree, outs)


def treduce_i[T](
    fun: Callable[[jax.Array], T],
    num_microbatches: int,
    schedule: ScheduleLike,
    operation=(Concat(), Add()),
) -> T:
    """Index form of `treduce`: `fun` receives the microbatch index.

    Example:
        >>> from jaxpp import schedules
        >>> treduce_i(lambda i: i * 2.0, 3, schedules.GPipe(1), Add()).item()
        6.0
    """
    return treduce(fun, jnp.arange(num_microbatches), schedule, operation)


def split_microbatches[T](batch: T, num_microbatches: int) -> T:
    """Reshapes every leaf's axis 0 from `B` to `(num_microbatches, B // num_microbatches)`.

    Raises:
        ValueError: if a leaf's batch size is not divisible by `num_microbatches`.

    Example:
        >>> import jax.numpy as jnp
        >>> split_microbatches({"x": jnp.zeros((8, 3))}, 4)["x"].shape
        (4, 2, 3)
    """
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an int >= 1, got {num_microbatches!r}.")

    def split(path, x):
        size = x.shape[0] if getattr(x, "ndim", 0) else None
        if size is None or size % num_microbatches:
            where = jax.tree_util.keystr(path) or "the batch"
            raise ValueError(
                f"{where} has batch size {size}, which does not split into {num_microbatches} "
                f"equal microbatches. Fix: choose a batch size that is a multiple of "
                f"{num_microbatches}, or a microbatch count that divides {size}."
            )
        return x.reshape(num_microbatches, size // num_microbatches, *x.shape[1:])

    return jax.tree_util.tree_map_with_path(split, batch)


def _num_microbatches(leaves: list) -> int:
    if not leaves:
        raise ValueError("treduce needs at least one array in `xs` to loop over.")
    sizes = {getattr(x, "shape", ())[:1] for x in leaves}
    if len(sizes) != 1 or () in sizes:
        raise ValueError(
            f"treduce loops over axis 0 of every leaf of `xs`, but the leading sizes differ or "
            f"are missing: {sorted(str(s) for s in sizes)}. Fix: reshape the batch to "
            f"(num_microbatches, microbatch_size, ...) for every leaf, e.g. "
            f"`x.reshape(num_microbatches, -1, *x.shape[1:])`."
        )
    return sizes.pop()[0]


def _check_schedule(schedule: ScheduleLike, num_microbatches: int) -> None:
    if isinstance(schedule, schedules.Schedule):
        if schedule.num_microbatches != num_microbatches:
            raise ValueError(
                f"the schedule is written for {schedule.num_microbatches} microbatches but `xs` "
                f"has {num_microbatches} on axis 0. Fix: reshape the batch into "
                f"{schedule.num_microbatches} microbatches or use a schedule builder."
            )
    elif not hasattr(schedule, "build"):
        raise TypeError(
            f"schedule must be a schedule builder such as jaxpp.Std1F1B(4) or a "
            f"jaxpp.schedules.Schedule, got {type(schedule).__name__}."
        )


def _expand_operations(operation, out_shape, out_tree) -> tuple[str, ...]:
    def is_op(x) -> bool:
        return isinstance(x, (Concat, Add, Mean, Max))

    try:
        per_leaf = jax.tree.map(
            lambda op, sub: jax.tree.map(lambda _: op.name, sub),
            operation,
            out_shape,
            is_leaf=is_op,
        )
    except ValueError as e:
        raise ValueError(
            f"`operation` must be a pytree prefix of the loop body's output {out_tree}, with one "
            f"of Concat(), Add(), Mean(), Max() per subtree; got {operation!r}. Fix: for a body "
            f"returning (loss, grads) pass operation=(Concat(), Add())."
        ) from e
    names = tuple(jax.tree.leaves(per_leaf))
    if len(names) != out_tree.num_leaves or not all(n in _OPERATIONS for n in names):
        raise ValueError(f"bad `operation` {operation!r} for the body output {out_tree}.")
    return names


# -- the primitive ------------------------------------------------------------------------

treduce_p = jex_core.Primitive("jaxpp_treduce")
treduce_p.multiple_results = True


def _out_avals(body, operations, num_microbatches):
    avals = []
    for aval, op in zip(body.out_avals, operations, strict=True):
        if op == "concat":
            avals.append(aval.update(shape=(num_microbatches, *aval.shape)))
        else:
            avals.append(aval)
    return avals


@treduce_p.def_abstract_eval
def _abstract_eval(*args, body, num_consts, operations, schedule, num_microbatches):
    del args, num_consts, schedule
    return _out_avals(body, operations, num_microbatches)


def reference_loop(*args, body, num_consts, operations, num_microbatches, schedule=None):
    """The sequential semantics of `treduce`: microbatches in order 0, 1, ...

    Accumulates in the same order the pipeline does (microbatch order per stage).
    """
    del schedule
    consts, xs = args[:num_consts], args[num_consts:]
    accumulators: list = [None] * len(operations)
    stacked: list[list] = [[] for _ in operations]
    for mb in range(num_microbatches):
        outs = jex_core.jaxpr_as_fun(body)(*consts, *(x[mb] for x in xs))
        for i, (op, out) in enumerate(zip(operations, outs, strict=True)):
            if op == "concat":
                stacked[i].append(out)
            elif accumulators[i] is None:
                accumulators[i] = out
            else:
                accumulators[i] = combine(op, accumulators[i], out)
    results = []
    for i, op in enumerate(operations):
        if op == "concat":
            results.append(jnp.stack(stacked[i]))
        else:
            results.append(finalize(op, accumulators[i], num_microbatches))
    return results


def combine(op: str, acc: jax.Array, value: jax.Array) -> jax.Array:
    """One accumulation step of a non-concat operation."""
    if op == "max":
        return jnp.maximum(acc, value)
    return acc + value


def finalize(op: str, acc: jax.Array, num_microbatches: int) -> jax.Array:
    """The accumulated value after the last microbatch."""
    if op == "mean":
        return (acc / num_microbatches).astype(acc.dtype)
    return acc


treduce_p.def_impl(reference_loop)
mlir.register_lowering(treduce_p, mlir.lower_fun(reference_loop, multiple_results=True))


def _no_jvp(primals, tangents, **params):
    raise NotImplementedError(
        "jaxpp.treduce is not differentiable from the outside. Fix: take the gradient inside the "
        "loop body (treduce(jax.value_and_grad(loss), batch, ...)), as a train step does."
    )


ad.primitive_jvps[treduce_p] = _no_jvp
