"""Plans are data: lowering is checked without devices, on hand-made task graphs."""

import dataclasses

import pytest

from jaxpp import runtime, schedules
from jaxpp.runtime import _plan
from jaxpp.schedules import Kind


def _graph(num_stages: int, num_microbatches: int, *, split: bool = False) -> runtime.TaskGraph:
    """A chain: stage s forward reads a{s-1}, writes a{s}; backward mirrors it."""

    def task(name, inputs, outputs, **kw):
        return runtime.Task(
            name, lambda *a: a, tuple(inputs), tuple(outputs), num_equations=1, **kw
        )

    loop = {}
    for s in range(num_stages):
        x = "x" if s == 0 else f"a{s - 1}"
        loop[(s, Kind.FORWARD)] = task(
            f"s{s}/F", [x, f"w{s}"], [f"a{s}"], stage=s, kind=Kind.FORWARD
        )
        grad_in = f"a{s}" if s == num_stages - 1 else f"g{s + 1}"
        bwd = dict(stage=s)
        loop[(s, Kind.BACKWARD)] = task(
            f"s{s}/B",
            [grad_in, x, "acc" + str(s)],
            [f"g{s}", "acc" + str(s)],
            kind=Kind.BACKWARD,
            **bwd,
        )
        if split:
            loop[(s, Kind.INPUT_GRAD)] = task(
                f"s{s}/I", [grad_in, x], [f"g{s}", f"h{s}"], kind=Kind.INPUT_GRAD, **bwd
            )
            loop[(s, Kind.WEIGHT_GRAD)] = task(
                f"s{s}/W", [f"h{s}", "acc" + str(s)], ["acc" + str(s)], kind=Kind.WEIGHT_GRAD, **bwd
            )
    values = {"x"} | {f"{p}{s}" for s in range(num_stages) for p in "agh"}
    return runtime.TaskGraph(
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        step_inputs=(
            "batch",
            *(f"w{s}" for s in range(num_stages)),
            *(f"acc{s}" for s in range(num_stages)),
        ),
        step_outputs=tuple(f"acc{s}" for s in range(num_stages)),
        constants={},
        pre_tasks=(),
        microbatch_inputs=(runtime.MicrobatchInput("batch", "x"),),
        loop_tasks=loop,
        loop_values=frozenset(values),
        post_tasks=(),
    )


@pytest.mark.parametrize(
    "builder",
    [
        schedules.Std1F1B(4),
        schedules.GPipe(4),
        schedules.ZeroBubble(4),
        schedules.Interleaved1F1B(4, ranks=2),
    ],
    ids=str,
)
def test_lower_runs_loop_tasks_in_simulator_order(builder):
    schedule = builder.build(6)
    plan = runtime.lower(
        _graph(schedule.num_stages, 6, split=schedule.uses_split_backward), schedule
    )
    runs = [(i.rank, i.task, i.mb) for i in plan.instructions if isinstance(i, _plan.Run)]
    expected = [(r, f"s{a.stage}/{a.kind.value}", a.mb) for r, a in plan.simulation.order]
    assert runs == expected


def test_lower_sends_right_after_producer_to_consumer_rank():
    schedule = schedules.Std1F1B(3).build(4)
    plan = runtime.lower(_graph(3, 4), schedule)
    instructions = list(plan.instructions)
    sends = [i for i in instructions if isinstance(i, _plan.Send)]
    # Forward activations a0, a1 go up one rank; gradients g1, g2 come down one rank.
    assert {(s.source.value, s.source.rank, s.dst) for s in sends} == {
        ("a0", 0, 1),
        ("a1", 1, 2),
        ("g2", 2, 1),
        ("g1", 1, 0),
    }
    for send in sends:
        index = instructions.index(send)
        producer = max(
            k
            for k, i in enumerate(instructions[:index])
            if isinstance(i, _plan.Run) and send.source in i.outputs
        )
        between = instructions[producer + 1 : index]
        assert all(isinstance(i, _plan.Send | _plan.Free) for i in between)


def test_lower_frees_every_microbatch_buffer_after_its_last_use():
    schedule = schedules.Std1F1B(2).build(3)
    plan = runtime.lower(_graph(2, 3), schedule)
    instructions = list(plan.instructions)
    freed = {i.buffer: k for k, i in enumerate(instructions) if isinstance(i, _plan.Free)}
    for k, ins in enumerate(instructions):
        for b in _plan._reads(ins):  # noqa: SLF001 -- the plan's own accounting
            if b.mb is not None:
                assert b in freed and freed[b] > k, f"{b} read at {k} but freed at {freed.get(b)}"
    live = {b for ins in instructions for b in _plan._writes(ins) if b.mb is not None}  # noqa: SLF001
    assert live <= set(freed)


def test_lower_marks_activations_kept_from_forward_to_backward():
    schedule = schedules.Std1F1B(2).build(2)
    plan = runtime.lower(_graph(2, 2), schedule)
    # Only stage 1 keeps a value of its own forward (a1, its loss input) for its backward;
    # stage 0's backward reads the microbatch slice and g1, which no pass of stage 0 wrote.
    assert {(b.value, pair) for b, pair in plan.activations.items()} == {
        ("a1", (1, 0)),
        ("a1", (1, 1)),
    }


def test_plan_prints_per_rank_streams_with_send_and_recv():
    plan = runtime.lower(_graph(2, 1), schedules.Std1F1B(2).build(1))
    text = str(plan)
    assert "rank 0:" in text and "rank 1:" in text
    assert "SEND a0[0]@r0 -> r1" in text and "RECV a0[0]@r0 -> r1" in text


def test_lower_schedule_with_other_stage_count_raises():
    with pytest.raises(ValueError, match="num_stages=3"):
        runtime.lower(_graph(3, 2), schedules.Std1F1B(2).build(2))


def test_lower_schedule_with_other_microbatch_count_raises():
    with pytest.raises(ValueError, match="num_microbatches=2"):
        runtime.lower(_graph(2, 2), schedules.Std1F1B(2).build(4))


def test_lower_sends_nothing_to_a_rank_that_computed_the_value_itself():
    graph = _graph(2, 2)
    shared = [
        runtime.Task(f"pre/r{r}", lambda w: (w,), ("w0",), ("cast",), rank=r, num_equations=1)
        for r in (0, 1)
    ]
    loop = dict(graph.loop_tasks)
    for stage in (0, 1):
        task = loop[(stage, Kind.FORWARD)]
        loop[(stage, Kind.FORWARD)] = dataclasses.replace(task, inputs=(*task.inputs, "cast"))
    graph = dataclasses.replace(graph, pre_tasks=tuple(shared), loop_tasks=loop)
    plan = runtime.lower(graph, schedules.Std1F1B(2).build(2))
    assert not [
        i for i in plan.instructions if isinstance(i, _plan.Send) and i.source.value == "cast"
    ]
