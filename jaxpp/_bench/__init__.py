"""jaxpp._bench: the throughput race, pipelined training vs the best SPMD layout.

`jaxpp bench pipeline` (see `jaxpp._cli_bench`) runs it: configurations named in
`_configs`, SPMD sharding rules in `_spmd`, the timed runs in `_run`, and the JSON,
markdown table and bar chart in `_report`.
"""

from jaxpp._bench._configs import PRESETS as PRESETS
from jaxpp._bench._configs import BenchConfig as BenchConfig
from jaxpp._bench._configs import parse_config as parse_config
from jaxpp._bench._configs import sweep as sweep
from jaxpp._bench._run import CorrectnessError as CorrectnessError
from jaxpp._bench._run import Problem as Problem
from jaxpp._bench._run import run_config as run_config
from jaxpp._bench._spmd import Layout as Layout
from jaxpp._bench._spmd import UnknownParameterError as UnknownParameterError
from jaxpp._bench._spmd import state_specs as state_specs

__all__ = [
    "PRESETS",
    "BenchConfig",
    "CorrectnessError",
    "Layout",
    "Problem",
    "UnknownParameterError",
    "parse_config",
    "run_config",
    "state_specs",
    "sweep",
]
