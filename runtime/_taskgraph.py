"""The TaskGraph: what the compiler hands the runtime. Plain data plus task callables.

A task is a pure function from named input values to named output values. Values
are either *global* (one per step: step inputs, parameters, accumulators, results
of code before or after the loop) or *per microbatch* (activations, microbatch
slices); a per-microbatch value `v` of microbatch `mb` is the buffer `(v, mb)`.
"""

import dataclasses
from collections.abc import Callable, Mapping

from jaxpp.schedules import Kind

#: The input name under which the executor passes the current microbatch index.
MICROBATCH_INDEX = "__mb__"


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Task:
    """One compiled unit of work: `fn(*inputs) -> tuple(outputs)`.

    Attributes:
        name: unique and readable, e.g. "s1/F" or "post/r0/d1".
        fn: the computation; positional inputs in `inputs` order, returns a tuple in
            `outputs` order.
        inputs: value names read.
        outputs: value names written (an accumulator appears in both).
        rank: for tasks outside the loop, the rank that runs it.
        stage: for loop tasks, the stage.
        kind: for loop tasks, F, B, I or W.
        num_equations: how much the task does (0 means a no-op that is skipped).
        donate: positions of inputs whose buffers the task may reuse for outputs
            (accumulators updated in place).
    """

    name: str
    fn: Callable[..., tuple]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    rank: int | None = None
    stage: int | None = None
    kind: Kind | None = None
    num_equations: int = 0
    donate: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"Task({self.name}: {', '.join(self.inputs)} -> {', '.join(self.outputs)})"


@dataclasses.dataclass(frozen=True, slots=True)
class MicrobatchInput:
    """A global value whose axis 0 holds the microbatches; `per_mb` names one slice."""

    value: str
    per_mb: str


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class TaskGraph:
    """A train step cut into tasks.

    Attributes:
        num_stages: pipeline stages.
        num_microbatches: iterations of the loop.
        step_inputs: names bound to the flat step arguments, in order.
        step_outputs: names of the flat step results, in order.
        constants: values of names that are compile-time constants (not arguments).
        pre_tasks: rank-pinned tasks before the loop, in run order.
        microbatch_inputs: the values sliced per microbatch.
        loop_tasks: per (stage, kind), the task run for each microbatch.
        loop_values: the names that are per microbatch.
        post_tasks: rank-pinned tasks after the loop, in run order.
    """

    num_stages: int
    num_microbatches: int
    step_inputs: tuple[str, ...]
    step_outputs: tuple[str, ...]
    constants: Mapping[str, object]
    pre_tasks: tuple[Task, ...]
    microbatch_inputs: tuple[MicrobatchInput, ...]
    loop_tasks: Mapping[tuple[int, Kind], Task]
    loop_values: frozenset[str]
    post_tasks: tuple[Task, ...]

    @property
    def uses_split_backward(self) -> bool:
        return any(kind in (Kind.INPUT_GRAD, Kind.WEIGHT_GRAD) for _, kind in self.loop_tasks)
