"""benchmarks/tp_loss_check.py, the GPU bisect of session 8's wrong SPMD TP4 loss, on CPU."""

import json

import pytest


@pytest.fixture
def tp(load_file):
    return load_file("benchmarks/tp_loss_check.py")


def test_every_variant_runs_in_its_own_process_and_matches_on_cpu(tp, tmp_path, capsys):
    out = tmp_path / "tp.json"
    variants = "attention:2x16x4x8,spmd/tp4/acc4/noremat@overlap:xla,spmd/tp2/acc2/noremat:auto"
    argv = ["--model", "tiny", "--layers", "1", "--devices", "4", "--variants", variants]
    assert tp.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["reference:auto", "reference:xla", *variants.split(",")]
    assert 0 < rows[2]["attention_error"] < 1e-2  # XLA's on a CPU: bf16 output rounding
    flags = rows[3]["xla_flags"]  # the @overlap preset reached that child only
    assert "--xla_gpu_enable_pipelined_all_reduce=true" in flags
    assert "pipelined_all_reduce" not in rows[4]["xla_flags"]
    assert capsys.readouterr().out.count("| matches |") == 3


def test_a_variant_can_leave_out_preset_flags_and_skip_the_references(tp, tmp_path, capsys):
    out = tmp_path / "tp.json"
    variant = "spmd/tp2/acc2/noremat@overlap:xla:pipelined_all_reduce+double_buffering"
    argv = ["--model", "tiny", "--layers", "1", "--devices", "4", "--variants", variant]
    # A reference far off the tiny model's loss (~ln 64): the row is flagged WRONG.
    fraction = ["--mem-fraction", "0.5"]
    assert tp.main([*argv, "--reference-loss", "40.0", *fraction, "--out", str(out)]) == 1
    (row,) = json.loads(out.read_text())["rows"]  # no reference processes ran
    assert 3 < row["loss"] < 6
    assert "--xla_gpu_enable_pipelined_all_gather=true" in row["xla_flags"]
    assert "pipelined_all_reduce" not in row["xla_flags"]
    assert "double_buffering" not in row["xla_flags"]
    assert row["mem_fraction"] == "0.5"
    assert "| 40 |" in capsys.readouterr().out


def test_table_flags_a_loss_off_the_reference(tp):
    rows = [
        {"variant": "reference:auto", "loss": 11.2175},
        {"variant": "spmd/tp4/acc4/noremat@overlap:auto", "loss": 8.41171},
        {"variant": "spmd/fsdp4/acc4/noremat@overlap:auto", "loss": 11.2176},
        {"variant": "spmd/tp4/acc4/noremat:xla", "loss": 11.2},  # no xla reference measured
        {"variant": "spmd/tp2/acc4/noremat:auto", "error": "exit 1: OOM"},
        {"variant": "attention:8x2048x8x128", "attention_error": 0.3},
    ]
    lines = tp.table(rows).splitlines()[2:]
    assert "| WRONG |" in lines[0] and "2.50e-01" in lines[0]
    assert "| matches |" in lines[1]
    assert lines[2].endswith("| no reference |") and lines[3].endswith("| exit 1: OOM |")
    assert "(vs XLA)" in lines[4] and lines[4].endswith("| WRONG |")
