"""Runs the docstring examples of every jaxpp module (the documented examples must work)."""

import doctest
import importlib
import pkgutil

import pytest

# Modules that need a GPU to import are skipped by name here, with the reason.
_GPU_ONLY: frozenset[str] = frozenset()


def _module_names() -> list[str]:
    """Every module of jaxpp, including the subpackages mapped from other folders."""
    roots = ["jaxpp", "jaxpp.schedules", "jaxpp.runtime", "jaxpp.kernels"]
    names = set(roots)
    for root in roots:
        package = importlib.import_module(root)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{root}."):
            names.add(info.name)
    return sorted(names - _GPU_ONLY)


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
