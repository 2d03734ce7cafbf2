"""One process of a multi-process test run; started by `jaxpp launch` from the tests.

Usage: python distributed_worker.py CASE [CASE ...]
Each case runs a pipelined step in every process; process 0 fetches the results and
checks them against jax.jit. Every process prints "PASS <case> (process <p>)", process
0 also "CHECKED <case>"; a failure exits non-zero.
Cases: schedules4 (4 processes, 1 device each), spanning4 (4 x 1, ranks of 2 devices
spanning 2 processes), mixed2 (2 processes x 2 devices, 2 ranks per process and
ranks split over both processes), kill (a mesh one rank too large must fail;
then process 1 dies in the middle of a step), stall (process 1 stops, SIGSTOP, in the
middle of a step), slowpeer (process 1 is alive but gets to a key-value exchange 2.5
heartbeat timeouts late, as when it compiles a large task; then a key nobody sets
must time out after JAXPP_PROGRESS_TIMEOUT with the key named).
"""

import functools
import os
import pathlib
import signal
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "jaxpp"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from pipeline_models import assert_trees_close, make_problem, train_step  # noqa: E402

import jaxpp  # noqa: E402
from jaxpp import runtime  # noqa: E402


def run_case(name, schedule, layers, mesh, *, steps=2, in_shardings=None, profile=False, **kwargs):
    """Runs the pipelined step in every process; process 0 checks it against jax.jit."""
    state, batch, loss = make_problem(
        jax.random.key(len(name)), layers_per_stage=layers, num_microbatches=8, **kwargs
    )
    step = functools.partial(train_step, schedule=schedule, loss=loss)
    pipelined = jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=mesh, in_shardings=in_shardings)
    checker = jax.process_index() == 0
    reference = jax.jit(step)
    ref_state, pp_state = state, state
    for i in range(steps):
        pp_state, pp_losses = pipelined(pp_state, batch)
        got = runtime.fetch((pp_state, pp_losses), process=0)
        if checker:
            ref_state, ref_losses = reference(ref_state, batch)
            assert_trees_close(got[1], ref_losses, what=f"{name}: losses, step {i}")
            assert_trees_close(got[0], ref_state, what=f"{name}: state, step {i}")
        else:
            assert got is None
    executor = pipelined.last_compiled.executor
    assert isinstance(executor, runtime.DistributedExecutor)
    print(f"TRANSFERS {name} {'async' if executor.async_transfers else 'inline'}", flush=True)
    if profile:  # every process sees every rank's task timings
        busy = pipelined.profile(pp_state, batch).busy_seconds
        assert len(busy) == mesh.num_ranks and all(b > 0 for b in busy), busy
        assert all(p > 0 for p in pipelined.last_stats.peak_activations)
    if checker:
        print(f"CHECKED {name} against jax.jit", flush=True)
    print(f"PASS {name} (process {jax.process_index()})", flush=True)


OTHER_SCHEDULES = (
    ("gpipe", jaxpp.GPipe(4), (1, 1, 1, 1)),
    ("eager1f1b", jaxpp.Eager1F1B(4), (1, 1, 1, 1)),
    ("loopedbfs", jaxpp.LoopedBFS(8, ranks=4), (1,) * 8),
    ("zb-h2", jaxpp.ZeroBubbleH2(4), (1, 1, 1, 1)),
    ("zbv", jaxpp.ZBV(8, ranks=4), (1,) * 8),
)


def mpmd(mesh):
    return jaxpp.MpmdMesh(mesh, "stages")


def schedules4():
    mesh = mpmd(runtime.stage_mesh(4))
    run_case("1f1b", jaxpp.Std1F1B(4), (1, 1, 1, 1), mesh, tied=True, profile=True)
    run_case("interleaved", jaxpp.Interleaved1F1B(8, ranks=4), (1,) * 8, mesh, steps=1)
    run_case("zb-h1", jaxpp.ZeroBubble(4), (1, 1, 1, 1), mesh, steps=1)
    run_case("dualpipev", jaxpp.DualPipeV(8, ranks=4), (1,) * 8, mesh, steps=1)
    os.environ["JAXPP_ASYNC_TRANSFERS"] = "0"  # the in-line path (the default)
    try:
        run_case("1f1b-inline", jaxpp.Std1F1B(4), (1, 1, 1, 1), mesh, steps=1)
    finally:
        os.environ["JAXPP_ASYNC_TRANSFERS"] = "1"


def spanning4():
    mesh = mpmd(runtime.stage_mesh(2, {"data": 2}))
    spec = {"x": P(None, "data"), "y": P(None, "data")}
    assert len({d.process_index for d in mesh.rank_mesh(0).devices.flat}) == 2
    run_case("spanning-1f1b", jaxpp.Std1F1B(2), (1, 1), mesh, in_shardings=(None, spec))
    run_case("spanning-zb-h1", jaxpp.ZeroBubble(2), (1, 1), mesh, in_shardings=(None, spec))


def mixed2():
    mesh = mpmd(runtime.stage_mesh(4))  # process 0 owns ranks 0, 1; process 1 ranks 2, 3
    run_case("two-ranks-per-process-1f1b", jaxpp.Std1F1B(4), (1, 1, 1, 1), mesh, steps=1)
    # The same plan structure with other shapes: its transfers must not reuse the types above.
    run_case("same-plan-other-shapes", jaxpp.Std1F1B(4), (1, 1, 1, 1), mesh, steps=1, mb_size=2)
    # The other built-in schedules (schedules4 runs 1F1B, interleaved, ZB-H1, DualPipeV).
    for name, schedule, layers in OTHER_SCHEDULES:
        run_case(name, schedule, layers, mesh, steps=1)
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    split = np.array(devices).reshape(2, 2).T  # rank r = device r of each process
    mesh = mpmd(jax.sharding.Mesh(split, ("stages", "model")))
    layer = {"w": P(None, "model"), "b": P("model")}
    specs = (({"embed": None, "head": None, "layers": [layer] * 2}, None), None)
    run_case("split-ranks-tp-1f1b", jaxpp.Std1F1B(2), (1, 1), mesh, in_shardings=specs)


def kill():
    n = jax.process_count()
    try:
        runtime.stage_mesh(n + 1)
    except ValueError as error:
        print(f"PASS badcount: {error}", flush=True)
    _fail_mid_step(signal.SIGKILL)


def stall():
    _fail_mid_step(signal.SIGSTOP)


def _fail_mid_step(how: signal.Signals) -> None:
    """Process 1 gets `how` (dies or stops answering) in the middle of a step."""
    n = jax.process_count()
    mesh = mpmd(runtime.stage_mesh(n))
    state, batch, loss = make_problem(
        jax.random.key(0), layers_per_stage=(1,) * n, num_microbatches=8
    )
    step = functools.partial(train_step, schedule=jaxpp.Std1F1B(n), loss=loss)
    pipelined = jaxpp.mpmd_jit_with_loop(step, mpmd_mesh=mesh)
    state, _ = pipelined(state, batch)
    runtime.fetch(state[0]["embed"])
    print(f"READY pid {os.getpid()}", flush=True)
    if jax.process_index() == 1:
        threading.Timer(0.05, lambda: os.kill(os.getpid(), how)).start()
    for _ in range(1000):
        state, _ = pipelined(state, batch)
        runtime.fetch(state[0]["embed"])
    time.sleep(120)  # never reached in a healthy test: the watchdog stops us first


def slowpeer():
    from jaxpp.runtime import _coordination

    late_s = 2.5 * _coordination._WATCHDOG.timeout_s
    if jax.process_index() == 1:
        time.sleep(late_s)  # the heartbeat thread keeps running, as during a compile
        _coordination.kv_set("jaxpp/test/slowpeer", "late but alive")
        # Stay until process 0 is done, or the shutdown barrier gives up on it.
        _coordination._client().blocking_key_value_get("jaxpp/test/slowpeer-done", 60_000)
    else:
        start = time.monotonic()
        got = _coordination.kv_get("jaxpp/test/slowpeer", waiting_for="the slow peer")
        assert got == "late but alive" and time.monotonic() - start >= late_s - 1, got
        start = time.monotonic()
        try:
            _coordination.kv_get("jaxpp/test/never", waiting_for="a key nobody sets")
        except runtime.PeerLostError as error:
            print(f"PASS never ({time.monotonic() - start:.1f} s): {error}", flush=True)
        else:
            raise AssertionError("kv_get returned a key nobody set")
        _coordination.kv_set("jaxpp/test/slowpeer-done", "yes")
    print(f"PASS slowpeer (process {jax.process_index()})", flush=True)


def busyexit():
    """Exits while the heartbeat thread is (almost surely) inside a coordination call."""
    from jaxpp.runtime import _coordination

    _coordination._WATCHDOG.interval = 0.0002  # back-to-back client calls
    time.sleep(0.5)
    print(f"PASS busyexit (process {jax.process_index()})", flush=True)


CASES = {f.__name__: f for f in (schedules4, spanning4, mixed2, kill, stall, slowpeer, busyexit)}

if __name__ == "__main__":
    import faulthandler

    if os.environ.get("JAXPP_TEST_DUMP"):
        faulthandler.dump_traceback_later(float(os.environ["JAXPP_TEST_DUMP"]), exit=True)
    runtime.initialize()
    for case in sys.argv[1:]:
        CASES[case]()
