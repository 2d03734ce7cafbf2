"""Tests for the cluster what-if model (schedules/_cluster.py, schedules/_cluster_model.py)."""

import dataclasses
import json
import math
import random

import pytest

from jaxpp.schedules import (
    Cluster,
    ClusterSpecError,
    Costs,
    Layout,
    Link,
    _cluster,
    _cluster_model,
    all_gather_time,
    all_reduce_time,
    costs_from_dict,
    get_builder,
    load_costs,
    parse_bandwidth,
    parse_cluster,
    parse_latency,
    predict,
    simulate,
    what_if,
)

FREE = Link(math.inf, 0.0)


def _costs(rng: random.Random, **overrides):
    """Random, nonzero measured costs: 8 layers, global batch 16."""
    data = _cluster.example_costs_dict()
    data["num_layers"] = 8
    backward = rng.uniform(1e-3, 4e-3)
    data["layer"] = {
        "forward_s": rng.uniform(0.5e-3, 2e-3),
        "backward_s": backward,
        "weight_grad_s": backward * rng.uniform(0.2, 0.6),
        "param_bytes": rng.uniform(10e6, 100e6),
        "activation_bytes": rng.uniform(10e6, 100e6),
    }
    data["boundary_activation_bytes"] = rng.uniform(1e6, 20e6)
    data["embedding_param_bytes"] = rng.uniform(0, 50e6)
    data.update(overrides)
    return costs_from_dict(data)


def _cluster_of(rng: random.Random, nodes=2, gpus_per_node=4) -> Cluster:
    return Cluster(
        nodes,
        gpus_per_node,
        Link(rng.uniform(100e9, 500e9), rng.uniform(1e-6, 5e-6)),
        Link(rng.uniform(5e9, 50e9), rng.uniform(2e-6, 10e-6)),
    )


def test_all_reduce_time_ring_matches_closed_form():
    rng = random.Random(0)
    for _ in range(20):
        size, n = rng.uniform(1e6, 1e10), rng.randint(2, 64)
        link = Link(rng.uniform(1e9, 1e12), rng.uniform(1e-7, 1e-4))
        expected = 2 * (n - 1) / n * size / link.bandwidth + 2 * (n - 1) * link.latency
        assert all_reduce_time(size, n, link) == pytest.approx(expected, rel=1e-12)
        assert all_gather_time(size, n, link) == pytest.approx(expected / 2, rel=1e-12)
    assert all_reduce_time(1e9, 1, Link(1e9, 1.0)) == 0.0


def test_parse_cluster_units_and_defaults_read_as_bytes_and_seconds():
    c = parse_cluster("nodes=4,gpus_per_node=8,ib=200Gbps,nvlink=900GBps,ib_latency=2us")
    assert (c.nodes, c.gpus_per_node, c.num_gpus) == (4, 8, 32)
    assert c.inter == Link(25e9, 2e-6)
    assert c.intra.bandwidth == 900e9 and c.intra.latency == _cluster.DEFAULT_NVLINK.latency
    e = parse_cluster("nodes=2, eth=100Gbps, eth_latency=0.02ms")
    assert e.gpus_per_node == 8 and e.inter == Link(12.5e9, 2e-5)
    assert parse_bandwidth("1.5TBps") == 1.5e12 and parse_latency("300ns") == 3e-7
    assert c.link(7, 8) == c.inter and c.link(8, 15) == c.intra
    assert c.group_link((0, 4)) == c.intra and c.group_link((0, 8)) == c.inter


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nodes=2,ib=100Gbit", r"cannot read bandwidth '100Gbit'.*Gbps, Tbps, MBps"),
        ("nodes=2,ib_latency=5usec", r"cannot read latency '5usec'.*ns, us, ms, s"),
        ("nodes=2,infiniband=100Gbps", r"cannot read cluster item 'infiniband=100Gbps'"),
        ("gpus_per_node=8,ib=100Gbps", r"has no nodes=N"),
        ("nodes=2,ib=100Gbps,eth=10Gbps", r"sets both ib and eth"),
        ("nodes=two", r"nodes='two' is not an integer"),
        ("nodes=0", r"nodes=0 must be an int >= 1"),
    ],
)
def test_parse_cluster_bad_input_raises_clear_error(text, match):
    with pytest.raises(ClusterSpecError, match=match):
        parse_cluster(text)


def test_costs_from_dict_missing_field_names_it_and_its_meaning():
    data = _cluster.example_costs_dict()
    del data["layer"]["forward_s"]
    with pytest.raises(ClusterSpecError, match=r"missing 'layer.forward_s' \(one layer's forward"):
        costs_from_dict(data)
    data = _cluster.example_costs_dict()
    del data["memory"]
    with pytest.raises(ClusterSpecError, match=r"missing 'memory.gpu_bytes'"):
        costs_from_dict(data)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "v0"}, r"format='v0'; this reader knows 'jaxpp-cluster-costs/1'"),
        ({"num_layers": 0}, r"num_layers=0 must be an int >= 1"),
        ({"boundary_activation_bytes": -1.0}, r"boundary_activation_bytes=-1.0 must be"),
        ({"collectives": [{"op": "broadcast", "bytes": 1, "gpus": 2, "seconds": 1}]}, "broadcast"),
        ({"collectives": [{"op": "all_reduce", "bytes": 1}]}, r"needs op, bytes, gpus, seconds"),
    ],
)
def test_costs_from_dict_bad_value_raises_clear_error(change, match):
    data = {**_cluster.example_costs_dict(), **change}
    with pytest.raises(ClusterSpecError, match=match):
        costs_from_dict(data)


def test_costs_weight_grad_larger_than_backward_raises():
    data = _cluster.example_costs_dict()
    data["layer"]["weight_grad_s"] = 1.0
    with pytest.raises(ClusterSpecError, match=r"weight_grad_s=1.0 must lie in \[0, backward_s"):
        costs_from_dict(data)


def test_load_costs_round_trips_and_refuses_non_json(tmp_path):
    good, bad = tmp_path / "c.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_cluster.example_costs_dict()))
    assert load_costs(good) == _cluster.example_costs()
    bad.write_text("{not json")
    with pytest.raises(ClusterSpecError, match=r"bad.json: not JSON"):
        load_costs(bad)


def test_shipped_example_costs_load_and_are_marked_not_measured():
    costs = load_costs("benchmarks/results/cluster_costs_example.json")
    assert not costs.measured and "NOT MEASURED" in costs.note
    assert 7e9 < costs.total_param_bytes / 2 < 9e9  # ~8B parameters in bf16


def test_predict_dp_on_one_gpu_equals_compute():
    rng = random.Random(1)
    for _ in range(5):
        costs = _costs(rng)
        p = predict(Layout(), costs, _cluster_of(rng, 1, 1), overlap=rng.random())
        m = costs.global_batch // costs.microbatch_size
        expected = m * costs.num_layers * (costs.forward_s + costs.backward_s)
        assert p.step_s == pytest.approx(expected, rel=1e-12)
        assert p.compute_s == pytest.approx(expected, rel=1e-12)
        assert p.exposed_comm_s == 0 and p.bubble == 0 and p.microbatches == m


def test_predict_dp_across_nodes_adds_exposed_ring_all_reduce():
    rng = random.Random(2)
    costs, cluster = _costs(rng), _cluster_of(rng, 2, 4)
    overlap = rng.uniform(0.1, 0.9)
    p = predict(Layout(dp=8, order="tp-pp-dp"), costs, cluster, overlap=overlap)
    comm = all_reduce_time(costs.total_param_bytes, 8, cluster.inter)
    compute = 2 * costs.num_layers * (costs.forward_s + costs.backward_s)
    hidden = min(overlap * comm, costs.num_layers * costs.backward_s)
    assert p.step_s == pytest.approx(compute + comm - hidden, rel=1e-12)


def test_predict_fsdp_and_tp_match_closed_forms():
    rng = random.Random(3)
    costs, cluster = _costs(rng), _cluster_of(rng, 1, 4)
    layers, f, b = costs.num_layers, costs.forward_s, costs.backward_s
    fsdp = predict(Layout(dp=4, fsdp=True), costs, cluster)
    gather = all_gather_time(costs.total_param_bytes, 4, cluster.intra)
    assert fsdp.step_s == pytest.approx(4 * (layers * (f + b) + 3 * gather), rel=1e-12)
    tp = predict(Layout(tp=4), costs, cluster)
    per_pass = 2 * all_reduce_time(costs.boundary_activation_bytes, 4, cluster.intra)
    expected = 16 * layers * ((f + b) / 4 + 2 * per_pass)
    assert tp.step_s == pytest.approx(expected, rel=1e-12)
    assert tp.memory_bytes == pytest.approx(
        (costs.total_param_bytes * 8 + layers * costs.activation_bytes) / 4, rel=1e-12
    )


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"])
def test_predict_pp_with_free_links_equals_simulator_makespan(name):
    rng = random.Random(name)
    costs = _costs(rng, embedding_param_bytes=0.0)
    cluster = Cluster(1, 4, FREE, FREE)
    p = predict(Layout(pp=4, schedule=name), costs, cluster)
    builder = get_builder(name, 4 * _cluster_model._stages_per_rank(name), ranks=4)
    n = costs.num_layers // builder.num_stages
    w = costs.weight_grad_s
    plain = Costs(
        forward=n * costs.forward_s,
        backward=n * costs.backward_s,
        input_grad=n * (costs.backward_s - w),
        weight_grad=n * w,
    )
    sim = simulate(builder.build(costs.global_batch), plain)
    assert p.step_s == pytest.approx(sim.makespan, rel=1e-12)
    assert p.bubble == pytest.approx(sim.bubble, rel=1e-9)
    per_stage = n * costs.activation_bytes
    held = costs.num_layers * costs.param_bytes / 4 * 8
    assert p.memory_bytes == pytest.approx(held + max(sim.peak_activations) * per_stage)


@pytest.mark.parametrize("name", ["1f1b", "zbv", "interleaved-1f1b"])
def test_run_linked_uniform_transfer_equals_simulate(name):
    rng = random.Random(f"u{name}")
    schedule = get_builder(name, 4 * _cluster_model._stages_per_rank(name), ranks=4).build(6)
    t = rng.uniform(0.1, 1.0)
    costs = Costs(forward=rng.uniform(0.5, 1), backward=rng.uniform(1, 2), transfer=t)
    runs = _cluster_model.run_linked(schedule, costs, [[t] * 4 for _ in range(4)])
    sim = simulate(schedule, costs)
    assert [(r.rank, r.start, r.end) for r in sim.timeline] == [(r, s, e) for r, _, s, e in runs]


def test_run_linked_per_edge_transfers_lie_between_uniform_extremes():
    rng = random.Random(4)
    for name in ("1f1b", "zb-h1", "zbv"):
        schedule = get_builder(name, 4 * _cluster_model._stages_per_rank(name), ranks=4).build(8)
        costs = Costs(forward=rng.uniform(0.5, 1), backward=rng.uniform(1, 2))
        matrix = [[rng.uniform(0.1, 2.0) for _ in range(4)] for _ in range(4)]
        low = min(min(row) for row in matrix)
        high = max(max(row) for row in matrix)
        span = max(e for *_, e in _cluster_model.run_linked(schedule, costs, matrix))
        lo = simulate(schedule, dataclasses.replace(costs, transfer=low)).makespan
        hi = simulate(schedule, dataclasses.replace(costs, transfer=high)).makespan
        assert lo <= span <= hi and lo < hi


def test_predict_more_bandwidth_is_never_slower():
    rng = random.Random(5)
    costs = _costs(rng)
    layouts = [
        Layout(dp=8),
        Layout(dp=8, fsdp=True),
        Layout(tp=2, dp=4),
        Layout(tp=4, dp=2, fsdp=True),
        Layout(pp=2, dp=4, schedule="1f1b", order="tp-dp-pp"),
        Layout(tp=2, pp=4, schedule="zbv"),
        Layout(pp=4, dp=2, schedule="interleaved-1f1b", order="tp-pp-dp"),
    ]
    for _ in range(3):
        cluster = _cluster_of(rng, 2, 4)
        for layout in layouts:
            base = predict(layout, costs, cluster, overlap=0.3).step_s
            for factor in (1.5, 4.0):
                for kw in ("intra", "inter"):
                    bw = getattr(cluster, kw).bandwidth * factor
                    faster = cluster.with_bandwidth(**{kw: bw})
                    step = predict(layout, costs, faster, overlap=0.3).step_s
                    assert step <= base * (1 + 1e-12), (layout, kw, factor)
    slow, fast = _cluster_of(random.Random(6), 2, 4), None
    fast = slow.with_bandwidth(inter=slow.inter.bandwidth * 8, intra=slow.intra.bandwidth * 2)
    for a, b in zip(
        what_if(costs, slow, schedules=("1f1b",)).rows,
        what_if(costs, fast, schedules=("1f1b",)).rows,
        strict=True,
    ):
        for family, p in a.best.items():
            if p is not None:
                assert b.best[family].step_s <= p.step_s * (1 + 1e-12)


def test_measured_collectives_scale_predicted_communication():
    rng = random.Random(7)
    cluster = _cluster_of(rng, 2, 4)
    base = _costs(rng)
    slow = all_reduce_time(1e9, 16, cluster.inter) * 3.0
    costs = dataclasses.replace(
        base, collectives=(_cluster.Collective("all_reduce", 1e9, 16, slow),)
    )
    assert _cluster.collective_scales(costs, cluster) == pytest.approx((1.0, 3.0))
    layout = Layout(dp=8)
    compute = 2 * base.num_layers * (base.forward_s + base.backward_s)
    comm = predict(layout, base, cluster).step_s - compute
    assert predict(layout, costs, cluster).step_s - compute == pytest.approx(3 * comm, rel=1e-9)


def test_what_if_picks_fitting_layouts_and_the_first_pp_win_as_crossover():
    rng = random.Random(8)
    costs = _costs(rng, global_batch=32)
    cluster = _cluster_of(rng, 4, 4)
    result = what_if(costs, cluster, schedules=("1f1b", "zbv"), overlap=0.5)
    assert [row.gpus for row in result.rows] == [8, 16]
    first = None
    for row in result.rows:
        for family, best in row.best.items():
            tried = [
                predict(x, costs, cluster, overlap=0.5)
                for x in _cluster_model.candidate_layouts(
                    row.gpus, costs, cluster, schedules=("1f1b", "zbv")
                )
                if x.family == family
            ]
            fitting = [p.step_s for p in tried if p.fits]
            assert (best is None) == (not fitting)
            if fitting:
                assert best.step_s == pytest.approx(min(fitting), rel=1e-12)
        spmd, pp = row.best_spmd, row.best["pp"]
        if first is None and pp is not None and (spmd is None or pp.step_s < spmd.step_s):
            first = row.gpus
    assert result.crossover == first


def test_what_if_memory_limit_leaves_replicated_dp_out():
    rng = random.Random(9)
    costs = _costs(rng)
    tight = dataclasses.replace(costs, gpu_bytes=costs.total_param_bytes * 8 * 0.9)
    result = what_if(tight, _cluster_of(rng, 1, 8), schedules=("1f1b",))
    row = result.rows[0]
    assert row.best["dp"] is None and row.best["fsdp"] is not None
    assert all(p is None or p.fits for p in row.best.values())
    text = _cluster_model.format_what_if(result)
    assert "nothing fits" in text and "assumptions:" in text and "crossover:" in text


@pytest.mark.parametrize(
    ("layout", "cluster", "match"),
    [
        (dict(dp=16), Cluster(2, 4), r"needs 16 GPUs; the cluster has 8"),
        (dict(tp=8), Cluster(2, 4), r"tp=8 must divide gpus_per_node=4"),
        (dict(dp=3), Cluster(1, 4), r"global_batch=16 does not split over dp=3"),
        (dict(pp=4, schedule="zbv"), Cluster(1, 4), r"has 8 stages but the model has 4 layers"),
    ],
)
def test_predict_impossible_layout_raises_clear_error(layout, cluster, match):
    with pytest.raises(ValueError, match=match):
        predict(Layout(**layout), _cluster.example_costs(), cluster)


def test_layout_bad_values_raise_clear_errors():
    with pytest.raises(ValueError, match=r"Layout tp=0 must be an int >= 1"):
        Layout(tp=0)
    with pytest.raises(ValueError, match=r"pp=2 needs a schedule"):
        Layout(pp=2)
    with pytest.raises(ValueError, match=r"order='pp-tp-dp'"):
        Layout(order="pp-tp-dp")
    with pytest.raises(ValueError, match=r"overlap=1.5 must lie in \[0, 1\]"):
        predict(Layout(), _cluster.example_costs(), Cluster(1, 1), overlap=1.5)
    with pytest.raises(ClusterSpecError, match=r"bandwidth=0 must be a number > 0"):
        Link(0)


def test_predict_pp_transfer_uses_the_link_between_the_two_ranks():
    rng = random.Random(10)
    costs = _costs(rng, global_batch=1)  # one microbatch: F F B B plus one hop each way
    fast, slow = Link(rng.uniform(100e9, 500e9), 3e-6), Link(rng.uniform(5e9, 50e9), 8e-6)
    n = costs.num_layers // 2
    compute = 2 * n * (costs.forward_s + costs.backward_s)
    for cluster, link in ((Cluster(1, 2, fast, slow), fast), (Cluster(2, 1, fast, slow), slow)):
        p = predict(Layout(pp=2, schedule="1f1b"), costs, cluster)
        hop = link.time(costs.boundary_activation_bytes)
        assert p.step_s == pytest.approx(compute + 2 * hop, rel=1e-12)


def test_what_if_skips_schedules_that_refuse_the_microbatch_count():
    rng = random.Random(11)
    costs = _costs(rng, global_batch=8)  # dp 2 leaves 4 microbatches; dualpipev needs 2p-1
    result = what_if(costs, _cluster_of(rng, 1, 8), schedules=("dualpipev",))
    best = result.rows[0].best["pp"]
    assert best is not None and best.microbatches >= 2 * best.layout.pp - 1


def test_what_if_without_a_pp_win_reports_no_crossover():
    rng = random.Random(12)
    costs = _costs(rng, boundary_activation_bytes=1e12)  # every hop and TP all-reduce is slow
    result = what_if(costs, _cluster_of(rng, 2, 4), schedules=("1f1b",))
    assert result.crossover is None
    assert all(row.best_spmd.layout.family in ("dp", "fsdp") for row in result.rows)
    assert "crossover: none" in _cluster_model.format_what_if(result)


def test_predict_lower_latency_is_never_slower():
    rng = random.Random(13)
    costs, cluster = _costs(rng), _cluster_of(rng, 2, 4)
    quicker = dataclasses.replace(
        cluster,
        intra=Link(cluster.intra.bandwidth, cluster.intra.latency / 3),
        inter=Link(cluster.inter.bandwidth, cluster.inter.latency / 3),
    )
    for layout in _cluster_model.candidate_layouts(8, costs, cluster, schedules=("zb-h1", "zbv")):
        slow = predict(layout, costs, cluster, overlap=0.5).step_s
        assert predict(layout, costs, quicker, overlap=0.5).step_s <= slow * (1 + 1e-12), layout


def test_predict_adds_optimizer_time_per_held_param_byte():
    rng = random.Random(14)
    costs = _costs(rng, embedding_param_bytes=0.0)
    rate = rng.uniform(1e-12, 1e-10)
    timed = dataclasses.replace(costs, optimizer_s_per_param_byte=rate)
    cluster = _cluster_of(rng, 1, 4)
    layers = costs.num_layers
    for layout, held in (
        (Layout(dp=4), layers * costs.param_bytes),
        (Layout(dp=4, fsdp=True), layers * costs.param_bytes / 4),
        (Layout(tp=2, dp=2), layers * costs.param_bytes / 2),
        (Layout(pp=4, schedule="1f1b"), layers * costs.param_bytes / 4),
    ):
        extra = predict(layout, timed, cluster).step_s - predict(layout, costs, cluster).step_s
        assert extra == pytest.approx(held * rate, rel=1e-9), layout
    data = {**_cluster.example_costs_dict(), "optimizer_s_per_param_byte": rate}
    assert costs_from_dict(data).optimizer_s_per_param_byte == rate


def test_split_layers_moves_layers_off_the_head_stage_only_while_it_helps():
    from jaxpp.schedules._cluster_model import split_layers

    assert split_layers(40, (0, 1, 2, 3)) == (10, 10, 10, 10)
    assert split_layers(40, (0, 1, 2, 3), 0.6) == (10, 10, 10, 10)  # moving one would be worse
    assert split_layers(40, (0, 1, 2, 3), 2.5) == (11, 11, 10, 8)
    # V placement: the last stage shares rank 0 with the first; layers go to rank 1's stages.
    assert split_layers(24, (0, 1, 1, 0), 3.0) == (6, 7, 6, 5)
    assert split_layers(8, (0, 1), 20.0) == (7, 1)  # every stage keeps a layer


def test_head_runs_on_the_last_pipeline_stage_and_is_spread_under_spmd():
    from jaxpp.schedules import _cluster_model

    base = _cluster.example_costs()
    head = dataclasses.replace(base, head_forward_s=0.002, head_backward_s=0.004)
    one = _cluster.Cluster(1, 2)
    # SPMD (dp2): every microbatch pays the head once, on the replica that runs it.
    dp = _cluster_model.Layout(dp=2)
    m = base.global_batch // 2
    step = {c: _cluster_model.predict(dp, c, one).step_s for c in (base, head)}
    extra = step[head] - step[base]
    assert extra == pytest.approx(m * 0.006)
    # PP (1F1B over 2 ranks, 2 layers per stage): the last stage is busier by the head; the
    # balanced split moves a layer off it, the even split (what a measured run used) does not.
    pp = _cluster_model.Layout(pp=2, schedule="1f1b")
    even = _cluster_model.predict(pp, head, one, even_layers=True)
    balanced = _cluster_model.predict(pp, head, one)
    plain = _cluster_model.predict(pp, base, one)
    assert even.step_s > balanced.step_s > plain.step_s
    microbatches = base.global_batch // base.microbatch_size
    assert even.step_s - plain.step_s >= 0.9 * microbatches * 0.006  # the head, every microbatch
