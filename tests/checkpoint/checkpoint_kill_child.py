"""Child process of the kill test: saves step 1, starts an async save of step 2, dies (SIGKILL).

Usage: python checkpoint_kill_child.py DIRECTORY BALLAST_ELEMENTS
"""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from checkpoint_models import init_state, make_step, train  # noqa: E402

from jaxpp import checkpoint  # noqa: E402


def main(directory: str, ballast_elements: int) -> None:
    step = make_step("jit")
    # A large leaf (like an embedding table) so that writing step 2 takes a while.
    ballast = jax.random.normal(jax.random.key(7), (ballast_elements,))
    manager = checkpoint.CheckpointManager(directory, async_save=True)
    state, _ = train(step, init_state(jax.random.key(0)), 0, 1)
    manager.save(1, {"train": state, "ballast": ballast}, data_position=1)
    manager.wait_until_finished()
    state, _ = train(step, state, 1, 1)
    manager.save(2, {"train": state, "ballast": ballast + jnp.float32(1)}, data_position=2)
    print("save of step 2 started; killing myself", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
