"""`jaxpp bench pipeline`: the tiny preset end to end, JSON written, bad flags rejected."""

import json

import pytest

from jaxpp import cli
from jaxpp._bench import _configs, _report


def test_bench_cli_tiny_spmd_and_jaxpp_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    names = "spmd/dp4/acc1/noremat,jaxpp/1f1b/pp2-dp2/mb4/noremat"
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "4", "--configs", names]
    code = cli.main(
        [*argv, "--steps", "2", "--warmup", "1", "--attention", "xla", "--out", str(out)]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema"] == _report.SCHEMA
    assert data["environment"]["device_count"] >= 4 and data["environment"]["jax"]
    assert data["model"]["preset"] == "tiny"
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == set(names.split(","))
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["first_loss"] == pytest.approx(data["reference_loss"], rel=1e-4)
        assert len(row["step_s_all"]) == 2 and row["tokens_per_s"] > 0
        assert row["mfu"] is None  # no bf16 ceiling on the CPU
        assert row["predicted_memory"]["total"] > 0
    assert rows["spmd/dp4/acc1/noremat"]["xla_memory"]["argument_bytes"] > 0
    # DP's gradients: all-reduced, as much as the parameters (CPU: bf16 math runs in f32)
    reduced = rows["spmd/dp4/acc1/noremat"]["collectives"]["all-reduce"]
    assert reduced["count"] >= 1 and reduced["bytes"] >= data["model"]["params"] * 2
    jaxpp_row = rows["jaxpp/1f1b/pp2-dp2/mb4/noremat"]
    assert 0 <= jaxpp_row["simulated_bubble"] < 1 and jaxpp_row["predicted_step_s"] > 0
    assert len(jaxpp_row["busy_seconds"]) == 2 and jaxpp_row["costs"]
    trace = json.loads((tmp_path / "traces" / "jaxpp_1f1b_pp2-dp2_mb4_noremat.json").read_text())
    assert trace["traceEvents"]
    assert "spmd/dp4/acc1/noremat" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    assert "best jaxpp" in capsys.readouterr().out


def test_bench_cli_list_prints_configurations(capsys):
    argv = ["bench", "pipeline", "--model", "8b", "--devices", "4", "--only", "spmd", "--list"]
    assert cli.main([*argv, "--remat", "on", "--accumulations", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# predicted peak memory per device")
    printed = [line.split()[0] for line in lines[1:]]
    assert printed == [f"spmd/{layout}/acc4/remat" for layout in _configs.spmd_layouts(4)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--configs", "spmd/fsdp4/acc1"], "is malformed"),
        (["--configs", "jaxpp/gpipe2/pp4/mb4/remat"], "unknown schedule"),
        (["--configs", "jaxpp/1f1b/pp3/mb4/remat"], "uses 3 devices, but the run has 4"),
        (["--configs", "jaxpp/zbv/pp4/mb4/remat"], "4 layers do not split into 8 stages"),
        (["--microbatches", "8,x"], "expected comma-separated integers"),
        (["--steps", "0"], "must be >= 1"),
        (["--schedules", "1f1b,zb-h3"], "unknown schedule 'zb-h3'"),
    ],
)
def test_bench_cli_bad_flags_raise_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "pipeline", "--model", "tiny", "--devices", "4", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_cli_isolate_without_devices_raises(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "pipeline", "--model", "tiny", "--isolate"])
    assert "--isolate needs --devices N" in capsys.readouterr().err


def test_report_other_preset_file_raises(tmp_path):
    path = _report.write(tmp_path / "r.json", [], model={"preset": "2b"})
    with pytest.raises(ValueError, match="one file per model"):
        _report.load_rows(path, preset="8b")


def test_report_merge_replaces_same_name_and_table_orders_by_speed():
    rows = [
        {"name": "a", "kind": "spmd", "status": "ok", "tokens_per_s": 1.0, "step_s": 2.0},
        {"name": "b", "kind": "jaxpp", "status": "failed", "error": "RESOURCE_EXHAUSTED: oom"},
    ]
    new = {"name": "b", "kind": "jaxpp", "status": "ok", "tokens_per_s": 3.0, "step_s": 0.5}
    merged = _report.merge_rows(rows, new)
    assert [r["name"] for r in merged] == ["a", "b"] and merged[1]["status"] == "ok"
    table = _report.markdown_table([*merged, {"name": "c", "status": "wrong", "error": "x"}])
    lines = table.splitlines()
    assert lines[2].startswith("| b |") and lines[3].startswith("| a |")
    assert lines[4].startswith("| c | wrong: x")
    assert _report.best(merged, "jaxpp")["name"] == "b"


def test_bench_cli_tiny_jaxpp_one_device_ranks_reports_precompile(tmp_path, capsys):
    out = tmp_path / "bench.json"
    name = "jaxpp/1f1b/pp2/mb4/noremat"
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "2", "--configs", name]
    argv += ["--steps", "1", "--warmup", "1", "--attention", "xla", "--out", str(out)]
    assert cli.main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "ok"
    ahead = row["precompile"]
    assert ahead["programs"] == ahead["total"] > 0 and ahead["failed"] == 0
    assert [r["rank"] for r in ahead["ranks"]] == [0, 1]
    assert sum(r["programs"] for r in ahead["ranks"]) == ahead["programs"]
    assert ahead["slowest"] and 0 < ahead["slowest_seconds"] <= ahead["seconds"]
    # A phase inside "compile+first step".
    assert 0 < row["phase_seconds"]["precompile"] <= row["phase_seconds"]["compile+first step"]
    printed = capsys.readouterr().out
    assert f"{name}: precompile ..." in printed
    assert f"{name}: precompile: {ahead['programs']} programs, " in printed
    assert "per rank: r0 " in printed
