"""`launch`: N local processes wired through `jax.distributed` on a loopback coordinator.

For development and for one multi-GPU host. Each child gets `JAXPP_COORDINATOR`,
`JAXPP_NUM_PROCESSES`, `JAXPP_PROCESS_ID` and `JAXPP_TIMEOUT` (read by
`jaxpp.runtime.initialize`), and its devices: `--devices-per-process` virtual CPU
devices, or that many GPUs (`JAXPP_LOCAL_DEVICE_IDS`). Every child runs in its
own process group. When one fails, the others get the watchdog's timeout to stop
on their own (naming the process they lost); whatever still runs then is killed,
group by group, so nothing is left behind. On a cluster, run the same script
under SLURM or Open MPI instead; `initialize` finds its peers there.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from jaxpp.runtime import _coordination

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_ENV_LAUNCHER_PID = "JAXPP_LAUNCHER_PID"


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int | None = None,
    timeout_s: float = _coordination.DEFAULT_TIMEOUT_S,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    prefix_output: bool = True,
) -> int:
    """Runs `command` as `num_processes` local processes of one run; returns the exit code.

    Args:
        command: the program and its arguments, e.g. ("python", "train.py").
        num_processes: processes to start (process ids 0..N-1).
        devices_per_process: devices of each process: virtual CPU devices on a
            machine without NVIDIA GPUs (default 1), else GPUs (default: all GPUs
            split evenly).
        timeout_s: seconds without a heartbeat before a process counts as lost;
            also the grace the others get to stop after one fails.
        port: the coordinator's port (default: a free one).
        env: the environment of the children (default: this process's).
        prefix_output: prefix every output line with "[<process id>]".

    Returns:
        0 if every process succeeded, else the exit code of the first that failed
        (128 + signal number for a signal).

    Raises:
        ValueError: if the arguments are malformed.

    Example:
        >>> import sys
        >>> launch([sys.executable, "-c", "pass"], num_processes=2, prefix_output=False)
        0
    """
    if not command:
        raise ValueError("no command to launch. Fix: e.g. jaxpp launch -n 2 -- python train.py")
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}. Fix: -n 2.")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(
            f"devices_per_process must be at least 1, got {devices_per_process}. "
            f"Fix: --devices-per-process 1."
        )
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}. Fix: --timeout 30.")
    port = port or _free_port()
    base = dict(os.environ if env is None else env)
    gpus = _nvidia_gpus()
    children: list[subprocess.Popen] = []
    lock = threading.Lock()
    readers = []
    restore = _exit_on_sigterm()
    try:
        for i in range(num_processes):
            child_env = _child_env(
                base, i, num_processes, port, timeout_s, devices_per_process, gpus
            )
            child = subprocess.Popen(
                list(command),
                env=child_env,
                start_new_session=True,
                stdout=subprocess.PIPE if prefix_output else None,
                stderr=subprocess.STDOUT if prefix_output else None,
            )
            children.append(child)
            if prefix_output:
                reader = threading.Thread(target=_relay, args=(child, i, lock), daemon=True)
                reader.start()
                readers.append(reader)
        code = _supervise(children, grace_s=1.2 * timeout_s + 2)
    finally:
        _kill_all(children)
        for reader in readers:
            reader.join(timeout=2)
        restore()
    return code


def _exit_on_sigterm():
    """SIGTERM ends the launcher through `finally` (which kills the children)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _child_env(base, i, n, port, timeout_s, devices_per_process, gpus) -> dict[str, str]:
    env = dict(base)
    env[_coordination._ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[_coordination._ENV_NUM_PROCESSES] = str(n)
    env[_coordination._ENV_PROCESS_ID] = str(i)
    env[_coordination._ENV_TIMEOUT] = f"{timeout_s:g}"
    env[_ENV_LAUNCHER_PID] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    if gpus and env.get("JAX_PLATFORMS", "") in ("", "cuda", "gpu"):
        per = devices_per_process or max(1, gpus // n)
        if per * n > gpus:
            raise ValueError(
                f"{n} processes x {per} GPUs need {per * n} GPUs but this machine has {gpus}. "
                f"Fix: fewer processes, or --devices-per-process {max(1, gpus // n)}."
            )
        env[_coordination._ENV_LOCAL_DEVICE_IDS] = ",".join(
            str(g) for g in range(i * per, (i + 1) * per)
        )
        return env
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = re.sub(rf"{_DEVICE_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={devices_per_process or 1}".strip()
    return env


def _supervise(children: list[subprocess.Popen], *, grace_s: float) -> int:
    """Waits for the children; after the first failure, gives the rest `grace_s`."""
    first: tuple[int, int] | None = None
    deadline = None
    while True:
        running = 0
        for i, child in enumerate(children):
            code = child.poll()
            if code is None:
                running += 1
            elif code != 0 and first is None:
                first = (i, code)
                deadline = time.monotonic() + grace_s
                sys.stderr.write(
                    f"jaxpp launch: process {i} (pid {child.pid}) {_describe_exit(code)}; "
                    f"the other processes get {grace_s:g} s to stop.\n"
                )
                sys.stderr.flush()
        if running == 0:
            break
        if deadline is not None and time.monotonic() > deadline:
            left = [i for i, c in enumerate(children) if c.poll() is None]
            sys.stderr.write(
                f"jaxpp launch: processes {left} still run {grace_s:g} s after process "
                f"{first[0]} failed; killing them.\n"
            )
            break
        time.sleep(0.05)
    if first is None:
        return 0
    code = first[1]
    return 128 - code if code < 0 else code


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _kill_all(children: list[subprocess.Popen]) -> None:
    """Kills each child's whole process group (children of children included)."""
    for child in children:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for child in children:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _relay(child: subprocess.Popen, index: int, lock: threading.Lock) -> None:
    for raw in iter(child.stdout.readline, b""):
        line = raw.decode(errors="replace")
        with lock:
            sys.stdout.write(f"[{index}] {line}")
            sys.stdout.flush()
    child.stdout.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nvidia_gpus(dev: pathlib.Path = pathlib.Path("/dev"), env=os.environ) -> int:
    """NVIDIA GPUs this process may use: the device nodes, cut to CUDA_VISIBLE_DEVICES."""
    present = sum(1 for p in dev.glob("nvidia[0-9]*"))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    return min(present, len([d for d in visible.split(",") if d.strip()]))
