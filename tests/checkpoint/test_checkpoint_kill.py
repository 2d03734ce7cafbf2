"""A process killed in the middle of an async save leaves the previous checkpoint restorable."""

import pathlib
import subprocess
import sys

import jax
from checkpoint_models import assert_trees_equal, init_state, make_step, train

from jaxpp import checkpoint

_CHILD = pathlib.Path(__file__).with_name("checkpoint_kill_child.py")
_BALLAST = 4_000_000  # float32 elements (16 MB): the save of step 2 is still running when killed


def test_checkpoint_kill_during_async_save_previous_step_restores_and_resumes(tmp_path):
    child = subprocess.run(
        [sys.executable, str(_CHILD), str(tmp_path), str(_BALLAST)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, f"child did not die by SIGKILL:\n{child.stdout}{child.stderr}"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    # Step 2 was caught half-written (a temporary directory), never as a step directory.
    assert leftovers == ["1", "2.orbax-checkpoint-tmp"], leftovers

    step = make_step("jit")
    reference, _ = train(step, init_state(jax.random.key(0)), 0, 1)
    reference_next, _ = train(step, reference, 1, 1)
    target = {
        "train": init_state(jax.random.key(0)),
        "ballast": jax.ShapeDtypeStruct((_BALLAST,), jax.numpy.float32),
    }
    manager = checkpoint.CheckpointManager(tmp_path, async_save=False)
    assert manager.all_steps() == (1,)
    restored = manager.restore(target)
    assert (restored.step, restored.data_position) == (1, 1)
    assert_trees_equal(restored.state["train"], reference, what="restored state")
    resumed, _ = train(step, restored.state["train"], restored.data_position, 1)
    assert_trees_equal(resumed, reference_next, what="state after resuming")
    # Saving step 2 again works; the half-written attempt is gone.
    assert manager.save(2, {"train": resumed, "ballast": restored.state["ballast"]})
    assert manager.all_steps() == (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
