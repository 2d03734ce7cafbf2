"""The pipelined train step equals jax.jit of the same step, for every schedule."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from pipeline_models import assert_trees_close, make_problem, train_step

import jaxpp
from jaxpp import schedules
from jaxpp.runtime import Run, Send

# (builder, layers per stage) for every built-in schedule on 4 ranks.
FOUR_RANKS = [
    pytest.param(jaxpp.GPipe(4), (1, 1, 1, 1), id="gpipe"),
    pytest.param(jaxpp.Std1F1B(4), (1, 1, 1, 1), id="1f1b"),
    pytest.param(jaxpp.Eager1F1B(4), (1, 1, 1, 1), id="eager1f1b"),
    pytest.param(jaxpp.Interleaved1F1B(8, ranks=4), (1,) * 8, id="interleaved-8-on-4"),
    pytest.param(jaxpp.LoopedBFS(8, ranks=4), (1,) * 8, id="loopedbfs-8-on-4"),
    pytest.param(jaxpp.ZeroBubble(4), (1, 1, 1, 1), id="zb-h1"),
    pytest.param(jaxpp.ZeroBubbleH2(4), (1, 1, 1, 1), id="zb-h2"),
    pytest.param(jaxpp.ZBV(8, ranks=4), (1,) * 8, id="zbv"),
    pytest.param(jaxpp.DualPipeV(8, ranks=4), (1,) * 8, id="dualpipev"),
]


def _mesh(num_ranks, inner=1, names=("stages", "data")):
    devices = np.array(jax.devices()[: num_ranks * inner]).reshape(num_ranks, inner)
    return jaxpp.MpmdMesh(jax.sharding.Mesh(devices, names), "stages")


def _run_both(
    schedule, layers, *, num_microbatches=8, steps=2, mesh=None, seed=0, in_shardings=None, **kwargs
):
    state, batch, loss = make_problem(
        jax.random.key(seed), layers_per_stage=layers, num_microbatches=num_microbatches, **kwargs
    )
    step = functools.partial(train_step, schedule=schedule, loss=loss)
    mesh = mesh or _mesh(schedule.num_ranks if hasattr(schedule, "num_ranks") else 4)
    pipelined = jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=mesh, in_shardings=in_shardings)
    reference = jax.jit(step)
    ref_state, pp_state = state, state
    for i in range(steps):
        ref_state, ref_losses = reference(ref_state, batch)
        pp_state, pp_losses = pipelined(pp_state, batch)
        assert_trees_close(pp_losses, ref_losses, what=f"losses, step {i}")
        assert_trees_close(pp_state[0], ref_state[0], what=f"params, step {i}")
        assert_trees_close(pp_state[1], ref_state[1], what=f"optimizer state, step {i}")
    return pipelined, pp_state


@pytest.mark.parametrize(("schedule", "layers"), FOUR_RANKS)
def test_pipeline_every_builtin_schedule_matches_jit(schedule, layers):
    pipelined, _ = _run_both(schedule, layers)
    stats = pipelined.last_stats
    simulated = pipelined.last_compiled.plan.simulation.peak_activations
    assert all(p <= s for p, s in zip(stats.peak_activations, simulated, strict=True)), (
        f"live activations {stats.peak_activations} exceed the simulator's peak {simulated}"
    )
    assert max(stats.peak_activations) > 0  # the count is real, not a constant
    by_kind = stats.dispatch_by_kind
    assert set(by_kind) == {"inputs", "run", "send", "split", "free", "wait", "outputs"}
    assert by_kind["run"] > 0 and by_kind["send"] > 0
    assert by_kind["wait"] == 0  # one process: no value is ever in transit on another thread
    # One-device ranks: every task program was compiled before the first step, and every
    # call used it (no lazy recompile because arguments differed from the compiled types).
    executor = pipelined.last_compiled.executor
    runs = {(i.task, i.rank) for i in pipelined.last_compiled.plan.instructions
            if isinstance(i, Run)}  # fmt: skip
    ahead = executor.last_precompile
    assert ahead is not None and ahead.failed == 0 and ahead.programs == len(runs), ahead
    assert executor.precompile_misses == 0
    assert sum(by_kind.values()) <= stats.dispatch_seconds <= stats.seconds


def test_pipeline_8_ranks_1f1b_and_interleaved_match_jit():
    _run_both(jaxpp.Std1F1B(8), (1,) * 8, num_microbatches=8, steps=1)
    _run_both(jaxpp.Interleaved1F1B(16, ranks=8), (1,) * 16, num_microbatches=8, steps=1)


def test_pipeline_user_text_schedule_matches_jit():
    text = schedules.format_schedule(jaxpp.Std1F1B(4).build(8))
    _run_both(schedules.parse(text), (1, 1, 1, 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"tied": True}, id="tied-embeddings"),
        pytest.param({"skip": True}, id="skip-0-to-3"),
    ],
)
def test_pipeline_cross_stage_parameters_and_skips_match_jit(kwargs):
    _run_both(jaxpp.Std1F1B(4), (1, 1, 1, 1), **kwargs)


def test_pipeline_uneven_stages_match_jit():
    _run_both(jaxpp.Std1F1B(4), (1, 3, 2, 1))


def test_pipeline_data_parallel_inside_stages_matches_jit():
    batch_spec = {"x": P(None, "data"), "y": P(None, "data")}
    pipelined, state = _run_both(
        jaxpp.Std1F1B(4), (1, 1, 1, 1), mesh=_mesh(4, 2), in_shardings=(None, batch_spec)
    )
    executor = pipelined.last_compiled.executor
    assert executor.rank_meshes[0].devices.size == 2
    assert len(state[0]["layers"][0]["w"].sharding.device_set) == 2
    # Shardings inside a rank depend on XLA's choices upstream: no compiling ahead.
    assert executor.last_precompile is None


def test_precompile_setting_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("JAXPP_PRECOMPILE", "yes")
    with pytest.raises(ValueError, match="JAXPP_PRECOMPILE='yes': expected 1"):
        _run_both(jaxpp.Std1F1B(4), (1, 1, 1, 1), steps=1)


def test_pipeline_tensor_parallel_inside_stages_matches_jit():
    layer_spec = {"w": P(None, "model"), "b": P("model")}
    params_spec = {"embed": None, "head": None, "layers": [layer_spec] * 4}
    _run_both(
        jaxpp.Std1F1B(4),
        (1, 1, 1, 1),
        mesh=_mesh(4, 2, names=("stages", "model")),
        in_shardings=((params_spec, None), None),
    )


def test_pipeline_uneven_microbatch_count_matches_jit():
    _run_both(jaxpp.Std1F1B(4), (1, 1, 1, 1), num_microbatches=6, steps=1)


@pytest.mark.parametrize("schedule", [jaxpp.Std1F1B(4), jaxpp.ZeroBubble(4)], ids=str)
def test_profile_gives_trace_costs_and_prediction(schedule):
    pipelined, state = _run_both(schedule, (1, 1, 1, 1), steps=1)
    _, batch, _ = make_problem(jax.random.key(0), layers_per_stage=(1, 1, 1, 1), num_microbatches=8)
    profile = pipelined.profile(state, batch)
    measured = sum(t.end - t.start for t in profile.timings)
    # Even tasks that never run (stage 0's empty I) must not add phantom time.
    assert profile.predicted_step_seconds < 3 * measured
    names = {e["name"] for e in profile.chrome_trace()["traceEvents"] if e["ph"] == "X"}
    kinds = "FIW" if schedule.build(8).uses_split_backward else "FB"
    expected = {f"s{s}/{k}[{mb}]" for s in range(4) for k in kinds for mb in range(8)}
    assert expected - {f"s0/I[{mb}]" for mb in range(8)} <= names
    assert set(profile.costs.per_stage) == {0, 1, 2, 3}
    assert profile.simulation.makespan > 0 and all(b > 0 for b in profile.busy_seconds)
    # With the measured costs, the simulator cannot beat any rank's own work.
    schedule = profile.simulation.schedule
    for rank_actions in schedule.actions:
        own = sum(profile.costs.duration(a) for a in rank_actions)
        assert profile.simulation.makespan >= own * (1 - 1e-9)
    assert 0.0 <= profile.bubble(profile.predicted_step_seconds) < 1.0


def test_pipeline_compiles_each_task_once_for_all_microbatches(monkeypatch):
    monkeypatch.setenv("JAXPP_PRECOMPILE", "0")  # the lazy path: jax.jit's own cache
    pipelined, _ = _run_both(jaxpp.Std1F1B(4), (1, 1, 1, 1), steps=2)
    assert pipelined.last_compiled.executor.last_precompile is None
    compiled = pipelined.last_compiled.executor._compiled  # noqa: SLF001 -- the executor's cache
    loop_tasks = {(t.name, t.stage) for t in pipelined.last_compiled.graph.loop_tasks.values()}
    assert {(name, rank) for name, rank in compiled} >= loop_tasks
    # 8 microbatches x 2 steps ran through each loop task, yet each compiled once.
    for (name, _), fn in compiled.items():
        assert fn._cache_size() == 1, f"{name} compiled {fn._cache_size()} times"  # noqa: SLF001


def test_pipeline_tied_weight_gradients_meet_once_after_the_loop():
    """Each stage accumulates its share of a shared weight's gradient; no per-mb transfer."""
    sends = {}
    for tied in (False, True):
        pipelined, _ = _run_both(jaxpp.Std1F1B(4), (1, 1, 1, 1), steps=1, tied=tied)
        plan = pipelined.last_compiled.plan
        sends[tied] = sum(
            1 for i in plan.instructions if isinstance(i, Send) and i.source.mb is not None
        )
        if tied:
            assert any(
                isinstance(i, Run) and i.task.startswith("combine/") for i in plan.instructions
            )
    assert sends[True] == sends[False]


_PLAN_TEXT_SCRIPT = """
import functools, hashlib, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np, jaxpp
from pipeline_models import make_problem, train_step
state, batch, loss = make_problem(
    jax.random.key(0), layers_per_stage=(1, 1, 1, 1), num_microbatches=4, tied=True)
step = functools.partial(train_step, schedule=jaxpp.ZeroBubble(4), loss=loss)
mesh = jaxpp.MpmdMesh(jax.sharding.Mesh(np.array(jax.devices()[:4]), ("stages",)), "stages")
plan = jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=mesh).compile(state, batch).plan
print(hashlib.sha256(str(plan).encode()).hexdigest())
"""


def test_plan_is_identical_in_every_process():
    """Processes of a multi-process run each compile the step; their plans must agree."""
    import os
    import pathlib
    import subprocess
    import sys

    here = str(pathlib.Path(__file__).parent)
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", _PLAN_TEXT_SCRIPT, here],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1


def test_pipeline_updated_parameters_stay_on_their_stage():
    """The optimizer runs where each parameter lives, also when optax jits over the tree."""
    pipelined, state = _run_both(jaxpp.Std1F1B(4), (1, 1, 1, 1), steps=1)
    params, opt_state = state
    devices = jax.devices()
    adam = opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    for stage, layer in enumerate(params["layers"]):
        for name in ("w", "b"):
            assert layer[name].devices() == {devices[stage]}, (stage, name)
            assert adam.mu["layers"][stage][name].devices() == {devices[stage]}
            assert adam.nu["layers"][stage][name].devices() == {devices[stage]}
