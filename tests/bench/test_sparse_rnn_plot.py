"""The sparse RNN plot script: the table's ratios come from the rows it is given, and a
call without results says how to call it."""

import json

import pytest


def _write(path, rows):
    env = {"device": "test GPU", "jax": "0.11.2"}
    path.write_text(json.dumps({"environment": env, "results": rows}))
    return str(path)


def test_table_takes_each_methods_fastest_row_and_the_fastest_baseline(load_file, tmp_path):
    plot = load_file("benchmarks/sparse_rnn_plot.py")
    case = dict(cell="lstm", hidden=2304, batch=4, backward=False)
    first = _write(tmp_path / "a.json", [
        {"method": "sparse[default]", "us_per_step": 9.0, "density": 0.3, **case},
        {"method": "dense_scan_bf16", "us_per_step": 18.0, "density": 0.3, **case},
        {"method": "cudnn_lstm_f32", "us_per_step": 36.0, "density": 0.3, **case},
    ])  # fmt: skip
    second = _write(tmp_path / "b.json", [
        {"method": "sparse[default]", "us_per_step": 6.0, "density": 0.3, **case},
        {"method": "sparse[default]", "us_per_step": 4.5, "density": 0.1, **case},
        {"method": "sparse[default]", "error": "exceeds the on-chip capacity", "density": 0.05,
         **case | {"hidden": 8192}},
    ])  # fmt: skip
    _, cases, errors = plot.load([first, second])
    rows = plot.table(cases, errors).splitlines()[2:]
    assert len(rows) == 3
    # 30%: the faster sparse row of the two runs (6.0), against the dense scan (18.0).
    assert "| 30% | fwd | 6.00 | 18.00 | 36.00 | - | 3.00x |" in rows[1]
    # 10%: no baselines at that density; the ones of 30% serve (they do not depend on it).
    assert "| 10% | fwd | 4.50 | 18.00 | 36.00 | - | 4.00x |" in rows[0]
    assert "| 8192 |" in rows[2] and "does not fit" in rows[2]


@pytest.mark.parametrize("args", [(), ("--help",), ("out.png",), ("a.json", "b.json")])
def test_bad_arguments_print_the_usage(load_file, args):
    plot = load_file("benchmarks/sparse_rnn_plot.py")
    with pytest.raises(SystemExit, match="usage: python benchmarks/sparse_rnn_plot.py OUT.png"):
        plot.main(*args)
