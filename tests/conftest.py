"""Test setup: 8 virtual CPU devices, set before JAX starts its backends.

A run of only the GPU tests (`pytest -o addopts='' tests/gpu/...` on a GPU machine) keeps
JAX's own platform choice: forcing the CPU there would skip every GPU test silently.
"""

import importlib.util
import os
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_GPU_TESTS = _REPO / "tests" / "gpu"


def _only_gpu_tests(args: list[str]) -> bool:
    paths = [pathlib.Path(a.split("::")[0]).resolve() for a in args]
    return bool(paths) and all(p == _GPU_TESTS or _GPU_TESTS in p.parents for p in paths)


def pytest_configure(config):
    # Before any test module imports JAX (collection comes after this hook).
    if _only_gpu_tests(config.args):
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = "--xla_force_host_platform_device_count=8"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


@pytest.fixture(scope="session")
def load_file():
    """`load_file("benchmarks/tp_loss_check.py")`: a file of the repository that is not part of
    a package (a benchmark script, this conftest), imported as a module of its own."""

    def load(relative: str):
        path = _REPO / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
