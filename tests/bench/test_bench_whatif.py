"""The cluster what-if model against the measured 2B 1F1B run on 2x H200 (2026-11-21)."""

import dataclasses
import json
import pathlib

import pytest

from jaxpp import schedules
from jaxpp._bench import _whatif

RESULTS = pathlib.Path("benchmarks/results/pipeline_2026-11-21/bench_2b_2xh200_partial.json")
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
    stage_forward = [t["F"] for t in row["costs"]["per_stage"].values()]
    assert costs["layer"]["forward_s"] == pytest.approx(sum(stage_forward) / 2 / 12)
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
