"""Tests for `jaxpp schedule ...` (jaxpp/_cli_schedule.py), called through jaxpp.cli.main."""

import json

import pytest

from jaxpp.cli import main
from jaxpp.schedules import BUILTINS, ZBV, format_schedule, from_csv, parse, to_csv


def test_cli_compare_prints_a_row_for_every_builtin(capsys):
    assert main(["schedule", "compare", "--stages", "4", "--microbatches", "16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == set(BUILTINS)
    assert rows["1f1b"][3] == "15.8%"  # (p-1)/(m+p-1)
    assert rows["interleaved-1f1b"][3] == "8.6%"  # (p-1)/(v m+p-1)
    assert rows["1f1b"][4] == "4"


def test_cli_compare_marks_impossible_combination(capsys):
    assert main(["schedule", "compare", "--stages", "4", "--microbatches", "4"]) == 0
    out = capsys.readouterr().out
    assert "dualpipev" in out and "needs at least 7 microbatches" in out


def test_cli_show_prints_grid_timeline_and_writes_files(capsys, tmp_path):
    png, trace = tmp_path / "s.png", tmp_path / "s.json"
    argv = [
        "schedule",
        "show",
        "interleaved-1f1b",
        "--stages",
        "2",
        "--microbatches",
        "4",
        "--virtual",
        "2",
        "--costs",
        "f=1,b=2",
        "--png",
        str(png),
        "--trace",
        str(trace),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("interleaved-1f1b: 4 stages on 2 ranks, 4 microbatches")
    assert "rank 1:" in out and "makespan" in out and "bubble per rank" in out
    assert png.stat().st_size > 0
    assert json.loads(trace.read_text())["traceEvents"]


def test_cli_simulate_and_convert_both_directions(capsys, tmp_path):
    text_path, csv_path, back = tmp_path / "zbv.txt", tmp_path / "zbv.csv", tmp_path / "back.txt"
    schedule = ZBV(4).build(4)
    text_path.write_text(format_schedule(schedule))
    assert main(["schedule", "convert", str(text_path), str(csv_path)]) == 0
    assert from_csv(csv_path.read_text()) == schedule
    assert main(["schedule", "convert", str(csv_path), str(back)]) == 0
    assert parse(back.read_text()) == schedule
    assert main(["schedule", "simulate", str(csv_path), "--costs", "t=0.5"]) == 0
    assert "valid" in capsys.readouterr().out
    assert to_csv(schedule) == csv_path.read_text()


def test_cli_simulate_bad_schedule_prints_error_and_fails(capsys, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("rank 0: 0B0 0F0\n")
    assert main(["schedule", "simulate", str(path)]) == 1
    assert "Fix: move 0F0 before 0B0 on rank 0" in capsys.readouterr().err


def test_cli_unknown_schedule_name_lists_valid_names(capsys):
    assert main(["schedule", "show", "1f1bb", "--stages", "2", "--microbatches", "2"]) == 1
    assert "Fix: use one of gpipe, 1f1b" in capsys.readouterr().err


def test_cli_bad_costs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["schedule", "compare", "--stages", "2", "--microbatches", "2", "--costs", "q=1"])
    assert "keys f, b, i, w, t" in capsys.readouterr().err


def test_cli_simulate_cluster_what_if_prints_table_crossover_and_assumptions(capsys, tmp_path):
    from jaxpp.schedules import Std1F1B, _cluster

    costs, schedule = tmp_path / "measured.json", tmp_path / "s.txt"
    costs.write_text(json.dumps(_cluster.example_costs_dict()))
    schedule.write_text(format_schedule(Std1F1B(2).build(8)))  # 16 sequences: dp 2
    cluster = "nodes=2,gpus_per_node=4,ib=100Gbps,nvlink=300GBps,ib_latency=4us"
    assert main(["schedule", "simulate", "zb-h1", "--costs", str(costs), "--cluster", cluster]) == 0
    out = capsys.readouterr().out
    assert "what-if with PP schedules zb-h1" in out and "NOT MEASURED" in out
    assert "12.5 GB/s per GPU + 4 us" in out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["8"])
    assert "zb-h1" in row and "crossover:" in out and "assumptions:" in out
    argv = ["schedule", "simulate", str(schedule), "--costs", str(costs), "--cluster", cluster]
    assert main([*argv, "--overlap", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "2 ranks, 2 stages, 8 microbatches: valid" in out
    assert "8 GPUs tp2 pp2 dp2 tp-pp-dp: step" in out and "DP overlap 0.5" in out


def test_cli_simulate_cluster_bad_inputs_are_clear_errors(capsys, tmp_path):
    costs = tmp_path / "measured.json"
    costs.write_text(json.dumps({"format": "jaxpp-cluster-costs/1", "num_layers": 2}))
    with pytest.raises(SystemExit):
        main(["schedule", "simulate", "1f1b", "--costs", str(costs), "--cluster", "nodes=1,ib=1Gb"])
    assert "cannot read bandwidth '1Gb'" in capsys.readouterr().err
    assert (
        main(["schedule", "simulate", "1f1b", "--costs", str(costs), "--cluster", "nodes=1"]) == 1
    )
    assert "missing 'global_batch'" in capsys.readouterr().err
    assert main(["schedule", "simulate", "1f1b", "--cluster", "nodes=1"]) == 1
    assert "Fix: add --costs measured.json" in capsys.readouterr().err
