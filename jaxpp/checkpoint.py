"""Checkpoints of pipelined training on orbax: save the whole train state, restore onto any layout.

`CheckpointManager` saves params, optimizer state, step, data position and RNG key
every few steps (asynchronously, keeping the newest N and every K-th), and restores
them into a target layout that may differ from the saving one: a 4-stage pipeline's
checkpoint restores into a 2-stage pipeline (`input_shardings` says where each leaf
goes) or a plain `jax.jit` run, and back. Restores check the tree, shapes, dtypes and
checksums and raise `CheckpointError` naming the leaves that do not fit.
"""

from jaxpp._checkpoint._leaves import CheckpointError as CheckpointError
from jaxpp._checkpoint._manager import CheckpointManager as CheckpointManager
from jaxpp._checkpoint._manager import Restored as Restored
from jaxpp._checkpoint._placement import abstract_state as abstract_state
from jaxpp._checkpoint._placement import input_shardings as input_shardings

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Restored",
    "abstract_state",
    "input_shardings",
]
