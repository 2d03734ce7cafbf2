"""The pipeline compiler: a traced train step -> `runtime.TaskGraph`.

The step's jaxpr holds one `treduce` equation. Its body (one microbatch) is cut
into tasks by *position* along the pipeline: forward of stage s is position s,
backward of stage s is position 2S-1-s. Every `mark_stage_end` moves values one
position on; any other equation sits at the latest position of its inputs (the
earliest point where they all exist). Equations that depend on no positioned value
(parameter casts, slices of stacked weights) are copied into every task that needs
them. The code outside the loop is placed by ownership: code after the loop runs
on the rank that holds its largest operand, code before it where its results are
used.
"""

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from jaxpp import _markers, _treduce
from jaxpp.runtime import _rank_mesh, _taskgraph
from jaxpp.schedules import Kind

Var = jex_core.Var
Literal = jex_core.Literal
Atom = Var | Literal


class PipelineCompileError(ValueError):
    """The train step cannot be cut into pipeline stages as written."""


# -- small helpers --------------------------------------------------------------------------


def _is_marker(eqn) -> bool:
    return eqn.primitive is _markers.stage_end_p


def _is_treduce(eqn) -> bool:
    return eqn.primitive is _treduce.treduce_p


def _sub_jaxprs(eqn) -> list:
    out = []
    for param in eqn.params.values():
        for p in param if isinstance(param, (tuple, list)) else (param,):
            if isinstance(p, jex_core.ClosedJaxpr):
                out.append(p.jaxpr)
            elif isinstance(p, jex_core.Jaxpr):
                out.append(p)
    return out


def _contains(jaxpr, predicate) -> bool:
    for eqn in jaxpr.eqns:
        if predicate(eqn) or any(_contains(j, predicate) for j in _sub_jaxprs(eqn)):
            return True
    return False


def _where(eqn) -> str:
    try:
        frame = jax._src.source_info_util.user_frame(eqn.source_info.traceback)
    except Exception:  # source info is best effort
        frame = None
    if frame is None:
        return f"equation `{eqn.primitive.name}`"
    return f"equation `{eqn.primitive.name}` at {frame.file_name}:{frame.start_line}"


@dataclasses.dataclass
class _Flat:
    """A jaxpr flattened: call equations that contain `predicate` are inlined."""

    invars: list
    outvars: list
    eqns: list


_CALLS = ("jit", "pjit", "closed_call", "core_call")


def _inline(invars, outvars, eqns, predicate, *, context: str, all_calls: bool = False) -> _Flat:
    """Inlines `jit` calls whose body contains an equation matching `predicate`.

    With `all_calls`, every `jit` call is inlined (so that code outside the loop, such as
    an optimizer that jits a function over the whole parameter tree, is placed leaf by
    leaf on the ranks that own the data instead of as one unit).
    """
    out_eqns = []
    rename: dict = {}

    def read(a):
        return rename.get(a, a) if isinstance(a, Var) else a

    for eqn in eqns:
        if eqn.primitive.name in _CALLS and (
            all_calls or any(_contains(j, predicate) for j in _sub_jaxprs(eqn))
        ):
            inner = _sub_jaxprs(eqn)[0]
            consts = list(getattr(eqn.params.get("jaxpr"), "consts", ()) or ())
            inner_flat = _inline(
                inner.invars,
                inner.outvars,
                inner.eqns,
                predicate,
                context=context,
                all_calls=all_calls,
            )
            sub = {iv: read(a) for iv, a in zip(inner_flat.invars, eqn.invars, strict=True)}
            # Constants closed over by the call become literals of the inlined equations.
            for cv, c in zip(inner.constvars, consts, strict=True):
                sub[cv] = Literal(c, cv.aval)
            # Fresh variables for every inlined call: one jitted function called twice
            # shares its jaxpr, and the two copies must not share outputs.
            for inner_eqn in inner_flat.eqns:
                fresh = [type(o)(o.aval) for o in inner_eqn.outvars]
                out_eqns.append(
                    inner_eqn.replace(
                        invars=[
                            sub.get(a, a) if isinstance(a, Var) else a for a in inner_eqn.invars
                        ],
                        outvars=fresh,
                    )
                )
                sub.update(zip(inner_eqn.outvars, fresh, strict=True))
            for outer_out, inner_out in zip(eqn.outvars, inner_flat.outvars, strict=True):
                rename[outer_out] = (
                    sub.get(inner_out, inner_out) if isinstance(inner_out, Var) else inner_out
                )
            continue
        if any(_contains(j, predicate) for j in _sub_jaxprs(eqn)):
            raise PipelineCompileError(
                f"{_where(eqn)} wraps pipeline markers or the treduce loop inside "
                f"`{eqn.primitive.name}`, which jaxpp cannot cut ({context}). Fix: call "
                f"mark_stage_end / treduce outside of lax control flow, jax.checkpoint and custom "
                f"derivatives; put those inside one stage instead."
            )
        out_eqns.append(eqn.replace(invars=[read(a) for a in eqn.invars]))
    return _Flat(list(invars), [read(a) for a in outvars], out_eqns)


def _eval_equations(eqns: Sequence, env: dict) -> None:
    """Evaluates equations in order, reading and writing `env` (Var -> value)."""

    def read(a):
        return a.val if isinstance(a, Literal) else env[a]

    for eqn in eqns:
        # Template meshes of sharding annotations become the traced rank's mesh.
        params = eqn.primitive.get_bind_params(_rank_mesh.rank_params(eqn))
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*map(read, eqn.invars), **params)
        if eqn.primitive.multiple_results:
            env.update(zip(eqn.outvars, out, strict=True))
        else:
            env[eqn.outvars[0]] = out


def _make_fn(
    invars: Sequence, eqns: Sequence, outvars: Sequence, post: Callable | None = None
) -> Callable[..., tuple]:
    """A function `(*inputs) -> tuple(outputs)` that evaluates `eqns`."""
    invars, eqns, outvars = tuple(invars), tuple(eqns), tuple(outvars)

    def fn(*args):
        env = dict(zip(invars, args[: len(invars)], strict=True))
        _eval_equations(eqns, env)
        outs = tuple(a.val if isinstance(a, Literal) else env[a] for a in outvars)
        if post is not None:
            outs = post(outs, args[len(invars) :])
        return outs

    return fn


class _Names:
    """Readable unique value names for jaxpr variables."""

    def __init__(self) -> None:
        self._names: dict = {}
        self._counter = itertools.count()

    def __call__(self, var) -> str:
        if var not in self._names:
            self._names[var] = f"v{next(self._counter)}"
        return self._names[var]


# -- the entry point ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The task graph plus what the caller needs to run it."""

    graph: _taskgraph.TaskGraph
    schedule: object  # schedules.ScheduleBuilder | schedules.Schedule
    placement: tuple[int, ...]


def compile_step(
    closed_jaxpr, *, placement_of: Callable[[object, int, int], tuple[int, ...]]
) -> CompiledStep:
    """Cuts a traced train step into a TaskGraph.

    Args:
        closed_jaxpr: `jax.make_jaxpr` of the step; must hold exactly one `treduce`.
        placement_of: `(schedule, num_stages, num_microbatches) -> placement`
            (stage -> rank); it also checks the schedule against the mesh.
    """
    jaxpr = closed_jaxpr.jaxpr
    consts = list(closed_jaxpr.consts)
    all_invars = list(jaxpr.constvars) + list(jaxpr.invars)
    flat = _inline(
        all_invars,
        jaxpr.outvars,
        jaxpr.eqns,
        _is_treduce,
        context="the train step",
        all_calls=True,
    )
    loops = [e for e in flat.eqns if _is_treduce(e)]
    if len(loops) != 1:
        raise PipelineCompileError(
            f"mpmd_jit_with_loop needs exactly one jaxpp.treduce loop in the step, found "
            f"{len(loops)}. Fix: "
            + (
                "accumulate gradients with jaxpp.treduce(grad_fn, batch, schedule=...)."
                if not loops
                else "merge the loops into one treduce (return all values from one body)."
            )
        )
    loop = loops[0]
    names = _Names()
    body = _analyse_body(loop)
    placement = tuple(
        placement_of(loop.params["schedule"], body.num_stages, loop.params["num_microbatches"])
    )
    return _build_graph(flat, consts, len(jaxpr.constvars), loop, body, placement, names)


# -- the loop body ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Body:
    num_stages: int
    flat: _Flat
    alias: dict  # marker outvar -> underlying atom
    position: dict  # eqn index -> int position (non-floating)
    floating: dict  # eqn index -> set of positions


def _analyse_body(loop) -> _Body:
    body_jaxpr = loop.params["body"].jaxpr
    flat = _inline(
        body_jaxpr.invars,
        body_jaxpr.outvars,
        body_jaxpr.eqns,
        _is_marker,
        context="the treduce body",
    )
    markers = [e for e in flat.eqns if _is_marker(e)]
    forward = [e for e in markers if e.params["direction"] == _markers.Direction.FORWARD]
    backward = [e for e in markers if e.params["direction"] == _markers.Direction.BACKWARD]
    num_stages = len(forward)
    if num_stages == 0:
        raise PipelineCompileError(
            "the treduce body has no jaxpp.mark_stage_end: jaxpp cannot tell where stages end. "
            "Fix: call x = jaxpp.mark_stage_end(x) at the end of every stage, including after "
            "the last one (for example on the loss)."
        )
    if len(backward) != num_stages:
        raise PipelineCompileError(
            f"the treduce body has {num_stages} forward stage markers but {len(backward)} backward "
            f"ones, so the markers do not pair. Fix: differentiate inside the loop body "
            f"(jax.value_and_grad of the marked loss) and make every marked stage feed the loss."
        )
    alias: dict = {}
    # Microbatch inputs enter at stage 0; invariants (parameters) have no position.
    pos_of_var: dict = {v: 0 for v in flat.invars[loop.params["num_consts"] :]}
    position: dict = {}
    fwd_seen = bwd_seen = 0

    def resolve(a):
        while isinstance(a, Var) and a in alias:
            a = alias[a]
        return a

    def pos(a):
        return pos_of_var.get(a) if isinstance(a, Var) else None

    for i, eqn in enumerate(flat.eqns):
        in_positions = [p for p in map(pos, eqn.invars) if p is not None]
        if _is_marker(eqn):
            if eqn.params["direction"] == _markers.Direction.FORWARD:
                fwd_seen += 1
                out_pos = fwd_seen
                if in_positions and max(in_positions) > fwd_seen - 1:
                    raise PipelineCompileError(
                        f"stage marker {fwd_seen - 1} ({_where(eqn)}) receives values computed "
                        f"after a later marker, so the stages do not follow each other. Fix: mark "
                        f"each stage's outputs once, in pipeline order."
                    )
            else:
                out_pos = num_stages + bwd_seen
                bwd_seen += 1
            for o, a in zip(eqn.outvars, eqn.invars, strict=True):
                alias[o] = resolve(a)
                pos_of_var[o] = out_pos
            continue
        p = max(in_positions) if in_positions else None
        if p is not None:
            position[i] = p
            for o in eqn.outvars:
                pos_of_var[o] = p
    flat.eqns = [
        eqn if _is_marker(eqn) else eqn.replace(invars=[resolve(a) for a in eqn.invars])
        for eqn in flat.eqns
    ]
    flat.outvars = [resolve(a) for a in flat.outvars]
    # Floating equations run wherever their results are needed.
    floating: dict = {}
    last = 2 * num_stages - 1
    users: dict = {}
    for i, eqn in enumerate(flat.eqns):
        if _is_marker(eqn):
            continue
        for a in eqn.invars:
            if isinstance(a, Var):
                users.setdefault(a, []).append(i)
    outputs = {a for a in flat.outvars if isinstance(a, Var)}
    for i in reversed(range(len(flat.eqns))):
        eqn = flat.eqns[i]
        if _is_marker(eqn) or i in position:
            continue
        needed: set = set()
        for o in eqn.outvars:
            for j in users.get(o, ()):
                needed |= {position[j]} if j in position else floating.get(j, set())
            if o in outputs:
                needed.add(last)
        floating[i] = needed
    return _Body(num_stages, flat, alias, position, floating)


def _task_equations(body: _Body, p: int) -> list[int]:
    return [
        i
        for i, eqn in enumerate(body.flat.eqns)
        if not _is_marker(eqn) and (body.position.get(i) == p or p in body.floating.get(i, ()))
    ]


def _defined(eqns: Iterable) -> dict:
    """Vars defined by `eqns`, in definition order (a dict, so iteration is deterministic:
    every process of a multi-process run must derive the same task signatures)."""
    return dict.fromkeys(o for e in eqns for o in e.outvars)


def _free_inputs(eqns: Sequence) -> list:
    """Vars read by `eqns` and not defined by them, in first-use order."""
    defined: set = set()
    seen: dict = {}
    for e in eqns:
        for a in e.invars:
            if isinstance(a, Var) and a not in defined:
                seen.setdefault(a, None)
        defined.update(e.outvars)
    return list(seen)


def _backward_slice(eqns: Sequence, targets: Iterable) -> list:
    """The equations (in order) needed to compute `targets`."""
    needed = {t for t in targets if isinstance(t, Var)}
    keep = []
    for e in reversed(eqns):
        if any(o in needed for o in e.outvars):
            keep.append(e)
            needed.update(a for a in e.invars if isinstance(a, Var))
    return keep[::-1]


# -- assembling the graph ---------------------------------------------------------------------


def _build_graph(flat, consts, num_constvars, loop, body: _Body, placement, names: _Names):
    S = body.num_stages
    last = 2 * S - 1
    num_mb = loop.params["num_microbatches"]
    operations = loop.params["operations"]
    num_consts = loop.params["num_consts"]
    split = _uses_split_backward(loop.params["schedule"], S, num_mb, placement)
    beqns = body.flat.eqns

    # Body inputs: invariants name outer values; microbatch inputs name per-mb slices.
    body_in = body.flat.invars
    outer_operands = loop.invars
    binding: dict = {}  # body invar -> outer atom (invariants) or per-mb name
    microbatch_inputs: list = []
    loop_values: set = set()
    for k, (bv, outer) in enumerate(zip(body_in, outer_operands, strict=True)):
        if k < num_consts:
            binding[bv] = outer
        else:
            if not isinstance(outer, Var):
                raise PipelineCompileError(
                    "treduce over a literal batch is not supported; pass an array."
                )
            per_mb = names(bv)
            microbatch_inputs.append(_taskgraph.MicrobatchInput(names(outer), per_mb))
            loop_values.add(per_mb)

    def body_name(a) -> str:
        if a in binding:
            return names(binding[a]) if isinstance(binding[a], Var) else None
        return names(a)

    # Accumulators: one per loop output, or one per stage-local summand when an output is
    # a sum across stages (tied weights, per-stage slices of a stacked weight), so that
    # each stage accumulates its own part and the parts meet once, after the loop.
    positions = range(2 * S)
    candidate_idx = {p: _task_equations(body, p) for p in positions}
    produced_at = _produced_at(beqns, candidate_idx)
    targets = _accumulation_targets(body, operations, produced_at, last)
    live = _live_equations(beqns, [t.atom for t in targets])
    task_eqn_idx = {p: [i for i in candidate_idx[p] if i in live] for p in positions}
    produced_at = _produced_at(beqns, task_eqn_idx)
    consumed_at: dict = {}
    for p in positions:
        for v in _free_inputs([beqns[i] for i in task_eqn_idx[p]]):
            consumed_at.setdefault(v, set()).add(p)
    body_avals = loop.params["body"].out_avals
    acc_avals = [
        (
            jax.ShapeDtypeStruct((num_mb, *body_avals[t.output].shape), body_avals[t.output].dtype)
            if t.op == "concat"
            else jax.ShapeDtypeStruct(body_avals[t.output].shape, body_avals[t.output].dtype)
        )
        for t in targets
    ]

    def stage_of(p: int) -> int:
        return p if p < S else last - p

    # Loop tasks.
    loop_tasks: dict = {}
    for p in positions:
        eqns = [beqns[i] for i in task_eqn_idx[p]]
        stage = stage_of(p)
        cross = [v for v in _defined(eqns) if any(q != p for q in consumed_at.get(v, ()))]
        accumulated = [t for t in targets if t.position == p]
        kind = Kind.FORWARD if p < S else Kind.BACKWARD
        loop_tasks[(stage, kind)] = _loop_task(
            f"s{stage}/{kind.value}",
            stage,
            kind,
            eqns,
            cross,
            accumulated,
            body_name,
            loop_values,
            binding,
        )
        if p < S or not split:
            continue
        # Zero-bubble split: I computes what earlier stages wait for; W the rest. Schedules
        # may mix full B actions with I/W pairs, so all three tasks exist.
        i_eqns = _backward_slice(eqns, cross)
        i_set = set(map(id, i_eqns))
        w_targets = [t.atom for t in accumulated]
        w_eqns = [e for e in _backward_slice(eqns, w_targets) if id(e) not in i_set]
        i_defined = _defined(i_eqns)
        handoff = [v for v in _free_inputs(w_eqns) if v in i_defined]
        handoff += [
            t for t in w_targets if isinstance(t, Var) and t in i_defined and t not in handoff
        ]
        loop_tasks[(stage, Kind.INPUT_GRAD)] = _loop_task(
            f"s{stage}/I",
            stage,
            Kind.INPUT_GRAD,
            i_eqns,
            cross + [v for v in handoff if v not in cross],
            [],
            body_name,
            loop_values,
            binding,
        )
        loop_tasks[(stage, Kind.WEIGHT_GRAD)] = _loop_task(
            f"s{stage}/W",
            stage,
            Kind.WEIGHT_GRAD,
            w_eqns,
            [],
            accumulated,
            body_name,
            loop_values,
            binding,
        )

    # Outer code: everything but the loop, placed by ownership.
    acc_rank = [placement[stage_of(t.position)] for t in targets]
    outer_in = {v: names(v) for v in flat.invars}
    rename_loop_out: dict = {}
    finals: list = []  # (rank, [accumulator names], op, loop out var): combined after the loop
    loop_out_rank: dict = {}
    for k, (o, op) in enumerate(zip(loop.outvars, operations, strict=True)):
        mine = [j for j, t in enumerate(targets) if t.output == k]
        if len(mine) == 1 and op != "mean":
            rename_loop_out[o] = targets[mine[0]].acc
            loop_out_rank[o] = acc_rank[mine[0]]
        else:
            # The combined value lives where the whole sum would have been computed.
            rank = placement[stage_of(max(targets[j].position for j in mine))]
            finals.append((rank, [targets[j].acc for j in mine], op, o))
            loop_out_rank[o] = rank
    value_name = lambda v: rename_loop_out.get(v) or names(v)  # noqa: E731

    # Uses of outer values by loop tasks (invariants, microbatched inputs).
    loop_uses: dict = {}  # outer var -> ranks
    for task in loop_tasks.values():
        rank = placement[task.stage]
        for outer in binding.values():
            if isinstance(outer, Var) and names(outer) in task.inputs:
                loop_uses.setdefault(outer, set()).add(rank)
    for k, bv in enumerate(body_in[num_consts:]):
        outer = outer_operands[num_consts + k]
        for p in consumed_at.get(bv, ()):
            loop_uses.setdefault(outer, set()).add(placement[stage_of(p)])

    outer_eqns = [e for e in flat.eqns if e is not loop]
    depends_on_loop: set = set(loop.outvars)
    post_idx = []
    for i, e in enumerate(outer_eqns):
        if any(isinstance(a, Var) and a in depends_on_loop for a in e.invars):
            depends_on_loop.update(e.outvars)
            post_idx.append(i)
    post_set = set(post_idx)

    # Post-loop equations: on the rank of their largest placed operand; depth counts hops.
    rank_of: dict = dict(loop_out_rank)
    depth_of: dict = {o: 0 for o in loop.outvars}
    eqn_rank: dict = {}
    eqn_depth: dict = {}
    for i in post_idx:
        e = outer_eqns[i]
        placed = [a for a in e.invars if isinstance(a, Var) and a in rank_of]
        best = max(placed, key=lambda a: (_size(a), -rank_of[a]))
        r = rank_of[best]
        d = max(depth_of[a] + (rank_of[a] != r) for a in placed)
        eqn_rank[i], eqn_depth[i] = r, d
        for o in e.outvars:
            rank_of[o], depth_of[o] = r, d

    # Pre-loop (floating) equations: replicated on every rank that needs them.
    outputs = [a for a in flat.outvars if isinstance(a, Var)]
    users: dict = {}
    for i, e in enumerate(outer_eqns):
        for a in e.invars:
            if isinstance(a, Var):
                users.setdefault(a, []).append(i)
    pre_ranks: dict = {}
    for i in reversed(range(len(outer_eqns))):
        if i in post_set:
            continue
        need: set = set()
        for o in outer_eqns[i].outvars:
            for j in users.get(o, ()):
                need |= {eqn_rank[j]} if j in post_set else pre_ranks.get(j, set())
            need |= loop_uses.get(o, set())
            if o in outputs and not need:
                need.add(0)
        pre_ranks[i] = need

    # Group into tasks.
    pre_tasks = []
    all_ranks = sorted(set(placement))
    for r in all_ranks:
        eqns = [outer_eqns[i] for i in range(len(outer_eqns)) if r in pre_ranks.get(i, ())]
        if eqns:
            pre_tasks.append((r, eqns))
    post_groups: dict = {}
    for i in post_idx:
        post_groups.setdefault((eqn_depth[i], eqn_rank[i]), []).append(outer_eqns[i])

    # Which outer values are needed outside the task that makes them.
    outer_consumers: set = set(outputs)
    for task_eqns in [eqns for _, eqns in pre_tasks] + list(post_groups.values()):
        outer_consumers.update(_free_inputs(task_eqns))
    outer_consumers.update(v for v in loop_uses)
    for *_, o in finals:
        outer_consumers.add(o)

    def outer_task(name, rank, eqns, extra_post=None):
        inputs = _free_inputs(eqns)
        defined = _defined(eqns)
        outs = [v for v in defined if v in outer_consumers]
        fn = _make_fn(inputs, eqns, outs)
        return _taskgraph.Task(
            name=name,
            fn=fn,
            inputs=tuple(value_name(v) for v in inputs),
            outputs=tuple(value_name(v) for v in outs),
            rank=rank,
            num_equations=len(eqns),
        )

    tasks_pre = [outer_task(f"pre/r{r}", r, eqns) for r, eqns in pre_tasks]
    # Accumulator initial values, one task per rank.
    for r in all_ranks:
        js = [j for j in range(len(targets)) if acc_rank[j] == r]
        if js:
            tasks_pre.append(
                _init_task(
                    r,
                    [targets[j].acc for j in js],
                    [targets[j].op for j in js],
                    [acc_avals[j] for j in js],
                )
            )
    tasks_post = []
    for r in all_ranks:
        mine = [(accs, op, o) for rr, accs, op, o in finals if rr == r]
        if mine:
            tasks_post.append(_combine_task(r, mine, num_mb, value_name))
    for (d, r), eqns in sorted(post_groups.items()):
        tasks_post.append(outer_task(f"post/r{r}/d{d}", r, eqns))

    step_outputs = []
    constants: dict = {}
    for k, a in enumerate(flat.outvars):
        if isinstance(a, Literal):
            name = f"literal{k}"
            constants[name] = a.val
            step_outputs.append(name)
        else:
            step_outputs.append(value_name(a))
    for v, c in zip(flat.invars[:num_constvars], consts, strict=True):
        constants[outer_in[v]] = c

    return CompiledStep(
        graph=_taskgraph.TaskGraph(
            num_stages=S,
            num_microbatches=num_mb,
            step_inputs=tuple(outer_in[v] for v in flat.invars[num_constvars:]),
            step_outputs=tuple(step_outputs),
            constants=constants,
            pre_tasks=tuple(tasks_pre),
            microbatch_inputs=tuple(microbatch_inputs),
            loop_tasks=loop_tasks,
            loop_values=frozenset(loop_values),
            post_tasks=tuple(tasks_post),
        ),
        schedule=loop.params["schedule"],
        placement=placement,
    )


def _size(v) -> int:
    shape = getattr(v.aval, "shape", ())
    n = 1
    for s in shape:
        n *= s
    return n * getattr(getattr(v.aval, "dtype", None), "itemsize", 1)


def _uses_split_backward(schedule, num_stages, num_mb, placement) -> bool:
    from jaxpp import schedules

    built = schedule if isinstance(schedule, schedules.Schedule) else schedule.build(num_mb)
    return built.uses_split_backward


def _loop_task(name, stage, kind, eqns, cross, accumulated, body_name, loop_values, binding):
    """A per-microbatch task; adds its share of the loop outputs to their accumulators."""
    out_atoms = [t.atom for t in accumulated]
    eqns = _backward_slice(eqns, list(cross) + out_atoms)
    inputs = _free_inputs(eqns)
    # Outputs that are plain inputs of the task (pass-through) are read from the inputs.
    for a in out_atoms:
        if isinstance(a, Var) and a not in _defined(eqns) and a not in inputs:
            inputs.append(a)
    ops = [t.op for t in accumulated]
    accs = [t.acc for t in accumulated]
    needs_mb = "concat" in ops
    # Invariants bound to literals are substituted in the equations.
    literal_inputs = {
        v: binding[v] for v in inputs if v in binding and isinstance(binding[v], Literal)
    }
    inputs = [v for v in inputs if v not in literal_inputs]
    if literal_inputs:
        eqns = [
            e.replace(
                invars=[literal_inputs.get(a, a) if isinstance(a, Var) else a for a in e.invars]
            )
            for e in eqns
        ]

    def accumulate(outs, extra):
        regular, values = outs[: len(cross)], outs[len(cross) :]
        acc_in = extra[: len(accs)]
        mb = extra[len(accs)] if needs_mb else None
        new = []
        for op, acc, value in zip(ops, acc_in, values, strict=True):
            value = jnp.asarray(value, acc.dtype)
            if op == "concat":
                new.append(lax.dynamic_update_index_in_dim(acc, value, mb, 0))
            else:
                new.append(_treduce.combine(op, acc, value))
        return (*regular, *new)

    fn = _make_fn(inputs, eqns, list(cross) + out_atoms, post=accumulate if accs else None)
    input_names = (
        [body_name(v) for v in inputs] + accs + ([_taskgraph.MICROBATCH_INDEX] if needs_mb else [])
    )
    output_names = [body_name(v) for v in cross] + accs
    for v in cross:
        loop_values.add(body_name(v))
    return _taskgraph.Task(
        name=name,
        fn=fn,
        inputs=tuple(input_names),
        outputs=tuple(output_names),
        stage=stage,
        kind=kind,
        num_equations=len(eqns) + len(accs),
        donate=tuple(range(len(inputs), len(inputs) + len(accs))),
    )


@dataclasses.dataclass(frozen=True)
class _Target:
    """A value a loop task adds into an accumulator each microbatch."""

    output: int  # which loop output it contributes to
    atom: object  # the body value
    op: str
    acc: str  # accumulator name
    position: int  # the task that accumulates it


def _produced_at(beqns, task_eqn_idx) -> dict:
    produced: dict = {}
    for p, idx in task_eqn_idx.items():
        for i in idx:
            for o in beqns[i].outvars:
                produced.setdefault(o, set()).add(p)
    return produced


def _accumulation_targets(body: _Body, operations, produced_at, last: int) -> list[_Target]:
    """Accumulation targets; sums across stages are split into per-stage summands."""
    defining = {o: e for e in body.flat.eqns for o in e.outvars}
    use_count: dict = {}
    for e in body.flat.eqns:
        for a in e.invars:
            if isinstance(a, Var):
                use_count[a] = use_count.get(a, 0) + 1
    for a in body.flat.outvars:
        if isinstance(a, Var):
            use_count[a] = use_count.get(a, 0) + 1

    def position(a) -> int:
        ps = produced_at.get(a, ()) if isinstance(a, Var) else ()
        return next(iter(ps)) if len(ps) == 1 else last

    def summands(a) -> list:
        e = defining.get(a) if isinstance(a, Var) else None
        if e is None or e.primitive.name not in ("add_any", "add") or use_count.get(a) != 1:
            return [a]
        if any(getattr(x.aval, "shape", None) != a.aval.shape for x in e.invars):
            return [a]  # a broadcasting add is not a plain sum
        return [leaf for x in e.invars for leaf in summands(x)]

    targets: list[_Target] = []
    for k, (a, op) in enumerate(zip(body.flat.outvars, operations, strict=True)):
        parts = summands(a) if op in ("add", "mean") else [a]
        if len({position(x) for x in parts}) <= 1:
            parts = [a]
        for j, x in enumerate(parts):
            name = f"acc{k}" if len(parts) == 1 else f"acc{k}_{j}"
            targets.append(_Target(k, x, op, name, position(x)))
    return targets


def _live_equations(beqns, sinks) -> set[int]:
    """Indices of the equations needed to compute `sinks`."""
    needed = {a for a in sinks if isinstance(a, Var)}
    live = set()
    for i in reversed(range(len(beqns))):
        e = beqns[i]
        if _is_marker(e):
            continue
        if any(o in needed for o in e.outvars):
            live.add(i)
            needed.update(a for a in e.invars if isinstance(a, Var))
    return live


def _lowest(dtype):
    """The identity of `max` for `dtype`."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return -jnp.inf
    if dtype == jnp.bool_:
        return False
    return jnp.iinfo(dtype).min


def _init_task(rank, accs, ops, avals):
    def fn():
        out = []
        for op, aval in zip(ops, avals, strict=True):
            if op == "max":
                out.append(jnp.full(aval.shape, _lowest(aval.dtype), aval.dtype))
            else:
                out.append(jnp.zeros(aval.shape, aval.dtype))
        return tuple(out)

    return _taskgraph.Task(
        name=f"init/r{rank}",
        fn=fn,
        inputs=(),
        outputs=tuple(accs),
        rank=rank,
        num_equations=len(accs),
    )


def _combine_task(rank, groups, num_mb, value_name):
    """After the loop: sums per-stage accumulators of one output, and applies Mean."""
    sizes = [len(accs) for accs, _, _ in groups]

    def fn(*values):
        out, offset = [], 0
        for (_, op, _), size in zip(groups, sizes, strict=True):
            parts = values[offset : offset + size]
            offset += size
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            out.append(_treduce.finalize(op, total, num_mb))
        return tuple(out)

    return _taskgraph.Task(
        name=f"combine/r{rank}",
        fn=fn,
        inputs=tuple(acc for accs, _, _ in groups for acc in accs),
        outputs=tuple(value_name(o) for _, _, o in groups),
        rank=rank,
        num_equations=len(groups),
    )
