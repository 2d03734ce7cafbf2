"""Bad input to the pipeline API gives a clear error that names the fix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_models import make_problem, train_step

import jaxpp
from jaxpp import schedules
from jaxpp._compiler import PipelineCompileError


def _mesh(num_ranks):
    devices = np.array(jax.devices()[:num_ranks])
    return jaxpp.MpmdMesh(jax.sharding.Mesh(devices, ("stages",)), "stages")


def _problem(layers=(1, 1, 1, 1)):
    return make_problem(jax.random.key(1), layers_per_stage=layers, num_microbatches=4)


def test_markers_without_gradient_do_not_pair_raises():
    state, batch, loss = _problem()

    def step(params, batch):
        return jaxpp.treduce(lambda mb: loss(params, mb), batch, jaxpp.Std1F1B(4), jaxpp.Concat())

    with pytest.raises(PipelineCompileError, match="do not pair"):
        jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=_mesh(4))(state[0], batch)


def test_no_markers_raises_with_fix():
    state, batch, _ = _problem()

    def step(params, batch):
        return jaxpp.treduce(
            lambda mb: jax.grad(lambda p: jnp.sum(mb["x"] @ p["embed"]))(params),
            batch,
            jaxpp.Std1F1B(4),
            jaxpp.Add(),
        )

    with pytest.raises(PipelineCompileError, match="mark_stage_end"):
        jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=_mesh(4))(state[0], batch)


def test_schedule_stage_count_differs_from_markers_raises():
    state, batch, loss = _problem()
    step = functools.partial(train_step, schedule=jaxpp.Std1F1B(2), loss=loss)
    with pytest.raises(ValueError, match="the loop body marks 4"):
        jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=_mesh(2))(state, batch)


def test_mesh_rank_count_differs_from_schedule_raises():
    state, batch, loss = _problem()
    step = functools.partial(train_step, schedule=jaxpp.Std1F1B(4), loss=loss)
    with pytest.raises(ValueError, match="stage axis 4 long"):
        jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=_mesh(2))(state, batch)


def test_batch_not_divisible_into_microbatches_raises():
    with pytest.raises(ValueError, match="multiple of 3"):
        jaxpp.split_microbatches({"x": jnp.ones((8, 2))}, 3)


def test_treduce_leaves_with_different_microbatch_counts_raise():
    with pytest.raises(ValueError, match="reshape the batch"):
        jaxpp.treduce(
            lambda b: b["x"].sum(),
            {"x": jnp.ones((4, 2)), "y": jnp.ones((3, 2))},
            jaxpp.GPipe(1),
            jaxpp.Add(),
        )


def test_two_treduce_loops_raise():
    state, batch, loss = _problem()

    def step(state, batch):
        _, a = train_step(state, batch, schedule=jaxpp.Std1F1B(4), loss=loss)
        _, b = train_step(state, batch, schedule=jaxpp.Std1F1B(4), loss=loss)
        return a + b

    with pytest.raises(PipelineCompileError, match="found 2"):
        jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=_mesh(4))(state, batch)


def test_schedule_file_with_missing_microbatch_raises():
    text = schedules.format_schedule(jaxpp.Std1F1B(2).build(2))
    broken = text.replace(" 1B1", "")
    with pytest.raises(schedules.ScheduleError):
        schedules.validate(schedules.parse(broken))


def test_mpmd_mesh_without_stage_axis_raises():
    devices = np.array(jax.devices()[:2])
    with pytest.raises(ValueError, match="is not an axis"):
        jaxpp.MpmdMesh(jax.sharding.Mesh(devices, ("data",)), "stages")


def test_treduce_is_not_differentiable_from_outside():
    def f(w):
        return jaxpp.treduce(lambda x: x * w, jnp.ones((2, 3)), jaxpp.GPipe(1), jaxpp.Add()).sum()

    with pytest.raises(NotImplementedError, match="inside the\\s+loop body"):
        jax.grad(f)(1.0)


def test_in_shardings_naming_the_stage_axis_raises():
    from jax.sharding import PartitionSpec as P

    state, batch, loss = _problem()
    step = functools.partial(train_step, schedule=jaxpp.Std1F1B(4), loss=loss)
    bad = (None, {"x": P("stages"), "y": None})
    with pytest.raises(ValueError, match="only \\(\\) exist"):
        jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=_mesh(4), in_shardings=bad)(state, batch)


def test_max_accumulator_of_integers_starts_at_the_lowest_integer():
    from jaxpp._compiler import _init_task

    avals = [jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.float32)]
    ints, floats = _init_task(0, ["a", "b"], ["max", "max"], avals).fn()
    assert ints.tolist() == [np.iinfo(np.int32).min] * 2
    assert floats.tolist() == [-np.inf, -np.inf]
