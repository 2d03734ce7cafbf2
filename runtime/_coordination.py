"""Joining a multi-process run on `jax.distributed`, and noticing when a peer is lost.

`initialize` wires this process into the run: from explicit arguments, from the
`JAXPP_*` variables that `jaxpp launch` (or a Kubernetes pod spec) sets, or from
JAX's own detection of SLURM and Open MPI. It checks that the coordinator can be
reached (a clear error instead of a hang), selects gloo for CPU collectives, and
starts a watchdog: every process bumps a counter in the coordination service's
key-value store; a process whose counter stops moving for `timeout_s` (dead,
stopped, or cut off), or a coordinator that stops answering, makes every other
process print which process, host and stage ranks it lost and exit with
`LOST_PEER_EXIT_CODE`.

Module state, per process like `jax.distributed` itself: the watchdog (set by
`initialize`, an entry point) and a counter that numbers executors in creation order.
"""

import atexit
import dataclasses
import itertools
import json
import os
import socket
import sys
import threading
import time

import jax

#: Exit status of a process that stops because it lost a peer.
LOST_PEER_EXIT_CODE = 3
#: Default seconds without a heartbeat before a peer counts as lost.
DEFAULT_TIMEOUT_S = 30.0
# How long a process waits for a live peer to reach the same point of a step: the first
# step compiles every task, which for a large model on GPUs takes minutes.
DEFAULT_PROGRESS_TIMEOUT_S = 900.0

_ENV_COORDINATOR = "JAXPP_COORDINATOR"
_ENV_NUM_PROCESSES = "JAXPP_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAXPP_PROCESS_ID"
_ENV_LOCAL_DEVICE_IDS = "JAXPP_LOCAL_DEVICE_IDS"
_ENV_TIMEOUT = "JAXPP_TIMEOUT"
_ENV_PROGRESS_TIMEOUT = "JAXPP_PROGRESS_TIMEOUT"


class CoordinatorUnreachableError(ConnectionError):
    """The `jax.distributed` coordinator did not answer at start."""


class PeerLostError(RuntimeError):
    """Another process of the run stopped answering."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessInfo:
    """Where a process of the run lives."""

    index: int
    host: str
    pid: int


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: tuple[int, ...] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Joins this process to a multi-process run and starts the peer watchdog.

    Arguments left None come from `JAXPP_COORDINATOR`, `JAXPP_NUM_PROCESSES`,
    `JAXPP_PROCESS_ID` (or `JOB_COMPLETION_INDEX` of a Kubernetes indexed Job),
    `JAXPP_LOCAL_DEVICE_IDS` and `JAXPP_TIMEOUT`; if those are unset too, JAX
    detects SLURM or Open MPI itself. With a single process and nothing set, it
    does nothing.

    Args:
        coordinator_address: "host:port" of process 0's coordination service.
        num_processes: processes in the run.
        process_id: this process's index.
        local_device_ids: the local accelerators this process uses.
        timeout_s: seconds to wait for the coordinator at start, and without a
            heartbeat before a peer counts as lost (default 30).

    Raises:
        CoordinatorUnreachableError: if the coordinator does not answer in time.
        ValueError: if the settings are malformed.

    Example:
        >>> initialize()  # one process, nothing configured: a no-op
        >>> jax.process_count()
        1
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get(_ENV_COORDINATOR) or None
    if num_processes is None and env.get(_ENV_NUM_PROCESSES):
        num_processes = _int_env(_ENV_NUM_PROCESSES)
    if process_id is None:
        if env.get(_ENV_PROCESS_ID):
            process_id = _int_env(_ENV_PROCESS_ID)
        elif env.get("JOB_COMPLETION_INDEX") and coordinator_address:
            process_id = _int_env("JOB_COMPLETION_INDEX")
    if local_device_ids is None and env.get(_ENV_LOCAL_DEVICE_IDS):
        local_device_ids = tuple(int(i) for i in env[_ENV_LOCAL_DEVICE_IDS].split(","))
    if timeout_s is None:
        timeout_s = float(env.get(_ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}. Fix: e.g. timeout_s=30.")
    from jax._src import distributed

    if distributed.global_state.client is not None:  # the program initialized it itself
        _start_watchdog(timeout_s)
        return
    configured = coordinator_address is not None or _in_cluster(env)
    if not configured:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} but no coordinator address is set and no "
                f"SLURM or Open MPI job was found. Fix: pass coordinator_address='host:port' "
                f"(process 0's host), set JAXPP_COORDINATOR, or start with jaxpp launch."
            )
        return
    if coordinator_address is not None and process_id not in (None, 0):
        _wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # If some process never joins, JAX aborts this one when its timeout ends (no Python
    # exception); say first what was missing and how to fix it.
    warning = threading.Timer(
        0.9 * timeout_s,
        _warn_not_joined,
        args=(coordinator_address, num_processes, process_id, timeout_s),
    )
    warning.daemon = True
    warning.start()
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
            initialization_timeout=max(1, int(timeout_s)),
            # JAX's own heartbeat only backs up the watchdog, which names the peer.
            heartbeat_timeout_seconds=int(2 * timeout_s + 10),
            shutdown_timeout_seconds=max(1, int(timeout_s)),
        )
    except Exception as error:  # jax raises its runtime error type; name the fix
        raise CoordinatorUnreachableError(
            f"jax.distributed.initialize failed for process {process_id} of {num_processes} "
            f"with coordinator {coordinator_address!r} (timeout {timeout_s} s): {error}. Fix: "
            f"start every process of the run, with the same coordinator address and process "
            f"count, and distinct process ids."
        ) from error
    finally:
        warning.cancel()
    _start_watchdog(timeout_s)


def _warn_not_joined(address, num_processes, process_id, timeout_s: float) -> None:
    sys.stderr.write(
        f"jaxpp: process {process_id} of {num_processes}: not every process joined the run "
        f"at coordinator {address} within {timeout_s:g} s; JAX will stop this process. Fix: "
        f"start all {num_processes} processes (ids 0..{(num_processes or 1) - 1}) with the "
        f"same coordinator address, or raise the timeout (JAXPP_TIMEOUT).\n"
    )
    sys.stderr.flush()


def _in_cluster(env) -> bool:
    return "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env or "OMPI_COMM_WORLD_SIZE" in env


def _int_env(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer. Fix: e.g. {name}=0.") from None


def _wait_for_coordinator(address: str, timeout_s: float, process_id, num_processes) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"coordinator address {address!r} is not host:port. Fix: e.g. 10.0.0.1:1234."
        )
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as error:
            last_error = error
            time.sleep(0.2)
    raise CoordinatorUnreachableError(
        f"cannot reach the jax.distributed coordinator at {address} within {timeout_s:g} s "
        f"(process {process_id} of {num_processes}; last error: {last_error}). Fix: start "
        f"process 0 (it runs the coordinator), check the host and port and that the "
        f"network allows them, or raise the timeout (JAXPP_TIMEOUT)."
    )


def _client():
    from jax._src import distributed  # the client jax.distributed.initialize made

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            "jax.distributed is not initialized. Fix: call jaxpp.runtime.initialize() at the "
            "start of every process (jaxpp launch sets what it needs)."
        )
    return client


def kv_set(key: str, value: str) -> None:
    """Stores a string in the coordination service (visible to every process)."""
    _client().key_value_set(key, value, allow_overwrite=True)


def kv_get(key: str, *, waiting_for: str) -> str:
    """Reads a string another process stores, waiting while that process is alive.

    A live peer may take long to get there (the first step compiles its tasks); a dead
    one is caught by the watchdog's heartbeats, which stop this process within their
    timeout. So the wait is bounded by `JAXPP_PROGRESS_TIMEOUT` (default 900 s), checked
    in slices of the heartbeat timeout. Without a watchdog it waits one heartbeat timeout.
    """
    heartbeat_s = _WATCHDOG.timeout_s if _WATCHDOG is not None else DEFAULT_TIMEOUT_S
    limit_s = progress_timeout_s() if _WATCHDOG is not None else heartbeat_s
    start = time.monotonic()
    while True:
        left_s = limit_s - (time.monotonic() - start)
        try:
            return _client().blocking_key_value_get(
                key, max(1, int(min(heartbeat_s, left_s) * 1000))
            )
        except Exception as error:
            waited_s = time.monotonic() - start
            if "DEADLINE_EXCEEDED" in str(error) and waited_s < limit_s:
                continue  # the watchdog has not lost anyone: the peer is still on its way
            raise PeerLostError(
                f"waited {waited_s:.0f} s for {waiting_for} (key {key!r}) and it never came: "
                f"{error}. Fix: check that every process runs the same step with the same "
                f"inputs; if the peers are alive but slow (compiling), raise "
                f"{_ENV_PROGRESS_TIMEOUT} (now {limit_s:g} s)."
            ) from error


def progress_timeout_s() -> float:
    """Seconds a process waits for a live peer: `JAXPP_PROGRESS_TIMEOUT` or 900.

    Example:
        >>> progress_timeout_s() > 0
        True
    """
    text = os.environ.get(_ENV_PROGRESS_TIMEOUT)
    if not text:
        return DEFAULT_PROGRESS_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(
            f"{_ENV_PROGRESS_TIMEOUT}={text!r} is not a positive number of seconds. "
            f"Fix: e.g. {_ENV_PROGRESS_TIMEOUT}=1800."
        )
    return value


class _Watchdog:
    """Heartbeats through the key-value store; exits the process when a peer is lost."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.me = jax.process_index()
        self.count = jax.process_count()
        self.interval = min(1.0, timeout_s / 10)
        self.peers: dict[int, ProcessInfo] = {}
        self.ranks: dict[int, tuple[int, ...]] = {}
        self._seen: dict[int, tuple[str, float]] = {}
        self._last_ok = time.monotonic()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        client = _client()
        info = ProcessInfo(self.me, socket.gethostname(), os.getpid())
        client.key_value_set(f"jaxpp/who/{self.me}", json.dumps(dataclasses.asdict(info)), True)
        for p in range(self.count):
            text = client.blocking_key_value_get(f"jaxpp/who/{p}", int(self.timeout_s * 1000))
            self.peers[p] = ProcessInfo(**json.loads(text))
        now = time.monotonic()
        self._seen = {p: ("", now) for p in range(self.count) if p != self.me}
        self._threads = [
            threading.Thread(target=self._beat, name="jaxpp-heartbeat", daemon=True),
            threading.Thread(target=self._judge, name="jaxpp-watchdog", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stops both threads and waits for them (at exit, after JAX's shutdown).

        A daemon thread still inside a client call when the interpreter finalizes is
        ended by `pthread_exit` in C++ frames that swallow the unwind: the process then
        aborts ("FATAL: exception not rethrown") after the program has finished.
        """
        self._stopping.set()
        limit_s = 10 * self.interval + 5
        for thread in self._threads:
            thread.join(timeout=limit_s)
            if thread.is_alive():
                sys.stderr.write(
                    f"jaxpp: the {thread.name} thread did not stop within "
                    f"{limit_s:g} s at exit (a coordination-service call "
                    f"hangs); the process may abort as it ends.\n"
                )

    def _beat(self) -> None:
        client = _client()
        beat = 0
        while not self._stopping.is_set():
            beat += 1
            try:
                client.key_value_set(f"jaxpp/alive/{self.me}", str(beat), True)
                entries = client.key_value_dir_get("jaxpp/alive/")
            except Exception:  # the coordinator is gone or stuck; the judge decides
                self._stopping.wait(self.interval)
                continue
            now = time.monotonic()
            with self._lock:
                self._last_ok = now
                for key, value in entries:
                    p = int(key.rsplit("/", 1)[1])
                    if p != self.me and self._seen.get(p, ("", now))[0] != value:
                        self._seen[p] = (value, now)
            self._stopping.wait(self.interval)

    def _judge(self) -> None:
        launcher = os.environ.get("JAXPP_LAUNCHER_PID")
        while not self._stopping.wait(self.interval):
            if launcher and str(os.getppid()) != launcher:
                self._exit(f"the launcher (pid {launcher}) is gone")
            now = time.monotonic()
            with self._lock:
                if now - self._last_ok > self.timeout_s:
                    self._lost(0, now - self._last_ok, "the coordinator stopped answering")
                for p, (_, seen) in self._seen.items():
                    if now - seen > self.timeout_s:
                        self._lost(p, now - seen, "no heartbeat")

    def describe(self, p: int) -> str:
        info = self.peers.get(p)
        where = f"host {info.host}, pid {info.pid}" if info else "host unknown"
        ranks = self.ranks.get(p)
        if ranks is not None:
            where += f", stage ranks {', '.join(map(str, ranks)) or 'none'}"
        return f"process {p} ({where})"

    def _lost(self, p: int, seconds: float, why: str) -> None:
        self._exit(
            f"lost {self.describe(p)}: {why} for {seconds:.1f} s (timeout {self.timeout_s:g} s)"
        )

    def _exit(self, reason: str) -> None:
        sys.stderr.write(
            f"jaxpp: {reason}. Stopping {self.describe(self.me)} with exit code "
            f"{LOST_PEER_EXIT_CODE}.\n"
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(LOST_PEER_EXIT_CODE)


_WATCHDOG: _Watchdog | None = None
_EXECUTOR_IDS = itertools.count()


def next_executor_id() -> int:
    """A number for a new executor: every process creates its executors in the same
    order (they compile the same steps in the same order), so the numbers agree."""
    return next(_EXECUTOR_IDS)


def _start_watchdog(timeout_s: float) -> None:
    global _WATCHDOG
    if _WATCHDOG is not None:
        return
    watchdog = _Watchdog(timeout_s)
    watchdog.start()
    _WATCHDOG = watchdog
    # Registered after jax.distributed.initialize's, so it runs first.
    atexit.register(_shut_down, watchdog)
    previous = sys.excepthook

    def excepthook(kind, value, traceback) -> None:
        # A collective that failed because a peer died: let the watchdog name the
        # peer before JAX's own shutdown (which would wait for that peer) runs.
        previous(kind, value, traceback)
        if failed_collective(value):
            wait_for_verdict(value)

    sys.excepthook = excepthook


def _shut_down(watchdog: _Watchdog) -> None:
    """At exit: JAX's shutdown (a barrier of every process) while the watchdog still
    names a peer lost on the way, then the watchdog's threads stopped (`_Watchdog.stop`)."""
    try:
        jax.distributed.shutdown()
    finally:
        watchdog.stop()


def describe_ranks(processes_of_rank: tuple[frozenset[int], ...]) -> None:
    """Tells the watchdog which stage ranks each process owns (for its error messages)."""
    if _WATCHDOG is None:
        return
    ranks: dict[int, list[int]] = {}
    for r, processes in enumerate(processes_of_rank):
        for p in processes:
            ranks.setdefault(p, []).append(r)
    with _WATCHDOG._lock:
        _WATCHDOG.ranks = {p: tuple(v) for p, v in ranks.items()}


def failed_collective(error: BaseException) -> bool:
    """Whether `error` may come from a collective whose peer went away.

    XLA raises a runtime error, or (when the collective ran while it was being
    dispatched) a ValueError carrying the same text.

    Example:
        >>> failed_collective(ValueError("UNKNOWN: Gloo collective permute failed"))
        True
        >>> failed_collective(ValueError("bad shape"))
        False
    """
    if isinstance(error, jax.errors.JaxRuntimeError):
        return True
    text = str(error).lower()
    return any(word in text for word in ("collective", "gloo", "nccl", "connection closed"))


def wait_for_verdict(error: BaseException) -> None:
    """After a failed collective: give the watchdog time to name the lost peer.

    Returns (so the caller re-raises `error`) if no peer is found lost in that time.
    """
    if _WATCHDOG is None:
        return
    time.sleep(_WATCHDOG.timeout_s + 3 * _WATCHDOG.interval)
