"""Flax pipeline wrappers: pipeline a linen or NNX model without editing it.

`pipeline(model, num_stages=4)` or `pipeline(model, layout="E tt|tt|tt|tt L")`
inserts `jaxpp.mark_stage_end` after the layer that ends each stage, and on the
model output. Layout grammar: see `parse_layout`.
"""

from jaxpp._flax._layout import GRAMMAR as GRAMMAR
from jaxpp._flax._layout import Layout as Layout
from jaxpp._flax._layout import even_layout as even_layout
from jaxpp._flax._layout import parse_layout as parse_layout
from jaxpp._flax._linen import PipelinedModule as PipelinedModule
from jaxpp._flax._linen import pipeline_linen as pipeline_linen
from jaxpp._flax._nnx import pipeline_nnx as pipeline_nnx
from jaxpp._flax._pipeline import pipeline as pipeline

__all__ = [
    "GRAMMAR",
    "Layout",
    "PipelinedModule",
    "even_layout",
    "parse_layout",
    "pipeline",
    "pipeline_linen",
    "pipeline_nnx",
]
