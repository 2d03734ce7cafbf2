"""Checkpoints of pipelined train states: exact resume, restore onto other layouts, retention."""

import jax
import numpy as np
import pytest
from checkpoint_models import assert_trees_equal, batch_at, init_state, make_step, train

from jaxpp import checkpoint

K = 2  # steps before and after the checkpoint


@pytest.fixture(scope="module")
def steps():
    """One compiled step per layout, shared by the tests of this module (compiling is slow)."""
    return {layout: make_step(layout) for layout in (4, 2, "jit")}


def _shardings(steps, layout):
    """Where `layout` wants the state: the pipeline's input placement, or device 0 for jit."""
    state = jax.eval_shape(init_state, jax.random.key(0))
    if layout == "jit":
        where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: where, state)
    shardings, _ = checkpoint.input_shardings(steps[layout], state, batch_at(0))
    return shardings


def _target(steps, layout):
    state = jax.eval_shape(init_state, jax.random.key(0))
    return checkpoint.abstract_state(state, _shardings(steps, layout))


def _start(steps, layout, seed):
    """A fresh state placed where `layout` wants it (so the step compiles once, not per
    placement as the state moves to the stages)."""
    return jax.device_put(init_state(jax.random.key(seed)), _shardings(steps, layout))


def test_checkpoint_save_train_restore_train_is_bit_exact(steps, tmp_path):
    step = steps[4]
    state, _ = train(step, _start(steps, 4, 3), 0, K)
    rng = jax.random.key(11)
    manager = checkpoint.CheckpointManager(tmp_path, config={"width": 8})
    assert manager.save(K, state, data_position=K, rng=rng)
    # Training goes on while the save is written in the background.
    expected_state, expected_losses = train(step, state, K, K)
    manager.close()

    restored = checkpoint.CheckpointManager(tmp_path, config={"width": 8}).restore(
        _target(steps, 4)
    )
    assert (restored.step, restored.data_position, restored.config) == (K, K, {"width": 8})
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
    assert_trees_equal(restored.state, state, what="restored state")
    resumed_state, resumed_losses = train(step, restored.state, restored.data_position, K)
    assert_trees_equal(resumed_losses, expected_losses, what="losses after resume")
    assert_trees_equal(resumed_state["params"], expected_state["params"], what="params")
    assert_trees_equal(resumed_state["opt_state"], expected_state["opt_state"], what="opt state")
    assert int(resumed_state["step"]) == 2 * K


@pytest.mark.parametrize(
    ("saved_by", "restored_into"),
    [
        pytest.param(4, 2, id="4-stages-to-2-stages"),
        pytest.param(4, "jit", id="4-stages-to-jit"),
        pytest.param("jit", 4, id="jit-to-4-stages"),
        pytest.param(2, 4, id="2-stages-to-4-stages"),
    ],
)
def test_checkpoint_restore_other_layout_continues_like_uninterrupted_run(
    steps, tmp_path, saved_by, restored_into
):
    state, _ = train(steps[saved_by], _start(steps, saved_by, 5), 0, K)
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(K, state, data_position=K)
    target = _target(steps, restored_into)
    restored = checkpoint.CheckpointManager(tmp_path).restore(target)
    for path_leaf, want in zip(
        jax.tree_util.tree_flatten_with_path(restored.state)[0],
        jax.tree.leaves(target),
        strict=True,
    ):
        path, leaf = path_leaf
        assert leaf.sharding.device_set == want.sharding.device_set, jax.tree_util.keystr(path)
    # The uninterrupted run: the new layout continuing from the in-memory state, moved
    # where that layout wants it.
    state = jax.device_put(state, _shardings(steps, restored_into))
    expected_state, expected_losses = train(steps[restored_into], state, K, K)
    resumed_state, resumed_losses = train(steps[restored_into], restored.state, K, K)
    assert_trees_equal(resumed_losses, expected_losses, what="losses")
    assert_trees_equal(resumed_state, expected_state, what="state")


def test_checkpoint_input_shardings_put_layers_on_their_stages(steps):
    state = jax.eval_shape(init_state, jax.random.key(0))
    shardings, _ = checkpoint.input_shardings(steps[2], state, batch_at(0))
    devices = jax.devices()
    layers = shardings["params"]["layers"]
    assert [layer["w"].device_set for layer in layers] == [{devices[i // 2]} for i in range(4)]
    assert shardings["params"]["head"].device_set == {devices[1]}
    assert shardings["params"]["embed"].device_set == {devices[0]}
    target = checkpoint.restore_target(steps[2], state, batch_at(0))
    assert target["params"]["head"].sharding.device_set == {devices[1]}
    assert target["opt_state"][1][0].mu["layers"][3]["w"].sharding.device_set == {devices[1]}


def test_checkpoint_keep_last_n_and_every_k_keeps_those_steps(tmp_path):
    state = {"w": jax.random.normal(jax.random.key(0), (4,))}
    with checkpoint.CheckpointManager(tmp_path, max_to_keep=2, keep_period=3) as manager:
        for step in range(1, 9):
            assert manager.save(step, jax.tree.map(lambda x, s=step: x + s, state))
        manager.wait_until_finished()
        assert manager.all_steps() == (3, 6, 7, 8)
        assert manager.latest_step() == 8
        restored = manager.restore(state, step=6)
    np.testing.assert_array_equal(restored.state["w"], state["w"] + 6)


def test_checkpoint_save_every_saves_multiples_only_unless_forced(tmp_path):
    state = {"w": jax.random.normal(jax.random.key(0), (4,))}
    with checkpoint.CheckpointManager(tmp_path, save_every=3, async_save=False) as manager:
        saved = [manager.save(step, state) for step in range(1, 8)]
        assert manager.save(8, state, force=True)
        assert saved == [False, False, True, False, False, True, False]
        assert manager.all_steps() == (3, 6, 8)


def test_checkpoint_raw_rng_and_structured_data_position_round_trip(tmp_path):
    state = {"w": jax.random.normal(jax.random.key(0), (3,))}
    position = {"epoch": 2, "batch": 17, "files": ["a", "b"]}
    rng = jax.random.PRNGKey(9)
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(4, state, data_position=position, rng=rng)
        restored = manager.restore(state)
    assert restored.data_position == position
    assert restored.rng.dtype == rng.dtype
    np.testing.assert_array_equal(restored.rng, rng)


def test_checkpoint_typed_keys_in_state_round_trip_onto_target_devices(tmp_path):
    keys = jax.random.split(jax.random.key(13), 3)
    state = {"dropout_keys": keys, "w": jax.random.normal(jax.random.key(1), (5,))}
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, state)
        where = jax.sharding.SingleDeviceSharding(jax.devices()[2])
        target = checkpoint.abstract_state(state, jax.tree.map(lambda _: where, state))
        restored = manager.restore(target).state
    assert restored["dropout_keys"].dtype == keys.dtype
    assert restored["dropout_keys"].sharding.device_set == {jax.devices()[2]}
    np.testing.assert_array_equal(
        jax.random.key_data(restored["dropout_keys"]), jax.random.key_data(keys)
    )
    np.testing.assert_array_equal(restored["w"], state["w"])
