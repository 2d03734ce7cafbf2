"""Compile-ahead for ranks of several devices (`JAXPP_PRECOMPILE=all`): a pp2 x dp2
pipeline (4 CPU devices) compiles every task program before its first step, in dataflow
order (each program's argument shardings are its producers' output shardings), and the
step then runs every program as compiled ahead (no miss) and matches the single-device
jit step.
"""

import dataclasses

import jax
import numpy as np
from bench_checks import assert_step_matches, single_device_step

from jaxpp._bench import _configs, _run
from jaxpp.runtime import _plan, _precompile

PRESET = dataclasses.replace(_configs.PRESETS["tiny"], num_layers=2)
PROBLEM = _run.Problem(preset=PRESET, learning_rate=1e-2, seed=5)


def test_precompile_multi_device_ranks_no_miss_and_step_matches_jit(monkeypatch):
    monkeypatch.setenv("JAXPP_PRECOMPILE", "all")
    config = _configs.parse_config("jaxpp/zb-h1/pp2-dp2/mb2/noremat")
    step, state, batch = _run.build(config, PROBLEM, attention="xla")
    params_in = jax.tree.map(np.asarray, state.params)
    new_state, loss = step(state, batch)
    compiled = step.last_compiled
    executor = compiled.executor
    assert all(m.devices.size == 2 for m in executor.rank_meshes)
    ahead = executor.last_precompile
    runs = {(i.task, i.rank) for i in compiled.plan.instructions if isinstance(i, _plan.Run)}
    assert ahead is not None and ahead.failed == 0, ahead
    # Every program was compiled; a loop accumulator's task has two variants (for the
    # init task's replicated zeros, then its own sharded output), and each init task is
    # then compiled again to make the accumulators sharded: more programs than Runs.
    assert set(executor._compiled) >= runs  # noqa: SLF001 -- the executor's cache
    assert ahead.programs >= len(runs)
    assert any(isinstance(c, _precompile.Variants) for c in executor._compiled.values())  # noqa: SLF001
    assert executor.precompile_misses == 0
    # The init task makes the gradient accumulators as the loop task keeps them (sharded
    # over the batch shards), not replicated on the rank.
    for key, program in executor._compiled.items():  # noqa: SLF001
        if key[0].startswith("init/"):
            placed = jax.tree.leaves(program.output_shardings)
            assert any(not s.is_fully_replicated for s in placed), (key, placed)
    ref_state, ref_loss = single_device_step(PROBLEM, config.microbatches)
    np.testing.assert_allclose(
        float(loss), _run.reference_loss(PROBLEM, attention="xla"), rtol=1e-4
    )
    assert_step_matches(new_state, loss, ref_state, ref_loss, params_in)


def test_precompile_setting_all_enables_multi_device_ranks(monkeypatch):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    monkeypatch.setenv("JAXPP_PRECOMPILE", "1")
    assert not _precompile.enabled([mesh])
    monkeypatch.setenv("JAXPP_PRECOMPILE", "all")
    assert _precompile.enabled([mesh])


def test_variants_pick_the_program_compiled_for_the_argument_shardings():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    f = jax.jit(lambda a, b: a + 2 * b)
    x = np.arange(8.0, dtype=np.float32)
    aval = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole)
    compiled = [
        f.lower(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), aval).compile()
        for s in (split, whole)
    ]
    variants = _precompile.Variants(compiled)
    y = jax.device_put(x, whole)
    for s in (split, whole):
        out = variants(jax.device_put(x, s), y)
        np.testing.assert_allclose(np.asarray(out), 3 * x)
    other = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()[2:4]), ("data",)), whole.spec
    )
    try:
        variants(jax.device_put(x, other), y)
    except ValueError as e:
        assert "no compiled variant" in str(e)
    else:
        raise AssertionError("a call with other shardings must raise ValueError")


def test_precompile_multi_device_ranks_places_host_inputs_as_the_executor_does(monkeypatch):
    # A batch given as host arrays is placed by its input spec: the precompile must
    # assume that same placement, or every program that reads it misses.
    monkeypatch.setenv("JAXPP_PRECOMPILE", "all")
    config = _configs.parse_config("jaxpp/zb-h1/pp2-dp2/mb2/noremat")
    step, state, batch = _run.build(config, PROBLEM, attention="xla")
    _, loss = step(state, jax.tree.map(np.asarray, batch))
    assert step.last_compiled.executor.precompile_misses == 0
    np.testing.assert_allclose(
        float(loss), _run.reference_loss(PROBLEM, attention="xla"), rtol=1e-4
    )
