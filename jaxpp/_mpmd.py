"""`MpmdMesh` and `mpmd_jit_with_loop`: the user-facing entry to pipelined execution."""

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from jax._src import tree_util
from jax.sharding import Mesh, PartitionSpec

from jaxpp import _compiler, schedules
from jaxpp.runtime import _distributed, _local, _plan, _trace


@dataclasses.dataclass(frozen=True)
class MpmdMesh:
    """A device mesh with one axis of pipeline ranks; other axes are SPMD inside a rank.

    Args:
        jax_mesh: the whole mesh, e.g. `Mesh(devs.reshape(4, 2), ("stages", "data"))`.
        stage_axis: the name of the axis that enumerates pipeline ranks.

    Example:
        >>> import jax, numpy as np
        >>> devs = np.array(jax.devices()[:4]).reshape(4, 1)
        >>> mesh = MpmdMesh(jax.sharding.Mesh(devs, ("stages", "data")), "stages")
        >>> mesh.num_ranks, mesh.rank_mesh(1).axis_names
        (4, ('data',))
    """

    jax_mesh: Mesh
    stage_axis: str

    def __post_init__(self) -> None:
        if self.stage_axis not in self.jax_mesh.axis_names:
            raise ValueError(
                f"stage_axis {self.stage_axis!r} is not an axis of the mesh "
                f"{self.jax_mesh.axis_names}. Fix: name the pipeline axis, e.g. "
                f"MpmdMesh(Mesh(devs.reshape(4, 1), ('stages', 'data')), 'stages')."
            )

    @property
    def num_ranks(self) -> int:
        return self.jax_mesh.shape[self.stage_axis]

    def rank_mesh(self, rank: int) -> Mesh:
        """The sub-mesh of one rank: its devices with the non-stage axes."""
        axis = self.jax_mesh.axis_names.index(self.stage_axis)
        devices = np.take(self.jax_mesh.devices, rank, axis=axis)
        names = tuple(n for n in self.jax_mesh.axis_names if n != self.stage_axis)
        if not names:
            devices, names = np.reshape(devices, (1,)), ("_stage_devices",)
        return Mesh(devices, names)


def build_schedule(
    schedule, num_stages: int, num_microbatches: int, num_ranks: int
) -> schedules.Schedule:
    """The concrete schedule of a treduce loop, checked against the markers and the mesh."""
    if isinstance(schedule, schedules.Schedule):
        built = schedule
    else:
        built = schedule.build(num_microbatches)
    if built.num_stages != num_stages:
        raise ValueError(
            f"the schedule has {built.num_stages} stages but the loop body marks {num_stages} "
            f"(one mark_stage_end per stage). Fix: use e.g. {type(schedule).__name__}"
            f"({num_stages}, ...) or change the markers."
        )
    if built.num_ranks != num_ranks:
        raise ValueError(
            f"the schedule places its stages on {built.num_ranks} ranks but the mesh has "
            f"{num_ranks} along its stage axis. Fix: make the mesh's stage axis {built.num_ranks} "
            f"long, or build the schedule for {num_ranks} ranks."
        )
    schedules.validate(built)
    return built


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledPipeline:
    """A step compiled for one input structure: graph, plan and executor."""

    graph: object
    plan: _plan.Plan
    executor: _local.LocalExecutor
    out_tree: object


class MpmdFunction:
    """The callable `mpmd_jit_with_loop` returns; call it like a jitted function."""

    def __init__(
        self,
        fun: Callable,
        mpmd_mesh: MpmdMesh,
        *,
        in_shardings=None,
        costs: schedules.Costs | None = None,
    ) -> None:
        self._fun = fun
        self.mpmd_mesh = mpmd_mesh
        self._in_shardings = in_shardings
        self._costs = costs
        self._cache: dict = {}
        self._last: CompiledPipeline | None = None
        functools.update_wrapper(self, fun)

    def compile(self, *args) -> CompiledPipeline:
        """Traces and compiles for these arguments (cached by structure and shapes)."""
        leaves, in_tree = jax.tree.flatten(args)
        # Shapes and dtypes, not shardings: the next step's inputs (this step's outputs,
        # placed on their ranks) must hit the same compiled pipeline.
        key = (in_tree, tuple(_shape_dtype(x) for x in leaves))
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._compile(args, leaves, in_tree)
            self._cache[key] = compiled
        return compiled

    def _compile(self, args, leaves, in_tree) -> CompiledPipeline:
        closed, out_shape = jax.make_jaxpr(self._fun, return_shape=True)(*args)
        mesh = self.mpmd_mesh
        built: list[schedules.Schedule] = []

        def placement_of(schedule, num_stages, num_microbatches):
            b = build_schedule(schedule, num_stages, num_microbatches, mesh.num_ranks)
            built.append(b)
            return b.placement

        step = _compiler.compile_step(closed, placement_of=placement_of)
        plan = _plan.lower(step.graph, built[0], costs=self._costs)
        specs = {}
        if self._in_shardings is not None:
            per_leaf = _broadcast_specs(self._in_shardings, args)
            _check_spec_axes(per_leaf, mesh)
            specs = {
                name: spec
                for name, spec in zip(step.graph.step_inputs, per_leaf, strict=True)
                if spec is not None
            }
        rank_meshes = [mesh.rank_mesh(r) for r in range(mesh.num_ranks)]
        if jax.process_count() > 1:
            executor = _distributed.DistributedExecutor(
                step.graph,
                plan,
                rank_meshes,
                output_avals=jax.tree.leaves(out_shape),
                input_specs=specs,
            )
        else:
            executor = _local.LocalExecutor(step.graph, plan, rank_meshes, input_specs=specs)
        return CompiledPipeline(step.graph, plan, executor, jax.tree.structure(out_shape))

    def __call__(self, *args):
        compiled = self.compile(*args)
        self._last = compiled
        outs = compiled.executor.run(jax.tree.leaves(args))
        return jax.tree.unflatten(compiled.out_tree, outs)

    def profile(self, *args) -> _trace.Profile:
        """Runs one step waiting for every task, and returns what it measured.

        The profiled step is slower than a real one (ranks do not overlap); use its
        per-task times, its trace (`.chrome_trace()`) and the simulator's prediction.
        Runs the step twice (the first warms up); its results are discarded.
        """
        compiled = self.compile(*args)
        for _ in range(2):  # the first run may compile tasks for new input shardings
            compiled.executor.run(jax.tree.leaves(args), record_timing=True)
        timings = compiled.executor.last_stats.timings
        loop_tasks = {t.name: (t.stage, t.kind) for t in compiled.graph.loop_tasks.values()}
        return _trace.profile_from_timings(timings, compiled.plan.schedule, loop_tasks)

    @property
    def last_compiled(self) -> CompiledPipeline | None:
        """The graph, plan and executor the most recent call used."""
        return self._last

    @property
    def last_stats(self) -> _local.StepStats | None:
        """Statistics of the most recent step (time, peak activations, timings)."""
        return None if self._last is None else self._last.executor.last_stats


def _shape_dtype(x) -> tuple:
    aval = jax.typeof(x)
    return (tuple(aval.shape), aval.dtype, getattr(aval, "weak_type", False))


def _check_spec_axes(specs, mesh: MpmdMesh) -> None:
    allowed = tuple(n for n in mesh.jax_mesh.axis_names if n != mesh.stage_axis)
    for spec in specs:
        for entry in spec or ():
            for axis in entry if isinstance(entry, tuple) else (entry,):
                if axis is not None and axis not in allowed:
                    raise ValueError(
                        f"in_shardings names mesh axis {axis!r} in {spec}, but inside a stage "
                        f"only {allowed} exist (the stage axis {mesh.stage_axis!r} is what "
                        f"jaxpp pipelines over). Fix: shard over {allowed} or replicate (None)."
                    )


def _broadcast_specs(in_shardings, args) -> list[PartitionSpec | None]:
    """One PartitionSpec (or None) per argument leaf, from a prefix tree of specs."""

    def is_leaf(x) -> bool:
        return x is None or isinstance(x, PartitionSpec)

    try:
        return tree_util.broadcast_prefix(in_shardings, args, is_leaf=is_leaf)
    except ValueError as e:
        raise ValueError(
            f"in_shardings must be a pytree prefix of the step's arguments with a "
            f"PartitionSpec or None at each leaf: {e}. Fix: e.g. in_shardings=(None, "
            f"{{'x': P(None, 'data')}}) for arguments (state, batch)."
        ) from e


def mpmd_jit_with_loop(
    fun: Callable | None = None,
    *,
    mpmd_mesh: MpmdMesh,
    in_shardings=None,
    costs: schedules.Costs | None = None,
) -> MpmdFunction | Callable[[Callable], MpmdFunction]:
    """Like `jax.jit`, for a train step that holds one `jaxpp.treduce` loop.

    The loop body is cut into stages at `mark_stage_end`; the code before and after
    the loop runs on the ranks that own its data. Results are `jax.Array`s on the
    devices of the rank that computed them. With several processes
    (`jax.process_count() > 1`) each process runs the ranks it owns
    (`jaxpp.runtime.DistributedExecutor`); every process calls the step with the same
    arguments, and `jaxpp.runtime.fetch` brings a result to every process.

    Args:
        fun: the train step.
        mpmd_mesh: where the ranks are.
        in_shardings: optional pytree of PartitionSpecs (over the non-stage mesh axes)
            matching the arguments, for sharding inside a stage.
        costs: optional per-kind costs for ordering the schedule's actions.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import jaxpp
        >>> devices = np.array(jax.devices()[:2])
        >>> mesh = jaxpp.MpmdMesh(jax.sharding.Mesh(devices, ("stages",)), "stages")
        >>> def loss(w, x):
        ...     h = jaxpp.mark_stage_end(jnp.tanh(x @ w[0]))
        ...     return jaxpp.mark_stage_end(jnp.mean((h @ w[1]) ** 2))
        >>> def step(w, xs):
        ...     losses, g = jaxpp.treduce(lambda x: jax.value_and_grad(loss)(w, x), xs,
        ...                               schedule=jaxpp.Std1F1B(2))
        ...     return w - 0.1 * g, losses
        >>> w, xs = jnp.ones((2, 3, 3)) * 0.1, jnp.ones((4, 2, 3))
        >>> new_w, losses = jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=mesh)(w, xs)
        >>> bool(jnp.allclose(new_w, jax.jit(step)(w, xs)[0]))
        True
    """
    if fun is None:
        return functools.partial(
            mpmd_jit_with_loop, mpmd_mesh=mpmd_mesh, in_shardings=in_shardings, costs=costs
        )
    return MpmdFunction(fun, mpmd_mesh, in_shardings=in_shardings, costs=costs)
