"""The CPU-testable parts of benchmarks/transfer_probe.py (variants, table, medians).

The two-process run itself needs `jaxpp launch` and tens of seconds; it is checked
by hand (runtime/NOTES.md gives the command), not here.
"""

import doctest
import pathlib

import pytest

PROBE = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "transfer_probe.py"


@pytest.fixture(scope="module")
def probe(load_file):
    return load_file("benchmarks/transfer_probe.py")


def test_docstring_examples(probe):
    result = doctest.testmod(probe, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_variant_env_appends_flags_and_keeps_the_rest(probe):
    base = {"XLA_FLAGS": "--xla_foo=1", "PATH": "/bin"}
    env = probe.variant_env(base, "tfrt+nccl-async")
    assert env["XLA_FLAGS"].startswith("--xla_foo=1 ")
    assert "--xla_gpu_nccl_async_execution=true" in env["XLA_FLAGS"]
    assert env["XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT"] == "1"
    assert env["PATH"] == "/bin" and env["TRANSFER_PROBE_VARIANT"] == "tfrt+nccl-async"
    assert base == {"XLA_FLAGS": "--xla_foo=1", "PATH": "/bin"}  # untouched
    assert probe.variant_env({}, "baseline")["XLA_FLAGS"] == ""


def test_format_table_rows_and_failures(probe):
    row = {
        "variant": "baseline",
        "method": "permute",
        "situation": "busy-send",
        "issue_send_ms": 41.5,
        "issue_recv_ms": 0.2,
        "land_ms": 42.0,
        "busy_ms": 40.0,
        "mbytes": 32.0,
        "queue_send_ms": 12.5,
        "queue_recv_ms": 0.0,
    }
    text = probe.format_table([row, {**row, "situation": "idle", "busy_ms": None}], {"x/y": "boom"})
    lines = text.splitlines()
    assert lines[2].split()[:6] == ["baseline", "permute", "busy-send", "41.50", "0.20", "42.00"]
    assert lines[2].split()[7] == "12.5"  # the busy side's queuing time
    assert lines[3].split()[6] == "-"  # no busy time when idle
    assert "FAILED x/y: boom" in text


def test_unknown_variant_is_named(probe):
    with pytest.raises(SystemExit, match="unknown variant 'nope'; valid: baseline"):
        probe.main(["--sweep", "--variants", "nope"])


def test_print_variant_env_round_trips_through_the_shell(probe):
    """pipeline_gpu_run.sh `eval`s these lines for `dist` runs named METHOD@VARIANT."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_foo=1"}
    script = f'eval "$({sys.executable} {PROBE} --print-variant-env tfrt+nccl-async)" && env'
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert lines["XLA_FLAGS"] == f"--xla_foo=1 {probe.NCCL_ASYNC_FLAGS}"
    assert lines["XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT"] == "1"
