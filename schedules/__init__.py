"""Schedule DSL: IR, builders, text/CSV formats, validation, simulator, rendering. JAX-free."""

from jaxpp.schedules._builders import Eager1F1B as Eager1F1B
from jaxpp.schedules._builders import GPipe as GPipe
from jaxpp.schedules._builders import Interleaved1F1B as Interleaved1F1B
from jaxpp.schedules._builders import LoopedBFS as LoopedBFS
from jaxpp.schedules._builders import ScheduleBuilder as ScheduleBuilder
from jaxpp.schedules._builders import Std1F1B as Std1F1B
from jaxpp.schedules._cluster import Cluster as Cluster
from jaxpp.schedules._cluster import ClusterSpecError as ClusterSpecError
from jaxpp.schedules._cluster import Link as Link
from jaxpp.schedules._cluster import MeasuredCosts as MeasuredCosts
from jaxpp.schedules._cluster import all_gather_time as all_gather_time
from jaxpp.schedules._cluster import all_reduce_time as all_reduce_time
from jaxpp.schedules._cluster import costs_from_dict as costs_from_dict
from jaxpp.schedules._cluster import load_costs as load_costs
from jaxpp.schedules._cluster import parse_bandwidth as parse_bandwidth
from jaxpp.schedules._cluster import parse_cluster as parse_cluster
from jaxpp.schedules._cluster import parse_latency as parse_latency
from jaxpp.schedules._cluster_model import Layout as Layout
from jaxpp.schedules._cluster_model import Prediction as Prediction
from jaxpp.schedules._cluster_model import WhatIf as WhatIf
from jaxpp.schedules._cluster_model import format_what_if as format_what_if
from jaxpp.schedules._cluster_model import predict as predict
from jaxpp.schedules._cluster_model import what_if as what_if
from jaxpp.schedules._ir import Action as Action
from jaxpp.schedules._ir import Kind as Kind
from jaxpp.schedules._ir import Schedule as Schedule
from jaxpp.schedules._ir import ScheduleError as ScheduleError
from jaxpp.schedules._ir import parse_action as parse_action
from jaxpp.schedules._registry import BUILTINS as BUILTINS
from jaxpp.schedules._registry import get_builder as get_builder
from jaxpp.schedules._render import render_grid as render_grid
from jaxpp.schedules._render import render_timeline as render_timeline
from jaxpp.schedules._render import save_gantt as save_gantt
from jaxpp.schedules._render import to_chrome_trace as to_chrome_trace
from jaxpp.schedules._simulate import Costs as Costs
from jaxpp.schedules._simulate import Simulation as Simulation
from jaxpp.schedules._simulate import TimedAction as TimedAction
from jaxpp.schedules._simulate import simulate as simulate
from jaxpp.schedules._text import format_schedule as format_schedule
from jaxpp.schedules._text import from_csv as from_csv
from jaxpp.schedules._text import parse as parse
from jaxpp.schedules._text import to_csv as to_csv
from jaxpp.schedules._validate import validate as validate
from jaxpp.schedules._zero_bubble import ZBV as ZBV
from jaxpp.schedules._zero_bubble import DualPipeV as DualPipeV
from jaxpp.schedules._zero_bubble import ZeroBubble as ZeroBubble
from jaxpp.schedules._zero_bubble import ZeroBubbleH2 as ZeroBubbleH2

__all__ = [
    "Cluster",
    "ClusterSpecError",
    "Link",
    "MeasuredCosts",
    "all_gather_time",
    "all_reduce_time",
    "costs_from_dict",
    "load_costs",
    "parse_bandwidth",
    "parse_cluster",
    "parse_latency",
    "Layout",
    "Prediction",
    "WhatIf",
    "format_what_if",
    "predict",
    "what_if",
    "BUILTINS",
    "Action",
    "Costs",
    "DualPipeV",
    "Eager1F1B",
    "GPipe",
    "Interleaved1F1B",
    "Kind",
    "LoopedBFS",
    "Schedule",
    "ScheduleBuilder",
    "ScheduleError",
    "Simulation",
    "Std1F1B",
    "TimedAction",
    "ZBV",
    "ZeroBubble",
    "ZeroBubbleH2",
    "format_schedule",
    "from_csv",
    "parse",
    "to_chrome_trace",
    "to_csv",
    "get_builder",
    "parse_action",
    "render_grid",
    "render_timeline",
    "save_gantt",
    "simulate",
    "validate",
]
