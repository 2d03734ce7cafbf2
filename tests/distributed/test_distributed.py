"""Multi-process runs over gloo: the pipelined step equals jax.jit; faults stop every process.

Each multi-process test starts `jaxpp launch` (which starts the workers in
`distributed_worker.py`) with a hard timeout; on failure the launcher and, through
it, every worker is killed, so nothing is left running.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpp import cli, runtime

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]
# The workers compile many small tasks on 2 cores; the reference uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _launch(cases, *, processes, devices=1, timeout_s=20.0, hard_timeout_s=150.0):
    """Runs the worker cases under `jaxpp launch`; returns (exit code, output, seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = FAST_COMPILE  # the launcher adds the device count
    env["JAXPP_ASYNC_TRANSFERS"] = "1"  # the opt-in transfer thread; "1f1b-inline" the default
    command = [
        sys.executable,
        "-m",
        "jaxpp.cli",
        "launch",
        "-n",
        str(processes),
        "--devices-per-process",
        str(devices),
        "--timeout",
        f"{timeout_s:g}",
        "--",
        sys.executable,
        str(WORKER),
        *cases,
    ]
    start = time.monotonic()
    launcher = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = launcher.communicate(timeout=hard_timeout_s)
    except subprocess.TimeoutExpired:
        launcher.send_signal(signal.SIGTERM)  # the launcher kills its workers on SIGTERM
        try:
            out, _ = launcher.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            out, _ = launcher.communicate()
        pytest.fail(f"jaxpp launch ran past {hard_timeout_s} s:\n{_tail(out)}")
    return launcher.returncode, out.decode(errors="replace"), time.monotonic() - start


def _tail(out, lines=60) -> str:
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    return "\n".join(text.splitlines()[-lines:])


def _assert_passed(out: str, names, processes) -> None:
    for name in names:
        assert f"[0] CHECKED {name} against jax.jit" in out, f"{name}:\n{_tail(out)}"
        for p in range(processes):
            assert f"PASS {name} (process {p})" in out, f"{name} on process {p}:\n{_tail(out)}"


def test_distributed_four_processes_every_schedule_and_spanning_stage_match_jit():
    code, out, _ = _launch(["schedules4", "spanning4"], processes=4)
    assert code == 0, _tail(out)
    names = ("1f1b", "interleaved", "zb-h1", "dualpipev", "spanning-1f1b", "spanning-zb-h1")
    _assert_passed(out, (*names, "1f1b-inline"), 4)
    # One process per rank: transfers on the transfer thread when asked; a rank
    # spanning processes keeps them in line (its own collectives share the order).
    for name, how in (("1f1b", "async"), ("1f1b-inline", "inline"), ("spanning-1f1b", "inline")):
        assert f"[0] TRANSFERS {name} {how}" in out, f"{name}:\n{_tail(out)}"


def test_distributed_two_processes_other_schedules_and_split_ranks_match_jit():
    code, out, _ = _launch(["mixed2"], processes=2, devices=2)
    assert code == 0, _tail(out)
    names = ("two-ranks-per-process-1f1b", "same-plan-other-shapes", "split-ranks-tp-1f1b")
    _assert_passed(out, (*names, "gpipe", "eager1f1b", "loopedbfs", "zb-h2", "zbv"), 2)


def test_distributed_killed_process_stops_others_with_named_error():
    timeout_s = 3.0
    code, out, _ = _launch(["kill"], processes=2, timeout_s=timeout_s, hard_timeout_s=90)
    # A mesh one rank larger than the run: a clear error in every process.
    assert re.search(r"PASS badcount: the pipeline needs 3 ranks x 1 devices = 3 devices", out)
    assert "launch 3 devices in all, e.g. jaxpp launch -n 3" in out
    pids = [int(p) for p in re.findall(r"READY pid (\d+)", out)]
    assert len(pids) == 2, _tail(out)
    assert code != 0
    assert "process 1 (pid" in out and "was killed by SIGKILL" in out, _tail(out)
    lost = re.search(r"\[0\] jaxpp: lost process 1 \(host (\S+), pid (\d+), stage ranks 1\)", out)
    assert lost, _tail(out)
    assert lost.group(1) == socket.gethostname() and int(lost.group(2)) in pids
    seconds = float(re.search(r"for ([\d.]+) s \(timeout 3 s\)", out).group(1))
    assert timeout_s <= seconds < timeout_s + 10  # bounded; slack for a loaded 2-core CI machine
    assert f"exit code {runtime.LOST_PEER_EXIT_CODE}" in out
    for pid in pids:  # no orphans
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_distributed_live_but_slow_peer_is_waited_for_then_times_out_by_name(monkeypatch):
    # A peer alive but late (compiling) is waited for past the heartbeat timeout; a key
    # that never comes fails after JAXPP_PROGRESS_TIMEOUT, naming what it waited for.
    monkeypatch.setenv("JAXPP_PROGRESS_TIMEOUT", "8")
    code, out, _ = _launch(["slowpeer"], processes=2, timeout_s=2.0, hard_timeout_s=90)
    assert code == 0, _tail(out)
    assert "PASS slowpeer (process 0)" in out and "PASS slowpeer (process 1)" in out
    never = re.search(r"PASS never \(([\d.]+) s\): waited \d+ s for a key nobody sets", out)
    assert never, _tail(out)
    assert 8 <= float(never.group(1)) < 18
    assert "raise JAXPP_PROGRESS_TIMEOUT (now 8 s)" in out


def test_distributed_stopped_process_is_named_and_killed():
    timeout_s = 3.0
    code, out, _ = _launch(["stall"], processes=2, timeout_s=timeout_s, hard_timeout_s=90)
    pids = [int(p) for p in re.findall(r"READY pid (\d+)", out)]
    assert len(pids) == 2, _tail(out)
    assert code == runtime.LOST_PEER_EXIT_CODE, _tail(out)
    assert re.search(
        r"\[0\] jaxpp: lost process 1 \(host \S+, pid \d+, stage ranks 1\): "
        r"no heartbeat for [\d.]+ s \(timeout 3 s\)",
        out,
    ), _tail(out)
    assert "still run" in out  # the stopped process did not exit; the launcher killed it
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_distributed_exit_while_heartbeat_is_in_a_client_call_is_clean():
    # A daemon thread inside a C++ client call at interpreter exit is ended by
    # pthread_exit, which aborted the process ("FATAL: exception not rethrown", SIGABRT)
    # in every such run before the watchdog stopped its threads at exit.
    for _ in range(2):
        code, out, _ = _launch(["busyexit"], processes=2, hard_timeout_s=90)
        assert code == 0, _tail(out)
        assert "exception not rethrown" not in out, _tail(out)
        assert "PASS busyexit (process 0)" in out and "PASS busyexit (process 1)" in out


def test_launch_counts_only_visible_gpus(tmp_path):
    from jaxpp.runtime import _launch

    for i in range(4):
        (tmp_path / f"nvidia{i}").touch()
    (tmp_path / "nvidiactl").touch()
    assert _launch._nvidia_gpus(tmp_path, {}) == 4
    assert _launch._nvidia_gpus(tmp_path, {"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert _launch._nvidia_gpus(tmp_path, {"CUDA_VISIBLE_DEVICES": ""}) == 0
    env = _launch._child_env({}, 1, 2, 1234, 30.0, None, 2)  # 2 visible GPUs, 2 processes
    assert env["JAXPP_LOCAL_DEVICE_IDS"] == "1"


def test_launch_failed_process_stops_the_others_and_returns_its_code():
    script = (
        "import os, sys, time\n"
        "if os.environ['JAXPP_PROCESS_ID'] == '1': sys.exit(5)\n"
        "print(os.getpid(), flush=True); time.sleep(60)\n"
    )
    start = time.monotonic()
    code = runtime.launch([sys.executable, "-c", script], num_processes=2, timeout_s=0.5)
    assert code == 5
    assert time.monotonic() - start < 20  # the sleeper was killed after the grace


def test_launch_cli_missing_program_is_an_error(capsys):
    code = cli.main(["launch", "-n", "1", "--", "/nonexistent/program"])
    assert code == 2
    assert "jaxpp launch: error:" in capsys.readouterr().out


def test_launch_sets_the_process_environment(capfd):
    script = (
        "import os\n"
        "print(os.environ['JAXPP_PROCESS_ID'], os.environ['JAXPP_NUM_PROCESSES'],"
        " os.environ['JAXPP_COORDINATOR'], os.environ['XLA_FLAGS'])\n"
    )
    code = runtime.launch(
        [sys.executable, "-c", script], num_processes=2, devices_per_process=3, port=12345
    )
    assert code == 0
    out = capfd.readouterr().out
    for p in range(2):
        assert (
            f"[{p}] {p} 2 127.0.0.1:12345 " in out
            and "--xla_force_host_platform_device_count=3" in out
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"command": ()}, "no command to launch", id="no-command"),
        pytest.param({"num_processes": 0}, "num_processes must be at least 1", id="zero"),
        pytest.param({"devices_per_process": 0}, "devices_per_process must be", id="devices"),
        pytest.param({"timeout_s": 0}, "timeout_s must be positive", id="timeout"),
    ],
)
def test_launch_bad_arguments_raise(kwargs, match):
    args = {"command": (sys.executable, "-c", "pass"), "num_processes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        runtime.launch(args.pop("command"), **args)


def test_initialize_unreachable_coordinator_raises_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nobody listens there
    start = time.monotonic()
    with pytest.raises(runtime.CoordinatorUnreachableError, match=r"cannot reach .* 127\.0\.0\.1"):
        runtime.initialize(f"127.0.0.1:{port}", 2, 1, timeout_s=1.0)
    assert time.monotonic() - start < 5
    assert jax.process_count() == 1


def test_initialize_missing_process_stops_with_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from jaxpp import runtime; runtime.initialize('127.0.0.1:{port}', 2, 0, timeout_s=1)"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "process 0 of 2: not every process joined the run at coordinator" in done.stderr
    assert time.monotonic() - start < 30


def test_initialize_malformed_settings_raise(monkeypatch):
    with pytest.raises(ValueError, match="is not host:port"):
        runtime.initialize("nohost", 2, 1, timeout_s=1.0)
    with pytest.raises(ValueError, match="num_processes=2 but no coordinator address"):
        runtime.initialize(num_processes=2, process_id=1)
    monkeypatch.setenv("JAXPP_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAXPP_PROCESS_ID='one' is not an integer"):
        runtime.initialize("127.0.0.1:1", 2, timeout_s=1.0)


def test_stage_mesh_devices_do_not_fit_raises():
    with pytest.raises(
        ValueError, match=r"needs 4 ranks x 2 devices = 8 devices but the run has 6"
    ):
        runtime.stage_mesh(4, {"data": 2}, devices=jax.devices()[:6])


def test_stage_mesh_orders_ranks_by_process():
    mesh = runtime.stage_mesh(2, {"data": 4})
    assert mesh.axis_names == ("stages", "data")
    assert [d.id for d in mesh.devices[1]] == sorted(d.id for d in jax.devices())[4:]


def test_fetch_single_process_returns_numpy_and_rejects_bad_process():
    x = jax.random.normal(jax.random.key(1), (3, 4))
    got = runtime.fetch({"x": x, "n": 2.0})
    np.testing.assert_array_equal(got["x"], np.asarray(x))
    assert runtime.fetch(x, process=0) is not None
    with pytest.raises(ValueError, match="process=3 is not a process of this run"):
        runtime.fetch(x, process=3)


TRAIN_ARGS = (
    "train --stages 2 --steps 3 --layers 2 --d-model 16 --heads 2 --batch-size 8 --seq-len 8 "
    "--microbatches 4 --log-every 1"
).split()


def test_train_two_processes_matches_one_process(capsys):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-m", "jaxpp.cli", *TRAIN_ARGS, "-n", "2", "--timeout", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        start_new_session=True,
    )
    assert done.returncode == 0, _tail(done.stdout + done.stderr)
    assert "[0] jaxpp train: GPT 2 layers" in done.stdout
    assert not re.search(r"^\[1\] (step|jaxpp train)", done.stdout, re.M)  # process 0 reports
    assert cli.main(TRAIN_ARGS) == 0
    single = capsys.readouterr().out

    def steps(text):
        return re.findall(r"step +(\d+)/3 +loss +([\d.]+) .* gnorm +([\d.]+)", text)

    assert len(steps(single)) == 3
    assert steps(done.stdout) == steps(single)
