"""The cluster what-if model against the measured 2B 1F1B run on 2x H200 (2026-11-21)."""

import dataclasses
import json
import pathlib

import pytest

from jaxpp import schedules
from jaxpp._bench import _whatif

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks/results/pipeline_2026-11-21/bench_2b_2xh200_partial.json"
NAME = "jaxpp/1f1b/pp2/mb16/noremat"


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def test_what_if_predicts_the_measured_2b_1f1b_step_within_10_percent(results):
    check = _whatif.validate(results, NAME)
    assert check.measured_s == pytest.approx(0.9936, abs=1e-4)
    assert abs(check.error) < 0.10, check.describe()
    # Without the measured optimizer time the model still lands within 10%, but lower.
    costs = schedules.costs_from_dict(_whatif.cluster_costs(results, NAME))
    bare = dataclasses.replace(costs, optimizer_s_per_param_byte=0.0)
    layout = schedules.Layout(pp=2, schedule="1f1b")
    step = schedules.predict(layout, bare, schedules.Cluster(1, 2)).step_s
    assert step < check.predicted_s and abs(step / check.measured_s - 1) < 0.10


def test_cluster_costs_of_the_measured_row_are_per_layer_times(results):
    costs = _whatif.cluster_costs(results, NAME)
    row = next(r for r in results["results"] if r["name"] == NAME)
    first, last = row["costs"]["per_stage"]["0"], row["costs"]["per_stage"]["1"]
    # Per layer from the stage without the LM head; the head is the last stage's excess.
    assert costs["layer"]["forward_s"] == pytest.approx(first["F"] / 12)
    assert costs["layer"]["backward_s"] == pytest.approx(first["B"] / 12)
    assert costs["head"]["forward_s"] == pytest.approx(last["F"] - first["F"])
    assert costs["head"]["backward_s"] == pytest.approx(last["B"] - first["B"])
    assert costs["head"]["backward_s"] > 0
    assert costs["measured"] and "2 x NVIDIA H200" in costs["note"]
    loaded = schedules.costs_from_dict(costs)
    assert loaded.microbatch_size * 16 == loaded.global_batch
    held = 12 * costs["layer"]["param_bytes"] + costs["embedding_param_bytes"] / 2
    assert loaded.optimizer_s_per_param_byte * held == pytest.approx(row["outside_loop_seconds"])


def test_cluster_costs_of_a_missing_or_spmd_row_raise(results):
    with pytest.raises(ValueError, match="no row 'jaxpp/zbv/pp2/mb16/noremat'.*Fix: one of"):
        _whatif.cluster_costs(results, "jaxpp/zbv/pp2/mb16/noremat")
    spmd = {**results, "results": [{"name": "spmd/tp2/acc1/noremat", "kind": "spmd"}]}
    with pytest.raises(ValueError, match="not a successful jaxpp row"):
        _whatif.cluster_costs(spmd, "spmd/tp2/acc1/noremat")


RESULTS_8B = REPO / "benchmarks/results/pipeline_2026-11-21_s4/call3_4xh200/bench_8b_4xgpu.json"
ZB = "jaxpp/zb-h1/pp4/mb32/noremat"
FSDP = "spmd/fsdp4/acc4/noremat"


@pytest.fixture(scope="module")
def results_8b():
    return json.loads(RESULTS_8B.read_text())


def test_validate_all_on_the_8b_file_predicts_every_measured_row(results_8b):
    checks = {c.name: c for c in _whatif.validate_all(results_8b, costs_from=ZB, overlap=0.5)}
    assert list(checks) == ["jaxpp/1f1b/pp4/mb32/noremat", FSDP, ZB]
    # Real data (4x H200, 2026-11-21): the numbers are computed, not required to be within 10%.
    assert checks[ZB].measured_s == pytest.approx(2.0342, abs=1e-4)
    assert checks[ZB].predicted_s == pytest.approx(2.2320, abs=1e-3)
    assert 100 * checks[ZB].error == pytest.approx(9.7, abs=0.05)
    spmd = checks[FSDP]
    assert spmd.measured_s == pytest.approx(2.7900, abs=1e-4)
    assert spmd.costs_from == ZB and spmd.prediction.layout.describe() == "fsdp4 mb2"
    assert spmd.prediction.microbatches == 4
    assert spmd.error == pytest.approx(spmd.predicted_s / spmd.measured_s - 1)
    table = _whatif.format_validations(tuple(checks.values()))
    assert f"{FSDP}  " in table and f"{100 * spmd.error:+5.1f}%" in table
    assert "compute" in spmd.describe() and "exposed comm" in spmd.describe()


def test_validate_spmd_uses_the_rows_exact_layout_and_the_costs_rows_layer_times(results_8b):
    check = _whatif.validate_spmd(results_8b, FSDP, costs_from=ZB)
    costs = schedules.costs_from_dict(_whatif.cluster_costs(results_8b, ZB))
    m, per_gpu = 4, 32 // (4 * 4)  # acc4 microbatches of 2 sequences per GPU
    layers = costs.num_layers * (costs.forward_s + costs.backward_s) * per_gpu
    head = (costs.head_forward_s + costs.head_backward_s) * per_gpu  # spread like the layers
    assert head > 0
    assert check.prediction.compute_s == pytest.approx(m * (layers + head))
    # Without overlap all FSDP traffic is exposed: 2 gathers + 1 reduce-scatter of the
    # bf16 params per microbatch, ring over 4 GPUs at 450 GB/s.
    link = schedules.Cluster(1, 4).intra
    ring = 3 / 4 * costs.total_param_bytes / link.bandwidth + 3 * link.latency
    assert check.prediction.exposed_comm_s == pytest.approx(m * 3 * ring)
    with_overlap = _whatif.validate_spmd(results_8b, FSDP, costs_from=ZB, overlap=0.5)
    assert with_overlap.predicted_s < check.predicted_s


def test_validate_spmd_with_remat_adds_one_forward_to_the_backward(results_8b):
    remat = FSDP.replace("noremat", "remat")
    row = next(r for r in results_8b["results"] if r["name"] == FSDP)
    renamed = {**results_8b, "results": [{**row, "name": remat, "config": None}]}
    base = _whatif.validate_spmd(results_8b, FSDP, costs_from=ZB)
    both = {**renamed, "results": [*renamed["results"], *results_8b["results"]]}
    check = _whatif.validate_spmd(both, remat, costs_from=ZB)
    costs = schedules.costs_from_dict(_whatif.cluster_costs(results_8b, ZB))
    extra = 4 * 2 * costs.num_layers * costs.forward_s  # m x sequences x layers x F
    assert check.prediction.compute_s - base.prediction.compute_s == pytest.approx(extra)
    assert check.prediction.memory_bytes < base.prediction.memory_bytes


def test_validate_spmd_of_a_jaxpp_or_failed_row_raises(results_8b):
    with pytest.raises(ValueError, match="not a successful SPMD row.*Fix: one of: spmd/fsdp4"):
        _whatif.validate_spmd(results_8b, ZB, costs_from=ZB)
    failed = {**results_8b, "results": [{"name": FSDP, "kind": "spmd", "status": "timeout"}]}
    with pytest.raises(ValueError, match="status 'timeout'"):
        _whatif.validate_spmd(failed, FSDP, costs_from=ZB)


def test_mean_takes_a_zero_bubble_first_stage_whose_w_is_its_whole_backward():
    # ZB-H1's first stage has no input gradient: F and W only; the others split I and W.
    per_stage = {
        "0": {"F": 1.0, "W": 3.5},
        "1": {"F": 1.5, "I": 2.0, "W": 1.0},
        "2": {"F": 2.0, "I": 2.5, "W": 1.5},
    }
    backward = _whatif._mean(per_stage, ("B",), ("I", "W"), ("W",))
    assert backward == pytest.approx((3.5 + 3.0 + 4.0) / 3)
    assert _whatif._mean(per_stage, ("F",)) == pytest.approx(1.5)
    # A full B wins over the later alternatives; a stage with none of them raises.
    assert _whatif._mean({"0": {"B": 5.0, "W": 1.0}}, ("B",), ("I", "W"), ("W",)) == 5.0
    with pytest.raises(ValueError, match="lack the kinds"):
        _whatif._mean({"0": {"F": 1.0, "I": 2.0}}, ("B",), ("I", "W"), ("W",))


def test_cluster_costs_of_the_8b_zb_h1_row_take_w_from_the_split_stages_only(results_8b):
    costs = _whatif.cluster_costs(results_8b, ZB)
    per_stage = next(r for r in results_8b["results"] if r["name"] == ZB)["costs"]["per_stage"]
    # Stage 3 holds the LM head: per-layer times come from stages 0-2, the head is its excess.
    split = [per_stage[s]["W"] for s in ("1", "2")]
    assert costs["layer"]["weight_grad_s"] == pytest.approx(sum(split) / 2 / 10)
    backward = [per_stage["0"]["W"]] + [per_stage[s]["I"] + per_stage[s]["W"] for s in "12"]
    assert costs["layer"]["backward_s"] == pytest.approx(sum(backward) / 3 / 10)
    last = per_stage["3"]["I"] + per_stage["3"]["W"]
    assert costs["head"]["backward_s"] == pytest.approx(last - sum(backward) / 3)


def test_cluster_whatif_cli_from_bench_prints_every_row_then_the_sweep(load_file, capsys):
    cli = load_file("benchmarks/cluster_whatif.py")
    argv = ["--from-bench", str(RESULTS_8B), "--config", ZB, "--gpus", "4"]
    assert cli.main([*argv, "--cluster", "nodes=1,gpus_per_node=4", "--schedules", "zb-h1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("configuration") and "error" in lines[1]
    assert lines[2].startswith("jaxpp/1f1b/pp4/mb32/noremat")
    assert lines[3].startswith(FSDP) and lines[4].startswith(ZB) and "+9.7%" in lines[4]
    assert "crossover:" in out and "assumptions:" in out
