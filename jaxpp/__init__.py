"""jaxpp: MPMD pipeline parallelism for JAX, with Pallas GPU kernels in the stages.

`import jaxpp` and `import jaxpp.api as jaxpp` give the same names.
"""

from jaxpp import schedules as schedules
from jaxpp._markers import mark_stage_end as mark_stage_end
from jaxpp._mpmd import MpmdMesh as MpmdMesh
from jaxpp._mpmd import mpmd_jit_with_loop as mpmd_jit_with_loop
from jaxpp._treduce import Add as Add
from jaxpp._treduce import Concat as Concat
from jaxpp._treduce import Max as Max
from jaxpp._treduce import Mean as Mean
from jaxpp._treduce import split_microbatches as split_microbatches
from jaxpp._treduce import treduce as treduce
from jaxpp._treduce import treduce_i as treduce_i
from jaxpp.schedules import ZBV as ZBV
from jaxpp.schedules import DualPipeV as DualPipeV
from jaxpp.schedules import Eager1F1B as Eager1F1B
from jaxpp.schedules import GPipe as GPipe
from jaxpp.schedules import Interleaved1F1B as Interleaved1F1B
from jaxpp.schedules import LoopedBFS as LoopedBFS
from jaxpp.schedules import Std1F1B as Std1F1B
from jaxpp.schedules import ZeroBubble as ZeroBubble
from jaxpp.schedules import ZeroBubbleH2 as ZeroBubbleH2

__all__ = [
    "Add",
    "Concat",
    "DualPipeV",
    "Eager1F1B",
    "GPipe",
    "Interleaved1F1B",
    "LoopedBFS",
    "Max",
    "Mean",
    "MpmdMesh",
    "Std1F1B",
    "ZBV",
    "ZeroBubble",
    "ZeroBubbleH2",
    "mark_stage_end",
    "mpmd_jit_with_loop",
    "schedules",
    "split_microbatches",
    "treduce",
    "treduce_i",
]
