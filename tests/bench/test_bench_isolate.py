"""`jaxpp bench pipeline --isolate`: children run from a folder without ./jaxpp.

On the GPU machine the repository root holds a bare `jaxpp/` (its subpackages live at the
root), so `python -m jaxpp.cli` started there imports the wrong package.
"""

import pathlib
import subprocess
import sys

import jaxpp
from jaxpp import _cli_bench, cli


def _shadow(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder like the repository root on the GPU machine: a `jaxpp/` that cannot work."""
    folder = tmp_path / "repo"
    (folder / "jaxpp").mkdir(parents=True)
    (folder / "jaxpp" / "__init__.py").write_text("raise ImportError('shadow jaxpp')\n")
    return folder


def test_isolate_children_run_outside_the_cwd_with_absolute_out(tmp_path, monkeypatch):
    shadow = _shadow(tmp_path)
    monkeypatch.chdir(shadow)
    calls, real_run = [], subprocess.run

    def record(command, **kwargs):
        calls.append((command, kwargs))
        assert not (pathlib.Path(kwargs["cwd"]) / "jaxpp").exists()
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(_cli_bench.subprocess, "run", record)
    argv = ["bench", "pipeline", "--model", "tiny", "--devices", "2", "--isolate"]
    names = "spmd/dp2/acc1/noremat,jaxpp/1f1b/pp2/mb4/noremat"
    assert cli.main([*argv, "--configs", names, "--out", "rel/bench.json"]) == 0
    assert len(calls) == 3  # prepare, then one per configuration
    for command, kwargs in calls:
        out = command[command.index("--out") + 1]
        assert out == str(shadow / "rel" / "bench.json")
        assert pathlib.Path(kwargs["cwd"]).resolve() != shadow.resolve()
    # The child command itself works from that kind of folder, and fails from the shadow.
    command, kwargs = calls[1]
    probe = [sys.executable, "-m", "jaxpp.cli", "bench", "pipeline", "--model", "2b"]
    probe += ["--devices", "2", "--list", "--configs", "jaxpp/1f1b/pp2/mb16/noremat"]
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    good = real_run(probe, cwd=neutral, env=kwargs["env"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "jaxpp/1f1b/pp2/mb16/noremat" in good.stdout
    bad = real_run(probe, cwd=shadow, env=kwargs["env"], capture_output=True, text=True)
    assert bad.returncode != 0 and "shadow jaxpp" in bad.stderr


def test_child_environment_puts_a_package_tree_first(tmp_path, monkeypatch):
    tree = tmp_path / "pp"
    (tree / "jaxpp" / "schedules").mkdir(parents=True)
    (tree / "jaxpp" / "schedules" / "__init__.py").write_text("")
    monkeypatch.setattr(jaxpp, "__file__", str(tree / "jaxpp" / "__init__.py"))
    env = _cli_bench.child_environment({"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(":") == [str(tree), "/x"]


def test_child_environment_leaves_an_installed_jaxpp_alone(tmp_path, monkeypatch):
    bare = tmp_path / "repo" / "jaxpp"  # a repository root: subpackages beside jaxpp/
    bare.mkdir(parents=True)
    monkeypatch.setattr(jaxpp, "__file__", str(bare / "__init__.py"))
    assert _cli_bench.child_environment({"PYTHONPATH": "/x"}) == {"PYTHONPATH": "/x"}
