"""Lowering TaskGraphs to Plans, and the executors that follow them."""

from jaxpp.runtime._local import LocalExecutor as LocalExecutor
from jaxpp.runtime._local import StepStats as StepStats
from jaxpp.runtime._local import TaskTiming as TaskTiming
from jaxpp.runtime._plan import Buffer as Buffer
from jaxpp.runtime._plan import Free as Free
from jaxpp.runtime._plan import Plan as Plan
from jaxpp.runtime._plan import Run as Run
from jaxpp.runtime._plan import Send as Send
from jaxpp.runtime._plan import Split as Split
from jaxpp.runtime._plan import lower as lower
from jaxpp.runtime._taskgraph import MicrobatchInput as MicrobatchInput
from jaxpp.runtime._taskgraph import Task as Task
from jaxpp.runtime._taskgraph import TaskGraph as TaskGraph

__all__ = [
    "Buffer",
    "Free",
    "LocalExecutor",
    "MicrobatchInput",
    "Plan",
    "Run",
    "Send",
    "Split",
    "StepStats",
    "Task",
    "TaskGraph",
    "TaskTiming",
    "lower",
]
