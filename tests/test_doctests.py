"""Runs the docstring examples of every jaxpp module (the documented examples must work)."""

import doctest
import importlib
import pkgutil

import pytest

import jaxpp

# Modules that need a GPU to import are skipped by name here, with the reason.
_GPU_ONLY: frozenset[str] = frozenset()


def _module_names() -> list[str]:
    names = ["jaxpp"]
    for info in pkgutil.walk_packages(jaxpp.__path__, prefix="jaxpp."):
        if info.name not in _GPU_ONLY:
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
