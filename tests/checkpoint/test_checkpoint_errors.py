"""Bad checkpoints and bad use give clear errors: missing, corrupted, truncated, wrong model."""

import gc
import pathlib
import time

import jax
import jax.numpy as jnp
import pytest
from checkpoint_models import init_state

from jaxpp import checkpoint

# When a file fails to read, orbax leaves behind read coroutines and tensorstore callbacks
# to a closed event loop, which Python reports as unraisable. `restore` collects what it
# can at the failure; a read still in flight then finishes within milliseconds. The tests
# that provoke this let all of it happen (`_settle`) while these filters apply: reported
# in a later test, it failed that test (CI, 2026-11-21; again on a loaded machine,
# 2026-11-22, after the settling: pytest.ini now ignores the read coroutine everywhere).
_FAILED_READ_LEFTOVERS = (
    "ignore:Exception ignored in.*_read_array_index_and_device_put"
    ":pytest.PytestUnraisableExceptionWarning",
    "ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning",
)


def _settle() -> None:
    for _ in range(10):
        time.sleep(0.1)
        gc.collect()


@pytest.fixture
def saved(tmp_path) -> tuple[pathlib.Path, dict]:
    """A directory holding step 1 of a fresh random train state (written synchronously)."""
    state = init_state(jax.random.key(2))
    with checkpoint.CheckpointManager(tmp_path, async_save=False, config={"width": 8}) as m:
        m.save(1, state, data_position=1)
    return tmp_path, state


@pytest.fixture
def saved_matrix(tmp_path) -> tuple[pathlib.Path, dict]:
    """Step 1 of a state with a 64x64 random matrix: big and incompressible, so orbax stores
    its bytes as they are and a flipped byte changes a value without breaking the format."""
    w, b = jax.random.normal(jax.random.key(4), (2, 64, 64))
    state = {"w": w, "b": b[0]}
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as m:
        m.save(1, state)
    return tmp_path, state


def _largest_data_file(directory: pathlib.Path) -> pathlib.Path:
    """The biggest file of orbax's OCDBT stores (the `d/` folders): the matrix's bytes."""
    files = [p for p in (directory / "1" / "state").rglob("*") if p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def test_checkpoint_flipped_byte_raises_naming_corrupted_leaf(saved_matrix):
    directory, state = saved_matrix
    path = _largest_data_file(directory)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"is corrupted: 1 restored leaves differ .*\(checksum mismatch\): w\nFix: restore an",
    ):
        checkpoint.CheckpointManager(directory).restore(state)


@pytest.mark.filterwarnings(*_FAILED_READ_LEFTOVERS)
def test_checkpoint_truncated_file_raises_cannot_be_read(saved_matrix):
    directory, state = saved_matrix
    path = _largest_data_file(directory)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot be read.*\nFix: .*step=N"):
        checkpoint.CheckpointManager(directory).restore(state)
    _settle()


def test_checkpoint_missing_metadata_file_raises_no_readable_metadata(saved):
    directory, state = saved
    (directory / "1" / "meta" / "metadata").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no readable metadata"):
        checkpoint.CheckpointManager(directory).restore(state)


@pytest.mark.filterwarnings(*_FAILED_READ_LEFTOVERS)
def test_checkpoint_missing_array_file_raises_cannot_be_read(saved_matrix):
    directory, state = saved_matrix
    _largest_data_file(directory).unlink()
    # The message carries the root cause (tensorstore's, naming the file), not only orbax's.
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"cannot be read.*\(cause: .*local file.*\)\nFix: the files are",
    ):
        checkpoint.CheckpointManager(directory).restore(state)
    _settle()


def test_checkpoint_wrong_model_raises_naming_missing_and_reshaped_leaves(saved):
    directory, _ = saved
    deeper = init_state(jax.random.key(0), num_layers=5)
    with pytest.raises(checkpoint.CheckpointError, match=r"not in the checkpoint: .*layers/4/w"):
        checkpoint.CheckpointManager(directory).restore(deeper)
    shallower = init_state(jax.random.key(0), num_layers=3)
    with pytest.raises(checkpoint.CheckpointError, match=r"not in the target: .*layers/3/b"):
        checkpoint.CheckpointManager(directory).restore(shallower)
    wider = init_state(jax.random.key(0), width=16)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"30 leaves shape or dtype differs: opt_state/1/0/mu/embed: saved float32\(8, 8\), "
        r"target float32\(16, 16\).*\nFix: restore into the model",
    ):
        checkpoint.CheckpointManager(directory).restore(wider)


def test_checkpoint_wrong_dtype_raises_naming_leaf(saved):
    directory, state = saved
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"mu/head: saved float32\(8, 8\), target bfloat16"
    ):
        checkpoint.CheckpointManager(directory).restore(half)


def test_checkpoint_other_config_raises_naming_key(saved):
    directory, state = saved
    manager = checkpoint.CheckpointManager(directory, config={"width": 16})
    with pytest.raises(checkpoint.CheckpointError, match="another config: width: saved 8, now 16"):
        manager.restore(state)


def test_checkpoint_empty_directory_and_unknown_step_raise(saved, tmp_path_factory):
    directory, state = saved
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*leave out --resume"):
        checkpoint.CheckpointManager(empty).restore(state)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds steps \[1\]"):
        checkpoint.CheckpointManager(directory).restore(state, step=5)


def test_checkpoint_saving_a_saved_step_raises_and_keeps_it(saved):
    directory, state = saved
    manager = checkpoint.CheckpointManager(directory)
    other = jax.tree.map(lambda x: x + 1, state)
    with pytest.raises(checkpoint.CheckpointError, match="never overwritten"):
        manager.save(1, other)
    restored = manager.restore(state)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), restored.state, state))


def test_checkpoint_bad_options_and_values_raise(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep=0 must be a positive int"):
        checkpoint.CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="save_every=0 must be a positive int"):
        checkpoint.CheckpointManager(tmp_path, save_every=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file. Fix: pass a directory"):
        checkpoint.CheckpointManager(tmp_path / "file")
    with checkpoint.CheckpointManager(tmp_path / "ok") as manager:
        with pytest.raises(ValueError, match="data_position=.* is not JSON-able"):
            manager.save(1, {"w": jnp.ones(2)}, data_position=object())
        with pytest.raises(ValueError, match="rng has dtype float32; expected a typed key"):
            manager.save(2, {"w": jnp.ones(2)}, rng=jnp.ones(2))
        with pytest.raises(TypeError, match="state leaf 'count' is a int .*jnp.asarray"):
            manager.save(3, {"w": jnp.ones(2), "count": 3})
    with pytest.raises(TypeError, match="where a jax.sharding.Sharding belongs"):
        checkpoint.abstract_state({"w": jnp.ones(2)}, {"w": "cpu:0"})
