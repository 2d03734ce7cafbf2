"""The memory estimate of benchmark configurations and the OOM gate that uses it."""

import dataclasses
import json

import pytest

from jaxpp import cli
from jaxpp._bench import _configs, _memory, _run
from jaxpp.models import gpt

GIB = _memory.GIB
DP_NAME = "jaxpp/zb-h1/pp2-dp2/mb16/noremat"
P2B, P8B = _configs.PRESETS["2b"], _configs.PRESETS["8b"]


# Measured peak_bytes_in_use on H200s (GiB), every jaxpp row with a peak: 2b on 2 GPUs, 8b
# on 4 (benchmarks/results/pipeline_*/). The first was measured on day one (2026-11-21),
# under an executor that has changed much since; it sits furthest from the fit.
_JAXPP_PEAKS = [
    ("jaxpp/1f1b/pp2/mb16/noremat", P2B, 55471112960 / GIB, 0.07),
    ("jaxpp/zb-h1/pp2/mb8/noremat", P2B, 67.1, 0.04),
    ("jaxpp/zb-h1/pp2/mb16/noremat", P2B, 48.2, 0.04),
    ("jaxpp/zbv/pp2/mb8/noremat", P2B, 74.0, 0.04),
    ("jaxpp/zbv/pp2/mb16/noremat", P2B, 52.2, 0.04),
    ("jaxpp/zbv/pp2/mb32/noremat", P2B, 42.8, 0.04),
    ("jaxpp/dualpipev/pp2/mb8/noremat", P2B, 81.5, 0.04),
    ("jaxpp/dualpipev/pp2/mb16/noremat", P2B, 56.2, 0.04),
    ("jaxpp/1f1b/pp4/mb32/noremat", P8B, 90.2, 0.04),
    ("jaxpp/zb-h1/pp4/mb32/noremat", P8B, 90.2, 0.04),
    ("jaxpp/zb-h1/pp4/mb16/noremat", P8B, 124400918784 / GIB, 0.04),
    ("jaxpp/zbv/pp4/mb16/noremat", P8B, 115.2, 0.04),
    ("jaxpp/dualpipev/pp4/mb16/noremat", P8B, 120.2, 0.04),
    ("jaxpp/interleaved-1f1b/pp4/mb32/noremat", P8B, 93.1, 0.04),
]


@pytest.mark.parametrize(
    ("name", "preset", "measured_gib", "tolerance"),
    # XLA's own estimate before its rematerialization pass (H200, 2026-11-21).
    [("spmd/fsdp2/acc1/noremat", P2B, 124082786464 / GIB, 0.03), *_JAXPP_PEAKS],
)
def test_estimate_matches_the_calibration_points(name, preset, measured_gib, tolerance):
    found = _memory.estimate(_configs.parse_config(name), preset).total
    assert found / GIB == pytest.approx(measured_gib, rel=tolerance)


def test_jaxpp_estimate_shards_state_under_fsdp_in_stages():
    # ZeRO-3 inside a stage: AdamW state and gradient accumulators split over "data";
    # the bf16 weights are gathered whole; DP keeps a whole copy per device.
    def lazy(name: str) -> _memory.MemoryEstimate:
        return _memory.estimate(_configs.parse_config(name), P8B, ahead_all=False)

    dp = lazy("jaxpp/zb-h1/pp2-dp2/mb16/noremat")
    fsdp = lazy("jaxpp/zb-h1/pp2-fsdp2/mb16/noremat")
    assert fsdp.state == pytest.approx(dp.state / 2)
    assert fsdp.grads == pytest.approx(dp.grads / 2)
    assert fsdp.weights == dp.weights and fsdp.activations == dp.activations
    # The init task's accumulators are replicated on the rank (the loop task's are
    # sharded): the whole stage's float32 gradients per device in the first microbatch,
    # [data, *param] for DP.
    tp = lazy("jaxpp/zb-h1/pp2-tp2/mb16/noremat")
    stage = 4 * fsdp.state / 12 * 2  # float32 gradients of the whole stage

    def first_step(e: _memory.MemoryEstimate) -> float:  # held as the state is
        return _memory.FIRST_STEP_BYTES * e.state / _memory.STATE_BYTES

    assert fsdp.extra == pytest.approx(stage + first_step(fsdp))
    assert tp.extra == pytest.approx(stage + first_step(tp))
    assert dp.extra == pytest.approx(2 * stage + first_step(dp))
    # JAXPP_PRECOMPILE=all makes them where the loop keeps them.
    ahead = _memory.estimate(_configs.parse_config(DP_NAME), P8B, ahead_all=True)
    assert ahead.extra == pytest.approx(first_step(ahead))
    assert ahead.total == pytest.approx(dp.total - 2 * stage)


@pytest.mark.parametrize("preset", ["tiny", "2b", "8b"])
def test_total_params_equals_the_gpt_param_count(preset):
    config = _run.Problem(preset=_configs.PRESETS[preset]).model_config()
    assert _memory.total_params(_configs.PRESETS[preset]) == gpt.param_count(config)


def test_estimate_shrinks_with_remat_accumulation_and_sharding():
    def total(name: str, preset=P8B) -> float:
        return _memory.estimate(_configs.parse_config(name), preset).total

    assert total("spmd/fsdp4/acc4/remat") < total("spmd/fsdp4/acc4/noremat")
    assert total("spmd/fsdp4/acc8/noremat") < total("spmd/fsdp4/acc4/noremat")
    assert total("spmd/fsdp4/acc4/noremat") < total("spmd/dp4/acc4/noremat")
    assert total("spmd/tp4/acc4/noremat") < total("spmd/dp4/acc4/noremat")
    assert total("jaxpp/1f1b/pp4/mb32/noremat") < total("jaxpp/1f1b/pp4/mb16/noremat")
    assert total("jaxpp/1f1b/pp4/mb16/remat") < total("jaxpp/1f1b/pp4/mb16/noremat")
    assert total("jaxpp/1f1b/pp2-tp2/mb16/noremat") < total("jaxpp/1f1b/pp2-dp2/mb16/noremat")


def test_estimate_parts_follow_the_layout():
    fsdp = _memory.estimate(_configs.parse_config("spmd/fsdp4/acc1/remat"), P8B)
    dp = _memory.estimate(_configs.parse_config("spmd/dp4/acc1/remat"), P8B)
    assert fsdp.state == pytest.approx(dp.state / 4)  # ZeRO-3 shards the AdamW state
    assert dp.state == pytest.approx(12 * _memory.total_params(P8B))
    # A V schedule puts the first and the last stage on rank 0: embedding, head, logits.
    zbv = _memory.estimate(_configs.parse_config("jaxpp/zbv/pp4/mb16/noremat"), P8B)
    one = _memory.estimate(_configs.parse_config("jaxpp/1f1b/pp4/mb16/noremat"), P8B)
    assert zbv.logits > 0 and one.logits == 0  # 1F1B's fullest rank is rank 0, no head
    extra = _memory.embed_params(P8B) + _memory.head_params(P8B)
    assert zbv.state - one.state == pytest.approx(12 * (extra - _memory.embed_params(P8B)))


def test_oom_problem_names_both_sizes_and_the_fix():
    config = _configs.parse_config("spmd/dp2/acc1/noremat")
    message = _memory.oom_problem(config, P2B, 100 * GIB)
    assert message.startswith("predicted OOM: 130.") and "> 100.0 GiB" in message
    assert "Fix: remat" in message
    assert _memory.oom_problem(config, P2B, 200 * GIB) is None


def test_usable_bytes_reads_the_jax_memory_fraction():
    assert _memory.usable_bytes("h200", environ={}) == pytest.approx(0.75 * 140.4 * GIB)
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    assert _memory.usable_bytes("h100", environ=env) == pytest.approx(0.9 * 79.6 * GIB)
    with pytest.raises(ValueError, match="Fix: one of h200, h100"):
        _memory.usable_bytes("a100")


def test_fit_problem_names_a_schedule_that_refuses_the_microbatch_count():
    config = _configs.parse_config("jaxpp/dualpipev/pp4/mb4/noremat")
    assert "needs at least 7 microbatches" in _configs.fit_problem(config, P8B, 4)
    assert not any(
        c.schedule == "dualpipev" and c.ranks == 4 and c.microbatches < 7
        for c in _configs.sweep(P8B, 4, microbatches=(4, 8))
    )


def test_bench_cli_list_shows_predicted_memory_and_verdict(capsys):
    argv = ["bench", "pipeline", "--model", "2b", "--devices", "2", "--list", "--remat", "off"]
    configs = "spmd/fsdp2/acc1/noremat,jaxpp/1f1b/pp2/mb16/noremat"
    assert cli.main([*argv, "--configs", configs, "--memory-gib", "105"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# predicted peak memory per device; limit 105.0 GiB")
    assert lines[1].split() == ["spmd/fsdp2/acc1/noremat", "115.6", "GiB", "predicted", "OOM"]
    assert lines[2].split() == ["jaxpp/1f1b/pp2/mb16/noremat", "48.2", "GiB", "fits"]


def test_bench_cli_predicted_oom_skips_without_compiling(tmp_path, capsys):
    out = tmp_path / "bench.json"
    names = "spmd/dp2/acc1/noremat,jaxpp/1f1b/pp2/mb4/noremat"
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "2", "--configs", names]
    flags = ["--steps", "1", "--warmup", "1", "--attention", "xla", "--memory-gib", "1e-6"]
    assert cli.main([*argv, *flags, "--out", str(out)]) == 0  # skipped is not failed
    rows = json.loads(out.read_text())["results"]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    for row in rows:
        assert row["error"].startswith("predicted OOM: ") and "> 0.0 GiB" in row["error"]
        assert row["predicted_memory"]["total"] > 0
    assert "predicted OOM" in out.with_suffix(".md").read_text()


def test_run_config_xla_estimate_over_the_limit_raises_before_running():
    preset = dataclasses.replace(_configs.PRESETS["tiny"], num_layers=1)
    problem = _run.Problem(preset=preset)
    config = _configs.parse_config("spmd/dp2/acc1/noremat")
    with pytest.raises(_run.PredictedOOMError, match=r"XLA's estimate after compiling"):
        _run.run_config(config, problem, reference=1.0, attention="xla", memory_limit=1)


def test_the_docstring_plan_names_configurations_predicted_to_fit(monkeypatch):
    import re

    from jaxpp import _cli_bench

    doc = _cli_bench.__doc__
    found = re.findall(r"--model (\w+) --devices (\d+) --isolate.*?--configs\s+([^\s\\]+)", doc)
    found = [(model, devices, names, {}) for model, devices, names in found]
    # the 8B plan's driver calls, with the settings a call names before BENCH_CONFIGS
    # (the compile-ahead, the memory fraction)
    calls = re.findall(
        r"^    C=(\S+)(?:\s+#[^\n]*)?\n    ((?:\w+=\S+ )*)BENCH_CONFIGS=", doc, flags=re.MULTILINE
    )
    assert len(found) == 1 and len(calls) == 3
    found += [("8b", "4", names, dict(re.findall(r"(\w+)=(\S+)", env))) for names, env in calls]
    assert found[1][3]["BENCH_MEM_FRACTION"] == "0.75"  # the TP rows (README "Session 10")
    for model, devices, names, env in found:
        if "JAXPP_PRECOMPILE" in env:
            monkeypatch.setenv("JAXPP_PRECOMPILE", env["JAXPP_PRECOMPILE"])
        else:
            monkeypatch.delenv("JAXPP_PRECOMPILE", raising=False)
        kind = "h100" if devices == "1" else "h200"
        limit = _memory.usable_bytes(kind, fraction=float(env.get("BENCH_MEM_FRACTION", 0.9)))
        preset = _configs.PRESETS[model]
        for name in names.split(","):
            config = _configs.parse_config(name)
            assert _configs.fit_problem(config, preset, int(devices)) is None, name
            assert _memory.oom_problem(config, preset, limit) is None, name
