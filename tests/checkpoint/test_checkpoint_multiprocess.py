"""Checkpoints of 2-process runs over gloo: each process writes its shards; restores are exact.

`checkpoint_mp_worker.py` runs under `jaxpp launch` (2 processes, 1 virtual CPU device
each, stage 0 on process 0, stage 1 on process 1). Every launch has a hard timeout;
on expiry the launcher's process group is killed, so nothing is left running.
"""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_models import assert_trees_equal, batch_at, init_state, make_step, train
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp import checkpoint
from jaxpp._checkpoint import _shards
from jaxpp.cli import main

WORKER = pathlib.Path(__file__).with_name("checkpoint_mp_worker.py")
K = 2  # as in the worker
CONFIG = {"model": "residual-mlp", "width": 8}


def _launch_worker(
    phase: str, directory: pathlib.Path, *, devices: int = 1, hard_timeout_s: float = 90.0
) -> str:
    """Runs the worker phase in 2 processes; returns its output, failing the test on error."""
    env = dict(os.environ)
    # The same XLA flags as this process (bit-exact comparisons); the launcher sets the
    # device count.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(
        f for f in flags if not f.startswith("--xla_force_host_platform_device_count")
    )
    env.pop("JAX_PLATFORMS", None)
    command = [sys.executable, "-m", "jaxpp.cli", "launch", "-n", "2", "--timeout", "20"]
    command += [
        "--devices-per-process",
        str(devices),
        "--",
        sys.executable,
        str(WORKER),
        phase,
        str(directory),
    ]
    launcher = subprocess.Popen(
        command,
        cwd=WORKER.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = launcher.communicate(timeout=hard_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and every worker
        out, _ = launcher.communicate()
        pytest.fail(f"{phase}: ran past {hard_timeout_s} s:\n{_tail(out)}")
    text = out.decode(errors="replace")
    assert launcher.returncode == 0, f"{phase} failed:\n{_tail(text)}"
    for p in (0, 1):
        assert f"PASS {phase} (process {p})" in text, _tail(text)
    return text


def _tail(out, lines: int = 60) -> str:
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    return "\n".join(line for line in text.splitlines() if "[Gloo]" not in line)[-6000:]


def _unflatten(expected, prefix: str, like):
    leaves = [expected[f"{prefix}{i}"] for i in range(len(jax.tree.leaves(like)))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def test_checkpoint_two_processes_save_restore_and_one_process_restore_are_exact(tmp_path):
    _launch_worker("save", tmp_path, devices=2)
    files = sorted(p.name for p in (tmp_path / "ckpt" / str(K) / "shards").glob("*.npy"))
    state = init_state(jax.random.key(0))
    assert len(files) == len(jax.tree.leaves(state))  # each shard written once, by its owner
    out = _launch_worker("restore", tmp_path, devices=2)
    assert "[0] CHECKED restore against the uninterrupted run" in out
    # Ranks spanning both processes: each process writes its half of each split leaf.
    assert "[0] CHECKED spanning restore against the uninterrupted run" in out
    files = {p.name for p in (tmp_path / "spanning" / str(K) / "shards").glob("*.npy")}
    assert {"22.0_0.npy", "22.4_0.npy"} <= files  # params/head, split by rows

    # One process restores the 2-process checkpoint: a 2-stage pipeline on its own
    # devices continues bit for bit like the 2-process run ...
    expected = np.load(tmp_path / "expected.npz")
    manager = checkpoint.CheckpointManager(tmp_path / "ckpt", config=CONFIG)
    pipelined = make_step(2)
    target = checkpoint.restore_target(pipelined, state, batch_at(0))
    restored = manager.restore(target)
    assert (restored.step, restored.data_position) == (K, K)
    saved = _unflatten(expected, "saved", state)
    assert_trees_equal(restored.state, saved, what="restored state")
    resumed, losses = train(pipelined, restored.state, K, K)
    assert_trees_equal(resumed, _unflatten(expected, "state", state), what="state after resume")
    assert_trees_equal(losses, _unflatten(expected, "losses", losses), what="losses")
    # ... and a target without shardings (e.g. for plain jax.jit) gets the saved values
    # on this process's first device.
    restored = manager.restore(jax.eval_shape(lambda: state))
    assert_trees_equal(restored.state, saved, what="restored onto the default device")
    for x in jax.tree.leaves(restored.state):
        assert x.sharding.device_set == {jax.local_devices()[0]}


def _save_and_restore_shards(tmp_path, x: jax.Array, target: jax.ShapeDtypeStruct):
    handler = _shards.ShardsHandler()
    handler.save(tmp_path, _shards.ShardsSave(_shards.local_pieces([x])))
    return handler.restore(tmp_path, _shards.ShardsRestore((target,)))[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8], ids=("f32", "bf16", "i8"))
def test_shards_restore_onto_other_sharding_reassembles_each_region(tmp_path, dtype):
    devices = np.array(jax.devices())
    rows = NamedSharding(jax.sharding.Mesh(devices[:4], ("a",)), P("a", None))
    cols = NamedSharding(jax.sharding.Mesh(devices[4:6].reshape(1, 2), ("a", "b")), P("a", "b"))
    x = jax.device_put((jax.random.normal(jax.random.key(3), (8, 6)) * 50).astype(dtype), rows)
    got = _save_and_restore_shards(
        tmp_path, x, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cols)
    )
    assert got.sharding == cols and got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    assert len(list(tmp_path.glob("*.npy"))) == 4  # one file per saved shard


def test_shards_missing_file_raises(tmp_path):
    devices = np.array(jax.devices()[:2])
    rows = NamedSharding(jax.sharding.Mesh(devices, ("a",)), P("a"))
    x = jax.device_put(jax.random.normal(jax.random.key(4), (4,)), rows)
    handler = _shards.ShardsHandler()
    handler.save(tmp_path, _shards.ShardsSave(_shards.local_pieces([x])))
    (tmp_path / "0.2.npy").unlink()
    target = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)
    with pytest.raises(FileNotFoundError, match=r"leaf 0: the shard files cover 0 of the 2 elem"):
        handler.restore(tmp_path, _shards.ShardsRestore((target,)))


TRAIN = (
    "train --stages 2 --layers 2 --d-model 16 --heads 2 --vocab 16 --seq-len 8 --batch-size 4 "
    "--microbatches 2 --warmup 1 --steps 4 --log-every 1"
).split()


def _step_lines(text: str) -> dict[int, tuple[str, str]]:
    found = re.findall(r"step +(\d+)/4 +loss +([\d.]+) .* gnorm +([\d.]+)", text)
    return {int(step): (loss, gnorm) for step, loss, gnorm in found}


def test_trainer_two_processes_checkpoint_resumes_in_one_process_with_same_losses(tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    command = [sys.executable, "-m", "jaxpp.cli", *TRAIN, "-n", "2", "--timeout", "20"]
    command += ["--checkpoint-dir", str(tmp_path), "--save-every", "2"]
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = launcher.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        out, _ = launcher.communicate()
        pytest.fail(f"jaxpp train -n 2 ran past 90 s:\n{_tail(out)}")
    text = out.decode(errors="replace")
    assert launcher.returncode == 0, _tail(text)
    full = _step_lines(text)
    assert sorted(full) == [1, 2, 3, 4], _tail(text)
    with checkpoint.CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == (2, 4)
    shutil.rmtree(tmp_path / "4")  # as if the 2-process run had died after step 2's save
    assert main([*TRAIN, "--checkpoint-dir", str(tmp_path), "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "resumed from step 2" in resumed
    assert _step_lines(resumed) == {3: full[3], 4: full[4]}
