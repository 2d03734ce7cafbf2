"""Lowering TaskGraphs to Plans, and the executors that follow them."""

from jaxpp.runtime._coordination import LOST_PEER_EXIT_CODE as LOST_PEER_EXIT_CODE
from jaxpp.runtime._coordination import CoordinatorUnreachableError as CoordinatorUnreachableError
from jaxpp.runtime._coordination import PeerLostError as PeerLostError
from jaxpp.runtime._coordination import initialize as initialize
from jaxpp.runtime._distributed import DistributedExecutor as DistributedExecutor
from jaxpp.runtime._distributed import fetch as fetch
from jaxpp.runtime._distributed import stage_mesh as stage_mesh
from jaxpp.runtime._launch import launch as launch
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
from jaxpp.runtime._trace import Profile as Profile
from jaxpp.runtime._trace import profile_from_timings as profile_from_timings
from jaxpp.runtime._trace import trace_events as trace_events

__all__ = [
    "LOST_PEER_EXIT_CODE",
    "Buffer",
    "CoordinatorUnreachableError",
    "DistributedExecutor",
    "Free",
    "PeerLostError",
    "LocalExecutor",
    "MicrobatchInput",
    "Plan",
    "Profile",
    "Run",
    "Send",
    "Split",
    "StepStats",
    "Task",
    "TaskGraph",
    "TaskTiming",
    "fetch",
    "initialize",
    "launch",
    "lower",
    "profile_from_timings",
    "stage_mesh",
    "trace_events",
]
