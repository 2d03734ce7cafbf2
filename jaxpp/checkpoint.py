"""Checkpoints of pipelined training on orbax: save the whole train state, restore onto any layout.

`CheckpointManager` saves params, optimizer state, step, data position and RNG key
every few steps (asynchronously, keeping the newest N and every K-th), and restores
them into a target layout that may differ from the saving one: a 4-stage pipeline's
checkpoint restores into a 2-stage pipeline (`input_shardings` says where each leaf
goes) or a plain `jax.jit` run, and back. Restores check the tree, shapes, dtypes and
checksums and raise `CheckpointError` naming the leaves that do not fit.

A train loop (`step` from `jaxpp.mpmd_jit_with_loop` or `jax.jit`)::

    manager = CheckpointManager(directory, save_every=100, max_to_keep=3, config=model_config)
    target = restore_target(step, state, first_batch)  # where this layout wants each leaf
    start = 0
    if resume and manager.latest_step() is not None:
        restored = manager.restore(target)
        state, start = restored.state, restored.data_position
    else:
        state = jax.device_put(state, jax.tree.map(lambda t: t.sharding, target))
    for index in range(start, num_steps):
        state, metrics = step(state, batch_at(index))
        manager.save(index + 1, state, data_position=index + 1)  # every 100th, async
    if manager.latest_step() != num_steps:  # the loop did not save the last step
        manager.save(num_steps, state, data_position=num_steps, force=True)
    manager.close()  # waits for the last write

With several processes (`jaxpp launch`, `jaxpp train -n N`) every process calls `save`
and `restore` with the same tree; each writes only the shards it holds (one file per
shard: a pipeline stage's arrays live on one process, which orbax's SPMD array handler
does not accept), process 0 writes the JSON record, and the step appears once all
have finished. Such a checkpoint restores into any layout, one process included.
"""

from jaxpp._checkpoint._leaves import CheckpointError as CheckpointError
from jaxpp._checkpoint._manager import CheckpointManager as CheckpointManager
from jaxpp._checkpoint._manager import Restored as Restored
from jaxpp._checkpoint._placement import abstract_state as abstract_state
from jaxpp._checkpoint._placement import input_shardings as input_shardings
from jaxpp._checkpoint._placement import restore_target as restore_target

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Restored",
    "abstract_state",
    "input_shardings",
    "restore_target",
]
