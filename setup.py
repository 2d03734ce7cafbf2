"""Packaging for jaxpp: one package whose parts live in top-level folders.

The folders `jaxpp/`, `schedules/`, `runtime/` and `kernels/` are installed as
`jaxpp`, `jaxpp.schedules`, `jaxpp.runtime` and `jaxpp.kernels` (see DESIGN.md).
"""

import pathlib

import setuptools

ROOT = pathlib.Path(__file__).parent
PACKAGE_DIRS = {
    "jaxpp": "jaxpp",
    "jaxpp.schedules": "schedules",
    "jaxpp.runtime": "runtime",
    "jaxpp.kernels": "kernels",
}


def _find_packages() -> tuple[list[str], dict[str, str]]:
    """Every folder with an `__init__.py` under the mapped roots, as a package."""
    packages, package_dir = [], {}
    for name, folder in PACKAGE_DIRS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            package = ".".join((name, *relative.parts))
            packages.append(package)
            package_dir[package] = str(init.parent.relative_to(ROOT))
    return packages, package_dir


packages, package_dir = _find_packages()

setuptools.setup(
    name="jaxpp",
    version="0.1.0",
    description="MPMD pipeline parallelism for JAX with Pallas GPU kernels",
    python_requires=">=3.12",
    packages=packages,
    package_dir=package_dir,
    package_data={"jaxpp.kernels": ["**/*.json"]},
    install_requires=[
        "jax==0.11.2",
        "jaxlib==0.11.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "numpy>=2.0",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "pytest-xdist>=3.5",
            "matplotlib>=3.8",
            "ruff>=0.6",
        ],
        "plots": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["jaxpp = jaxpp.cli:main"]},
)
