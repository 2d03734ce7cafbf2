"""One process of the multi-process checkpoint test; started by `jaxpp launch`.

Usage: python checkpoint_mp_worker.py save|restore DIR   (2 processes x 2 devices)
Every process runs the 2-stage pipelined step of `checkpoint_models` (stage 0 on
process 0's first device, stage 1 on process 1's). `save`: train K steps, save (each
process writes its own shards), train K more; process 0 writes the state at K and
the state and losses after 2K to DIR/expected.npz. `restore`: a fresh run restores
step K onto the pipeline's input placement, checks it equals the saved state, trains
K steps and checks states and losses bit for bit against expected.npz; then `spanning`
saves and restores a layout whose ranks span both processes. Every process
prints "PASS <phase> (process <p>)"; a failure exits non-zero.
"""

import faulthandler
import functools
import pathlib
import sys

import jax
import numpy as np
from checkpoint_models import (
    NUM_LAYERS,
    _train_step,
    assert_trees_equal,
    batch_at,
    init_state,
    train,
)
from jax.sharding import PartitionSpec as P

import jaxpp
from jaxpp import checkpoint, runtime

K = 2
SEED = 7
CONFIG = {"model": "residual-mlp", "width": 8}


def _expected_path(directory: pathlib.Path) -> pathlib.Path:
    return directory / "expected.npz"


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
    return {f"{prefix}{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def save(directory: pathlib.Path, step) -> None:
    target = checkpoint.restore_target(step, init_state(jax.random.key(0)), batch_at(0))
    state = jax.device_put(
        init_state(jax.random.key(SEED)), jax.tree.map(lambda t: t.sharding, target)
    )
    state, _ = train(step, state, 0, K)
    saved = runtime.fetch(state, process=0)
    manager = checkpoint.CheckpointManager(directory / "ckpt", config=CONFIG)
    assert manager.save(K, state, data_position=K, rng=jax.random.key(SEED))
    state, losses = train(step, state, K, K)  # goes on while the save is written
    manager.close()
    final = runtime.fetch((state, losses), process=0)
    if jax.process_index() == 0:
        np.savez(
            _expected_path(directory),
            **_flat("saved", saved),
            **_flat("state", final[0]),
            **_flat("losses", final[1]),
        )


def restore(directory: pathlib.Path, step) -> None:
    target = checkpoint.restore_target(step, init_state(jax.random.key(0)), batch_at(0))
    restored = checkpoint.CheckpointManager(directory / "ckpt", config=CONFIG).restore(target)
    assert (restored.step, restored.data_position) == (K, K), restored
    for leaf, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding, (leaf.sharding, want.sharding)
    state, losses = train(step, restored.state, restored.data_position, K)
    got = runtime.fetch((restored.state, state, losses), process=0)
    if jax.process_index() == 0:
        expected = np.load(_expected_path(directory))
        treedef = jax.tree.structure(got[0])
        count = treedef.num_leaves

        def unflat(prefix, tree):
            n = len(jax.tree.leaves(tree))
            return jax.tree.unflatten(
                jax.tree.structure(tree), [expected[f"{prefix}{i}"] for i in range(n)]
            )

        assert count == len(jax.tree.leaves(got[1]))
        assert_trees_equal(got[0], unflat("saved", got[0]), what="restored state")
        assert_trees_equal(got[1], unflat("state", got[1]), what="state after resuming")
        assert_trees_equal(got[2], unflat("losses", got[2]), what="losses after resuming")
        print("CHECKED restore against the uninterrupted run", flush=True)


def spanning(directory: pathlib.Path) -> None:
    """Each rank spans both processes (2 devices each), its params split over them."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    split = np.array(devices).reshape(2, 2).T  # rank r = device r of each process
    mesh = jaxpp.MpmdMesh(jax.sharding.Mesh(split, ("stages", "data")), "stages")
    layer = {"w": P(None, "data"), "b": P("data")}
    params = {"embed": P(None, "data"), "head": P("data", None), "layers": [layer] * NUM_LAYERS}
    specs = ({"params": params, "opt_state": None, "step": None}, None)
    step = jaxpp.mpmd_jit_with_loop(
        functools.partial(_train_step, num_stages=2), mpmd_mesh=mesh, in_shardings=specs
    )
    target = checkpoint.restore_target(step, init_state(jax.random.key(0)), batch_at(0))
    state = jax.tree.map(
        lambda x, t: jax.make_array_from_callback(x.shape, t.sharding, lambda i: np.asarray(x)[i]),
        init_state(jax.random.key(SEED)),
        target,
    )
    assert not state["params"]["head"].is_fully_addressable  # split over both processes
    state, _ = train(step, state, 0, K)
    with checkpoint.CheckpointManager(directory / "spanning", config=CONFIG) as manager:
        manager.save(K, state, data_position=K)
    expected_state, expected_losses = train(step, state, K, K)
    restored = checkpoint.CheckpointManager(directory / "spanning", config=CONFIG).restore(target)
    resumed_state, resumed_losses = train(step, restored.state, K, K)
    got = runtime.fetch(
        (restored.state, state, resumed_state, expected_state, resumed_losses, expected_losses),
        process=0,
    )
    if jax.process_index() == 0:
        assert_trees_equal(got[0], got[1], what="spanning: restored state")
        assert_trees_equal(got[2], got[3], what="spanning: state after resuming")
        assert_trees_equal(got[4], got[5], what="spanning: losses after resuming")
        print("CHECKED spanning restore against the uninterrupted run", flush=True)


def cross_step():
    """The 2-stage pipeline of `make_step(2)` with stage r on process r's first device."""
    firsts = [min(jax.devices(), key=lambda d, p=p: (d.process_index != p, d.id)) for p in (0, 1)]
    mesh = jaxpp.MpmdMesh(
        jax.sharding.Mesh(np.array(firsts).reshape(2, 1), ("stages", "data")), "stages"
    )
    return jaxpp.mpmd_jit_with_loop(functools.partial(_train_step, num_stages=2), mpmd_mesh=mesh)


if __name__ == "__main__":
    # The test kills a launch at 90 s; if one hangs, its output says where each process was.
    faulthandler.dump_traceback_later(75, exit=False)
    runtime.initialize()
    phase, where = sys.argv[1], pathlib.Path(sys.argv[2])
    assert jax.process_count() == 2, jax.process_count()
    step = cross_step()
    if phase == "save":
        save(where, step)
    else:
        restore(where, step)
        spanning(where)
    print(f"PASS {phase} (process {jax.process_index()})", flush=True)
