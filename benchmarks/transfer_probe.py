"""Probe: host time and landing time of one cross-process array transfer, by method.

Two processes, one device each (process 0 sends, process 1 receives). For each
method the script times, on fresh random arrays (a new one per trial, checked
bit-exact on the receiver):

- `issue`: host time of the call that starts the transfer, in each process;
- `land`: from the sender starting the call to the value being ready on the receiver
  (both processes on one host: `time.monotonic_ns` is one clock);

in three situations: `idle` (both devices idle), `busy-send` (a long matmul chain
queued on the sender just before, independent of the array), `busy-recv` (the
same on the receiver) and `deep-send` (`--deep` separate one-matmul programs queued
on the sender: if queuing them takes host time, PjRt's in-flight pacing holds the
host, whatever the transfer). If a method's `issue` in `busy-*` is about the matmul's time,
its launch waits until the device (or the peer) gets there.

Methods (all issued in the same order by both processes):
- `permute`: what `runtime/_distributed.py` does: jit(shard_map(ppermute)) over a
  2-device pair mesh, the shards stacked along axis 0.
- `device_put`: `jax.device_put(x, NamedSharding(receiver_mesh, P()))` on an array
  committed to the sender's device (cross-host device_put; jax/_src/dispatch.py
  `_DeferredCrossHostTransferArg` -> PjRt CrossHostSendBuffers/ReceiveBuffers). On
  CPU it needs `jax_cross_host_transfer_socket_address`, which this script sets.
- `transfer_server`: `jax.experimental.transfer` (sender `await_pull`, receiver
  `connect(...).pull`), addresses exchanged through the coordination service.

Flags and the PjRt client are fixed when a process starts, so `--sweep` relaunches
the pair once per variant (baseline, NCCL async flags, TFRT GPU client, ...) and
prints one table; under `jaxpp launch` without `--sweep` it measures the current
environment only:

    python benchmarks/transfer_probe.py --sweep --out-dir "$OUT"          # all variants
    python -m jaxpp.cli launch -n 2 -- python benchmarks/transfer_probe.py  # one

On a machine without GPUs it runs tiny arrays over gloo (a smoke test).
"""

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

METHODS = ("permute", "device_put", "transfer_server")
SITUATIONS = ("idle", "busy-send", "busy-recv", "deep-send")
NCCL_ASYNC_FLAGS = "--xla_gpu_nccl_async_execution=true --xla_gpu_nccl_blocking_communicators=false"
# name -> (extra XLA_FLAGS, extra environment)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "baseline": ("", {}),
    "nccl-async": (NCCL_ASYNC_FLAGS, {}),
    "tfrt-client": ("", {"XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT": "1"}),
    "tfrt+nccl-async": (NCCL_ASYNC_FLAGS, {"XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT": "1"}),
    "no-async-permute": ("--xla_gpu_enable_async_collective_permute=false", {}),
}
_PAIR_AXIS = "pair"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.print_variant_env is not None:
        print(shell_exports(variant_env(os.environ, args.print_variant_env), os.environ))
        return 0
    if args.sweep:
        return sweep(args)
    return worker(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="relaunch once per variant")
    parser.add_argument(
        "--print-variant-env",
        choices=sorted(VARIANTS),
        default=None,
        help="print the variant's settings as shell `export` lines (for eval) and exit",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="for --sweep")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"of {','.join(METHODS)} (default: all on GPU; on CPU all but device_put, whose "
        "socket path never delivered in our CPU tries)",
    )
    parser.add_argument("--situations", default=",".join(SITUATIONS))
    parser.add_argument("--mbytes", type=float, default=None, help="array size (32 on GPU)")
    parser.add_argument("--trials", type=int, default=None, help="timed trials (10; 3 on CPU)")
    parser.add_argument("--busy-ms", type=float, default=50.0, help="target matmul-chain time")
    parser.add_argument("--deep", type=int, default=64, help="programs queued in deep-send")
    parser.add_argument("--label", default=os.environ.get("TRANSFER_PROBE_VARIANT", "current"))
    parser.add_argument("--out-dir", type=pathlib.Path, default=None, help="JSON (default $OUT)")
    parser.add_argument("--variant-timeout", type=float, default=150.0, help="s, for --sweep")
    return parser


# ----------------------------------------------------------------------------- sweep


def sweep(args) -> int:
    """Runs the pair once per variant under `jaxpp launch`; prints one table."""
    out_dir = args.out_dir or (pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    rows, failures = [], {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        json_path = pathlib.Path(f"/tmp/transfer_probe_{os.getpid()}_{name}.json")
        json_path.unlink(missing_ok=True)
        env = variant_env(os.environ, name)
        env["TRANSFER_PROBE_JSON"] = str(json_path)
        command = [sys.executable, "-m", "jaxpp.cli", "launch", "-n", "2", "--"]
        command += [sys.executable, os.path.abspath(__file__), "--label", name]
        for flag in ("methods", "situations", "mbytes", "trials", "busy_ms", "deep"):
            value = getattr(args, flag)
            if value is not None:
                command += [f"--{flag.replace('_', '-')}", str(value)]
        print(f"== variant {name}: XLA_FLAGS={env.get('XLA_FLAGS', '')!r}", flush=True)
        start = time.monotonic()
        try:
            code = subprocess.run(command, env=env, timeout=args.variant_timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"== variant {name}: exit {code} in {time.monotonic() - start:.0f} s", flush=True)
        if json_path.exists():
            result = json.loads(json_path.read_text())
            rows += result["rows"]
            failures.update({f"{name}/{k}": v for k, v in result["failures"].items()})
        else:
            failures[name] = f"no result (exit {code})"
    print(format_table(rows, failures))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "transfer_probe.json").write_text(
            json.dumps({"rows": rows, "failures": failures}, indent=1)
        )
    return 0 if rows else 1


def variant_env(base: Mapping[str, str], name: str) -> dict[str, str]:
    """The environment of a variant: `base` plus its XLA flags and variables.

    >>> variant_env({"XLA_FLAGS": "--a"}, "nccl-async")["XLA_FLAGS"].split()[0]
    '--a'
    """
    flags, extra = VARIANTS[name]
    env = dict(base)
    env["XLA_FLAGS"] = " ".join(f for f in (base.get("XLA_FLAGS", ""), flags) if f)
    env.update(extra)
    env["TRANSFER_PROBE_VARIANT"] = name
    return env


def shell_exports(env: Mapping[str, str], base: Mapping[str, str]) -> str:
    """`export K=V` lines (shell-quoted) for the variables of `env` that differ from `base`.

    >>> shell_exports({"A": "1", "B": "x y"}, {"A": "1"})
    "export B='x y'"
    """
    changed = sorted(k for k, v in env.items() if base.get(k) != v)
    return "\n".join(f"export {k}={shlex.quote(env[k])}" for k in changed)


def format_table(rows: Sequence[Mapping], failures: Mapping[str, str]) -> str:
    """One line per (variant, method, situation): medians in ms."""
    head = (
        f"{'variant':<17}{'method':<16}{'situation':<10}{'issue send':>11}{'issue recv':>11}"
        f"{'land':>9}{'busy':>8}{'queue':>8}{'MB/s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        rate = r["mbytes"] / (r["land_ms"] / 1e3) if r["land_ms"] > 0 else float("nan")
        busy = f"{r['busy_ms']:8.1f}" if r["busy_ms"] is not None else f"{'-':>8}"
        queue = max(r.get("queue_send_ms", 0.0), r.get("queue_recv_ms", 0.0))
        lines.append(
            f"{r['variant']:<17}{r['method']:<16}{r['situation']:<10}"
            f"{r['issue_send_ms']:11.2f}{r['issue_recv_ms']:11.2f}{r['land_ms']:9.2f}"
            f"{busy}{queue:8.1f}{rate:9.0f}"
        )
    for what, why in failures.items():
        lines.append(f"FAILED {what}: {why}")
    lines.append(
        "issue = host ms inside the call that starts the transfer (median); land = ms from "
        "the sender's call to the value ready on the receiver; busy = GPU ms of one matmul chain "
        "(busy-*: queued just before on the busy side); queue = host ms spent queuing the "
        "busy work (deep-send: --deep one-matmul programs)."
    )
    return "\n".join(lines)


def summarize(samples: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Median of each key over the trials.

    >>> summarize([{"a": 1.0}, {"a": 3.0}, {"a": 2.0}])
    {'a': 2.0}
    """
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


# ---------------------------------------------------------------------------- worker


def worker(args) -> int:
    """One process of the pair: measures each method in each situation."""
    import jax

    on_cpu = not _has_gpu()
    if on_cpu:
        # DCN (socket) cross-host device_put; the CPU client offers no other.
        jax.config.update("jax_cross_host_transfer_socket_address", "127.0.0.1:0")
    from jaxpp import runtime

    runtime.initialize()
    if jax.process_count() != 2 or len(jax.local_devices()) != 1:
        raise SystemExit(
            f"needs 2 processes with 1 device each, got {jax.process_count()} processes and "
            f"{len(jax.local_devices())} local devices. Fix: jaxpp launch -n 2 -- python "
            f"{__file__} (on a 2-GPU machine, or on CPU)."
        )
    mbytes = args.mbytes if args.mbytes is not None else (0.25 if on_cpu else 32.0)
    trials = args.trials if args.trials is not None else (3 if on_cpu else 10)
    probe = _Probe(jax, mbytes=mbytes, on_cpu=on_cpu, busy_target_ms=args.busy_ms)
    probe.deep = args.deep
    rows, failures = [], {}
    methods = args.methods or ",".join(m for m in METHODS if not (on_cpu and m == "device_put"))
    for method in methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        for situation in args.situations.split(","):
            try:
                samples = [probe.trial(method, situation, k) for k in range(trials + 1)][1:]
            except Exception as error:  # noqa: BLE001 - reported, the next method goes on
                failures[f"{method}/{situation}"] = f"{type(error).__name__}: {error}"[:400]
                print(f"[probe] {method}/{situation} failed: {failures[method + '/' + situation]}")
                probe.barrier(f"failed-{method}-{situation}")
                continue
            merged = probe.merge(f"{method}-{situation}", summarize(samples))
            if merged is not None:
                rows.append(
                    {
                        "variant": args.label,
                        "method": method,
                        "situation": situation,
                        "mbytes": mbytes,
                        "trials": trials,
                        "busy_ms": probe.busy_ms if situation != "idle" else None,
                        "device": str(jax.devices()[0].device_kind),
                        **merged,
                    }
                )
    if jax.process_index() == 1:
        print(format_table(rows, failures))
        target = os.environ.get("TRANSFER_PROBE_JSON")
        out_dir = args.out_dir or (
            pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        )
        text = json.dumps({"rows": rows, "failures": failures}, indent=1)
        if target:
            pathlib.Path(target).write_text(text)
        elif out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"transfer_probe_{args.label}.json").write_text(text)
    probe.barrier("done")
    return 0


def _has_gpu() -> bool:
    """Whether this process will use GPUs, decided without creating a JAX backend
    (that must wait for `jax.distributed`); `jaxpp launch` sets JAX_PLATFORMS=cpu
    on machines without NVIDIA GPUs."""
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        return False
    return any(pathlib.Path("/dev").glob("nvidia[0-9]*"))


class _Probe:
    """The pair's devices, the compiled programs, and one trial of a method."""

    def __init__(self, jax, *, mbytes: float, on_cpu: bool, busy_target_ms: float) -> None:
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from jaxpp.runtime import _coordination

        self.jax, self.jnp, self.np = jax, jnp, np
        self._kv = _coordination
        self.me = jax.process_index()
        self.on_cpu = on_cpu
        self.dtype = jnp.bfloat16
        cols = 1024
        rows = max(1, int(mbytes * 2**20 / 2 / cols))
        self.shape = (rows, cols)
        self.mbytes = rows * cols * 2 / 2**20
        devices = sorted(jax.devices(), key=lambda d: d.process_index)
        self.src, self.dst = devices[0], devices[1]
        self.local = jax.local_devices()[0]
        self.src_sharding = NamedSharding(Mesh(np.array([self.src]), ("x",)), PartitionSpec())
        self.dst_sharding = NamedSharding(Mesh(np.array([self.dst]), ("x",)), PartitionSpec())
        # The pair program of runtime/_distributed.py: shards stacked on axis 0.
        pair_mesh = Mesh(np.array([self.src, self.dst]), (_PAIR_AXIS,))
        self.pair_sharding = NamedSharding(pair_mesh, PartitionSpec(_PAIR_AXIS))
        self.permute = jax.jit(
            jax.shard_map(
                lambda s: jax.lax.ppermute(s, _PAIR_AXIS, perm=((0, 1),)),
                mesh=pair_mesh,
                in_specs=PartitionSpec(_PAIR_AXIS),
                out_specs=PartitionSpec(_PAIR_AXIS),
            )
        )
        self.zeros = jax.device_put(jnp.zeros(self.shape, self.dtype), self.local)
        self.make = jax.jit(lambda k: jax.random.normal(jax.random.key(k), self.shape, self.dtype))
        n = 256 if on_cpu else 8192
        self.busy_a = jax.device_put(
            jax.random.normal(jax.random.key(7), (n, n), jnp.float32).astype(self.dtype),
            self.local,
        )
        self.busy_ms = None
        self._busy_len = 1
        self._calibrate_busy(busy_target_ms)
        self.server = None
        self.ready_timeout_s = 20.0

    # -- helpers
    def barrier(self, name: str) -> None:
        self._kv._client().wait_at_barrier(f"transfer_probe/{name}", 600_000)

    def merge(self, name: str, mine: Mapping[str, float]) -> dict[str, float] | None:
        """Both processes' medians, on the receiver (None on the sender)."""
        self._kv.kv_set(f"transfer_probe/{name}/{self.me}", json.dumps(mine))
        if self.me == 0:
            return None
        sender = json.loads(self._kv.kv_get(f"transfer_probe/{name}/0", waiting_for="sender"))
        return {
            "issue_send_ms": sender["issue_ms"],
            "issue_recv_ms": mine["issue_ms"],
            "land_ms": mine["ready_ns"] / 1e6,
            "queue_send_ms": sender["queue_ms"],
            "queue_recv_ms": mine["queue_ms"],
        }

    def _chain(self, length: int) -> Callable:
        jax = self.jax

        def body(a):
            def step(c, _):
                return (c @ a) * 0.01, None

            return jax.lax.scan(step, a, None, length=length)[0]

        return jax.jit(body)

    def _calibrate_busy(self, target_ms: float) -> None:
        """A matmul chain of about `target_ms` on this device (measured)."""
        length = 4
        while True:
            fn = self._chain(length)
            fn(self.busy_a).block_until_ready()
            start = time.perf_counter()
            fn(self.busy_a).block_until_ready()
            ms = (time.perf_counter() - start) * 1e3
            if ms >= 0.6 * target_ms or length >= 4096:
                break
            length = min(4096, int(length * max(2.0, target_ms / max(ms, 1e-3))))
        self._busy = fn
        self._one = self._chain(1)
        self._one(self.busy_a).block_until_ready()
        # Both sides use the slower estimate for reporting; each queues its own chain.
        self.busy_ms = ms

    def _fresh(self, k: int):
        x = self.jax.device_put(self.make(k), self.local)
        return x.block_until_ready()

    # -- one trial
    def trial(self, method: str, situation: str, k: int) -> dict[str, float]:
        """Times one transfer; returns this process's issue ms and (receiver) ready ns."""
        sending = self.me == 0
        x = self._fresh(10_000 + k) if sending else None
        expected = self._fresh(10_000 + k) if not sending else None
        self._situation = situation
        prepare = getattr(self, f"_prepare_{method}")
        issue = getattr(self, f"_issue_{method}")
        state = prepare(x, k)
        self.barrier(f"{method}-{situation}-{k}")
        busy = (situation == "busy-send" and sending) or (situation == "busy-recv" and not sending)
        t_queue = time.monotonic_ns()
        pending = self._busy(self.busy_a) if busy else None
        if situation == "deep-send" and sending:
            for _ in range(self.deep):
                pending = self._one(self.busy_a)
        key = f"transfer_probe/{method}/{situation}/{k}"
        t0 = time.monotonic_ns()
        received = issue(x, k, state)
        t1 = time.monotonic_ns()
        result = {"issue_ms": (t1 - t0) / 1e6, "ready_ns": 0.0, "queue_ms": (t0 - t_queue) / 1e6}
        if sending:
            self._kv.kv_set(f"{key}/start", str(t0))
            # Wait for the receiver's verdict, keeping what the call returned alive.
            ack = self._kv.kv_get(f"{key}/ack", waiting_for="the receiver's verdict")
            if ack != "ok":
                raise RuntimeError(f"receiver: {ack}")
        else:
            try:
                t2 = self._wait_ready(received)
                if not bool(self.jnp.array_equal(received, expected)):
                    raise AssertionError("received array differs from the one sent")
            except Exception as error:
                self._kv.kv_set(f"{key}/ack", f"{type(error).__name__}: {error}")
                raise
            self._kv.kv_set(f"{key}/ack", "ok")
            start = int(self._kv.kv_get(f"{key}/start", waiting_for="the sender's start"))
            result["ready_ns"] = float(t2 - start)
        if pending is not None:
            pending.block_until_ready()
        return result

    def _wait_ready(self, array) -> int:
        """Spins until `array` is ready; its monotonic time (TimeoutError past the limit)."""
        deadline = time.monotonic() + self.ready_timeout_s
        while not array.is_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {self.ready_timeout_s:g} s")
        return time.monotonic_ns()

    # permute: both processes call the pair program.
    def _prepare_permute(self, x, k):
        return None

    def _issue_permute(self, x, k, state):
        jax = self.jax
        piece = x if self.me == 0 else self.zeros
        stacked = jax.make_array_from_single_device_arrays(
            (2 * self.shape[0], self.shape[1]), self.pair_sharding, [piece], dtype=self.dtype
        )
        if self.on_cpu:
            jax.block_until_ready(stacked)  # as runtime/_distributed.py does on CPU
        out = self.permute(stacked)
        if self.me == 0:
            return None
        return out.addressable_shards[0].data

    # device_put: a committed array on the sender's device, put on the receiver's.
    def _prepare_device_put(self, x, k):
        return None

    def _issue_device_put(self, x, k, state):
        jax = self.jax
        pieces = [x] if self.me == 0 else []
        src = jax.make_array_from_single_device_arrays(
            self.shape, self.src_sharding, pieces, dtype=self.dtype
        )
        out = jax.device_put(src, self.dst_sharding)
        if self.me == 0:
            return (src, out)  # kept alive until the trial ends
        return out.addressable_shards[0].data

    # transfer server: the sender offers, the receiver pulls.
    def _prepare_transfer_server(self, x, k):
        if self.server is None:
            from jax.experimental import transfer

            host = "127.0.0.1"  # the pair shares a host (jaxpp launch)
            client = self.local.client
            self.server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
            self._kv.kv_set(f"transfer_probe/server/{self.me}", self.server.address())
            peer = self._kv.kv_get(f"transfer_probe/server/{1 - self.me}", waiting_for="peer")
            self.connection = self.server.connect(peer) if self.me == 1 else None
        return None

    def _issue_transfer_server(self, x, k, state):
        jax = self.jax
        uuid = 1000 + k + 100_000 * hash_situation(self._situation)
        if self.me == 0:
            self.server.await_pull(uuid, [x])
            return None
        spec = jax.ShapeDtypeStruct(
            self.shape, self.dtype, sharding=jax.sharding.SingleDeviceSharding(self.local)
        )
        return self.connection.pull(uuid, [spec])[0]


def hash_situation(name: str) -> int:
    """A small stable number per situation (transfer-server ids must not repeat).

    >>> [hash_situation(s) for s in ("", "idle", "busy-send")]
    [0, 1, 2]
    """
    return 0 if not name else SITUATIONS.index(name) + 1


if __name__ == "__main__":
    sys.exit(main())
