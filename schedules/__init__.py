"""Schedule DSL: IR, builders, text/CSV formats, validation, simulator, rendering. JAX-free."""

from jaxpp.schedules._builders import Eager1F1B as Eager1F1B
from jaxpp.schedules._builders import GPipe as GPipe
from jaxpp.schedules._builders import Interleaved1F1B as Interleaved1F1B
from jaxpp.schedules._builders import LoopedBFS as LoopedBFS
from jaxpp.schedules._builders import ScheduleBuilder as ScheduleBuilder
from jaxpp.schedules._builders import Std1F1B as Std1F1B
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
