"""Layout rules from DESIGN.md that code review alone would miss."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_JAX_ROOTS = {"jax", "jaxlib", "flax", "optax", "orbax"}


def _imported_modules(path: pathlib.Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.append(node.module or "")
    return modules


def test_schedules_import_no_jax():
    for path in (ROOT / "schedules").rglob("*.py"):
        bad = [m for m in _imported_modules(path) if m.split(".")[0] in _JAX_ROOTS]
        assert not bad, f"{path} imports {bad}; keep schedules/ JAX-free"


def test_subpackages_never_imported_top_level():
    for folder in ("jaxpp", "schedules", "runtime", "kernels", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            bad = [
                m
                for m in _imported_modules(path)
                if m.split(".")[0] in {"schedules", "runtime", "kernels"}
            ]
            assert not bad, f"{path} imports {bad}; write `jaxpp.{bad[0]}` instead"


def test_kernels_do_not_import_pipeline_code():
    for path in (ROOT / "kernels").rglob("*.py"):
        bad = [
            m
            for m in _imported_modules(path)
            if m.startswith(("jaxpp.schedules", "jaxpp.runtime")) or m == "jaxpp"
        ]
        assert not bad, f"{path} imports {bad}; kernels/ stands alone"
