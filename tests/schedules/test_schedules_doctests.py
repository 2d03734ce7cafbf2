"""Runs the docstring examples of every jaxpp.schedules module.

tests/test_doctests.py walks the `jaxpp/` folder only; `jaxpp.schedules` lives in
`schedules/` (mapped in setup.py), so its examples are run here.
"""

import doctest
import importlib
import pkgutil

import jaxpp.schedules
import pytest


def _module_names() -> list[str]:
    names = ["jaxpp.schedules"]
    names += [
        i.name for i in pkgutil.walk_packages(jaxpp.schedules.__path__, prefix="jaxpp.schedules.")
    ]
    return sorted(names)


@pytest.mark.parametrize("name", _module_names())
def test_schedules_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
