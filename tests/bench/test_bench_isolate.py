"""`jaxpp bench pipeline --isolate`: children run from a folder without ./jaxpp, their
output is relayed as it comes, a slow one is stopped, and they share a compilation cache.

On the GPU machine the repository root holds a bare `jaxpp/` (its subpackages live at the
root), so `python -m jaxpp.cli` started there imports the wrong package.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import jaxpp
from jaxpp import _cli_bench, cli
from jaxpp._bench import _configs, _report


def _shadow(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder like the repository root on the GPU machine: a `jaxpp/` that cannot work."""
    folder = tmp_path / "repo"
    (folder / "jaxpp").mkdir(parents=True)
    (folder / "jaxpp" / "__init__.py").write_text("raise ImportError('shadow jaxpp')\n")
    return folder


def test_isolate_children_run_outside_the_cwd_with_absolute_out(tmp_path, monkeypatch):
    shadow = _shadow(tmp_path)
    monkeypatch.chdir(shadow)
    calls = []

    def record(command, *, env, cwd, timeout, stop):
        calls.append((command, env, cwd))
        assert not (pathlib.Path(cwd) / "jaxpp").exists()
        return _cli_bench._Child(0, "after steps", {}, None)

    monkeypatch.setattr(_cli_bench, "_run_child", record)
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "2", "--isolate"]
    names = "spmd/dp2/acc1/noremat,jaxpp/1f1b/pp2/mb4/noremat"
    cache = str(tmp_path / "cache")
    argv += ["--configs", names, "--out", "rel/bench.json", "--cache-dir", cache]
    assert cli.main(argv) == 0
    assert len(calls) == 3  # prepare, then one per configuration
    for command, _, cwd in calls:
        assert command[command.index("--out") + 1] == str(shadow / "rel" / "bench.json")
        assert command[command.index("--cache-dir") + 1] == cache
        assert pathlib.Path(cwd).resolve() != shadow.resolve()
    # The child command itself works from that kind of folder, and fails from the shadow.
    _, env, _ = calls[1]
    probe = [sys.executable, "-m", "jaxpp.cli", "bench", "pipeline", "--model", "2b"]
    probe += ["--devices", "2", "--list", "--configs", "jaxpp/1f1b/pp2/mb16/noremat"]
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    good = subprocess.run(probe, cwd=neutral, env=env, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "jaxpp/1f1b/pp2/mb16/noremat" in good.stdout
    bad = subprocess.run(probe, cwd=shadow, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "shadow jaxpp" in bad.stderr


_SLOW_CHILD = textwrap.dedent(
    """
    import sys, time
    name = sys.argv[1]
    for phase in ("init", "trace"):
        print(f"[+0.1s] {name}: {phase} ...", flush=True)
        if phase == "trace":
            time.sleep(60)
        print(f"[+0.2s] {name}: {phase} 0.1 s", flush=True)
    """
)


def _run_fake_children(tmp_path, monkeypatch, child: str, names: str, timeout: str):
    """Runs the --isolate bench with `child` (a script) in place of every configuration's
    process, reference and ceilings given (no prepare child); returns (exit code, --out)."""
    script = tmp_path / "child.py"
    script.write_text(child)
    monkeypatch.setattr(
        _cli_bench, "command_for", lambda common, name: [sys.executable, str(script), name]
    )
    out = tmp_path / "bench.json"
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "2", "--isolate"]
    argv += ["--configs", names, "--out", str(out), "--config-timeout", timeout]
    argv += ["--reference-loss", "4.2", "--ceilings", "1,1", "--cache-dir", "off"]
    return cli.main(argv), out


def test_isolate_config_timeout_records_phase_and_goes_on(tmp_path, monkeypatch, capsys):
    names = "spmd/dp2/acc1/noremat,jaxpp/1f1b/pp2/mb4/noremat"
    code, out = _run_fake_children(tmp_path, monkeypatch, _SLOW_CHILD, names, "1.5")
    assert code == 1
    printed = capsys.readouterr().out
    assert "spmd/dp2/acc1/noremat: init 0.1 s" in printed  # relayed from the child
    rows = {r["name"]: r for r in _report.load_rows(out, preset="tiny")}
    assert set(rows) == set(names.split(","))
    for row in rows.values():
        assert row["status"] == "timeout" and row["phase"] == "trace"
        assert row["phase_seconds"] == {"init": 0.1}
        assert "--config-timeout 1.5 s" in row["error"] and "in phase trace" in row["error"]
    assert "timeout: stopped by --config-timeout" in out.with_suffix(".md").read_text()


_FINISHING_CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    from jaxpp._bench import _report
    name = sys.argv[1]
    out = pathlib.Path(sys.argv[0]).with_name("bench.json")
    print(f"[+0.1s] {name}: first step ...", flush=True)
    print(f"[+0.2s] {name}: first step 0.1 s", flush=True)
    row = {"name": name, "kind": "spmd", "status": "wrong", "error": "first-step loss 8.4"}
    _report.add_row(out, row, preset="tiny")
    print(f"[+0.3s] {name}: wrong in phase after first step: first-step loss 8.4", flush=True)
    time.sleep(60)  # still finishing (tables, plot) when the timeout ends it
    """
)


def test_isolate_timeout_after_the_verdict_keeps_the_childs_row(tmp_path, monkeypatch, capsys):
    """A child ended by --config-timeout after it wrote its row (the 8B SPMD TP4 row of
    session 8: its wrong-loss verdict came 2 s before the limit) keeps that row, not a
    `timeout` row hiding the verdict."""
    name = "spmd/dp2/acc1/noremat"
    code, out = _run_fake_children(tmp_path, monkeypatch, _FINISHING_CHILD, name, "2")
    assert code == 1
    assert "ended after its verdict (wrong) while finishing" in capsys.readouterr().out
    (row,) = _report.load_rows(out, preset="tiny")
    assert row["status"] == "wrong" and row["error"] == "first-step loss 8.4"


_HANGING_CHILD = textwrap.dedent(
    """
    import sys, time
    from jaxpp import _cli_bench
    assert _cli_bench.dump_stacks_on_signal()  # as every real child does first
    name = sys.argv[1]

    def hang_in_first_step():
        time.sleep(60)

    print(f"[+0.1s] {name}: compile+first step ...", flush=True)
    print(f"[+0.1s] {name}: precompile ...", flush=True)
    print(f"[+0.2s] {name}: precompile: 1/4 programs after 30 s; r0 1/2, r1 0/2", flush=True)
    hang_in_first_step()
    """
)


def test_isolate_timeout_relays_every_thread_stack_of_the_child(tmp_path, monkeypatch, capsys):
    name = "jaxpp/1f1b/pp2/mb4/noremat"
    code, out = _run_fake_children(tmp_path, monkeypatch, _HANGING_CHILD, name, "3")
    assert code == 1
    printed = capsys.readouterr().out
    # faulthandler's dump, relayed before the child was ended: threads, files, functions.
    assert "Current thread" in printed or "Thread 0x" in printed
    assert 'File "' in printed and "in hang_in_first_step" in printed
    (row,) = _report.load_rows(out, preset="tiny")
    assert row["status"] == "timeout"
    assert row["phase"] == "compile+first step > precompile"
    assert "in phase compile+first step > precompile" in row["error"]
    assert row["precompile_progress"].startswith("precompile: 1/4 programs after 30 s")


def test_dump_stacks_on_signal_only_in_a_child():
    assert not _cli_bench.dump_stacks_on_signal({"PATH": "/bin"})


def test_isolate_real_child_streams_phases_and_fills_the_cache(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    out, cache = tmp_path / "bench.json", tmp_path / "cache"
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "2", "--isolate"]
    argv += ["--configs", "spmd/dp2/acc1/noremat", "--out", str(out), "--steps", "1"]
    argv += ["--warmup", "1", "--attention", "xla", "--cache-dir", str(cache)]
    argv += ["--config-timeout", "120"]
    assert cli.main(argv) == 0
    printed = capfd.readouterr().out
    for phase in ("reference", "init", "compile", "first step", "steps"):
        assert f": {phase} ..." in printed
    data = json.loads(out.read_text())
    assert data["reference_source"] == "measured" and data["seed"] == 0
    (row,) = data["results"]
    assert row["status"] == "ok"
    assert {"startup", "backend", "init", "compile", "first step", "steps"} <= set(
        row["phase_seconds"]
    )
    assert any(p.is_file() for p in cache.rglob("*"))  # written by the child
    # A rerun into the same file skips the reference/ceilings child.
    rerun = _namespace(reference_loss=None, ceilings=None, attention="xla")
    assert not _cli_bench._needs_prepare(rerun, str(out))


def _namespace(**values) -> argparse.Namespace:
    return argparse.Namespace(**{"model": "tiny", **values})


def test_needs_prepare_other_attention_or_model_measures_again(tmp_path):
    tiny = _configs.PRESETS["tiny"]
    model = {"preset": "tiny", **{k: getattr(tiny, k) for k in _cli_bench._REFERENCE_FIELDS}}
    out = _report.add_row(tmp_path / "r.json", {"name": "a", "status": "timeout"}, preset="tiny")
    data = {**json.loads(out.read_text()), "model": model, "seed": 0, "attention": "xla"}
    out.write_text(json.dumps({**data, "reference_loss": 4.2, "ceilings": None}))
    same = _namespace(reference_loss=None, ceilings=None, attention="xla")
    assert not _cli_bench._needs_prepare(same, str(out))
    assert _cli_bench._needs_prepare(_namespace(**{**vars(same), "attention": "auto"}), str(out))
    out.write_text(json.dumps({**data, "reference_loss": 4.2, "model": {**model, "d_ff": 8}}))
    assert _cli_bench._needs_prepare(same, str(out))
    given = _namespace(reference_loss=4.0, ceilings="1,1", attention="auto")
    assert not _cli_bench._needs_prepare(given, str(out))


def test_child_environment_puts_a_package_tree_first(tmp_path, monkeypatch):
    tree = tmp_path / "pp"
    (tree / "jaxpp" / "schedules").mkdir(parents=True)
    (tree / "jaxpp" / "schedules" / "__init__.py").write_text("")
    monkeypatch.setattr(jaxpp, "__file__", str(tree / "jaxpp" / "__init__.py"))
    env = _cli_bench.child_environment({"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tree), "/x"]


def test_child_environment_leaves_an_installed_jaxpp_alone(tmp_path, monkeypatch):
    bare = tmp_path / "repo" / "jaxpp"  # a repository root: subpackages beside jaxpp/
    bare.mkdir(parents=True)
    monkeypatch.setattr(jaxpp, "__file__", str(bare / "__init__.py"))
    assert _cli_bench.child_environment({"PYTHONPATH": "/x"}) == {"PYTHONPATH": "/x"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config-timeout", "10"], "--config-timeout needs --isolate"),
        (["--isolate", "--config-timeout", "0"], "must be > 0 seconds"),
        (["--ceilings", "800"], "expected two numbers"),
    ],
)
def test_isolate_flags_bad_values_raise_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "pipeline", "--model", "tiny", "--devices", "2", *flags])
    assert message in capsys.readouterr().err


def test_isolate_child_runs_with_its_xla_preset(tmp_path, capfd):
    """The child checks that its XLA_FLAGS hold the preset (it refuses to run otherwise),
    so a row with status ok proves the parent passed them."""
    out = tmp_path / "bench.json"
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "2", "--isolate"]
    argv += ["--configs", "spmd/dp2/acc1/noremat@overlap", "--out", str(out), "--steps", "1"]
    argv += ["--warmup", "1", "--attention", "xla", "--cache-dir", "off"]
    assert cli.main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["name"] == "spmd/dp2/acc1/noremat@overlap" and row["status"] == "ok"
    assert row["xla_flags"] == list(_configs.XLA_PRESETS["overlap"])


def test_xla_preset_without_isolate_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["bench", "pipeline", "--model", "tiny", "--devices", "2",
                  "--configs", "spmd/dp2/acc1/noremat@overlap"])  # fmt: skip
    assert "add --isolate" in capsys.readouterr().err
