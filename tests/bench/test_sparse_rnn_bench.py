"""benchmarks/sparse_rnn_bench.py's sweep order, on CPU (the timings themselves need a GPU)."""

import pytest


@pytest.fixture
def bench(load_file):
    return load_file("benchmarks/sparse_rnn_bench.py")


def _swept(bench, monkeypatch, **kwargs):
    calls = []

    def record(log, results, hidden, batch, density, cell, *, backward, variants, baselines):
        calls.append((cell, hidden, batch, density, backward, baselines))

    monkeypatch.setattr(bench, "_sparse_case", record)
    bench.run_sweep(lambda msg: None, [], {"name": "default"}, budget_s=60.0, **kwargs)
    return calls


def test_the_sweep_measures_the_bar_cases_first_with_their_baselines(bench, monkeypatch):
    calls = _swept(bench, monkeypatch, cells=("lstm",), batches=(4,))
    assert calls[0] == ("lstm", 2304, 4, 0.3, False, ("dense", "cudnn", "bcoo"))
    assert calls[1] == ("lstm", 2304, 4, 0.3, True, ("dense", "cudnn"))  # forward+backward
    assert calls[2][:5] == ("lstm", 4096, 4, 0.1, False)
    cases = [c[:4] for c in calls if not c[4]]
    assert len(cases) == len(set(cases))  # each case once, bar cases not repeated
    assert ("lstm", 4096, 4, 0.3) not in cases  # over the on-chip capacity: no launch


def test_filling_gaps_skips_the_bar_cases_and_follows_the_given_order(bench, monkeypatch):
    calls = _swept(
        bench, monkeypatch, cells=("lstm",), batches=(1, 16), hiddens=(1152, 4096), bar_first=False
    )
    order = [c[:4] for c in calls]
    assert order[:3] == [("lstm", 1152, 1, d) for d in (0.3, 0.1, 0.05)]
    assert {c[2] for c in calls} == {1, 16} and {c[1] for c in calls} == {1152, 4096}
    assert calls[0][5] == ("dense", "cudnn") and calls[1][5] == ()  # baselines once per size
