"""kernels/tuning: the one timing harness, speed-of-light bounds and result files.

Every kernel benchmark times through `benchmark` (fresh inputs, optional L2 flush,
correctness gate, median of device-time samples), compares with `sol_time` from
ceilings measured in the same run, and writes JSON with `write_results`.
"""

from jaxpp.kernels.tuning._benchmark import CorrectnessError as CorrectnessError
from jaxpp.kernels.tuning._benchmark import Measurement as Measurement
from jaxpp.kernels.tuning._benchmark import benchmark as benchmark
from jaxpp.kernels.tuning._benchmark import relative_error as relative_error
from jaxpp.kernels.tuning._results import environment as environment
from jaxpp.kernels.tuning._results import write_results as write_results
from jaxpp.kernels.tuning._roofline import Ceilings as Ceilings
from jaxpp.kernels.tuning._roofline import measure_ceilings as measure_ceilings
from jaxpp.kernels.tuning._roofline import sol_score as sol_score
from jaxpp.kernels.tuning._roofline import sol_time as sol_time

__all__ = [
    "Ceilings",
    "CorrectnessError",
    "Measurement",
    "benchmark",
    "environment",
    "measure_ceilings",
    "relative_error",
    "sol_score",
    "sol_time",
    "write_results",
]
