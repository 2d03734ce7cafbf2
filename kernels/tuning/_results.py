"""The environment of a run, and results written as JSON with it."""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import subprocess
from typing import Any

import jax


def environment() -> dict[str, Any]:
    """Device, driver, CUDA, cuDNN and jax versions, and the date (UTC), as a dict.

    Example:
        >>> env = environment()
        >>> sorted(k for k in env if k in ("device", "jax", "date"))
        ['date', 'device', 'jax']
    """
    device = jax.devices()[0]
    env: dict[str, Any] = {
        "device": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "driver": None,
        "cuda_runtime": None,
        "cudnn": None,
    }
    if device.platform == "gpu":
        env["driver"] = _nvidia_smi("driver_version")
        try:
            from jax._src.lib import cuda_versions

            if cuda_versions is not None:
                env["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
                env["cudnn"] = cuda_versions.cudnn_get_version()
        except (ImportError, AttributeError):
            pass
    return env


def write_results(path: str | pathlib.Path, *, results: Any, **extra: Any) -> pathlib.Path:
    """Writes `{"environment": environment(), "results": results, **extra}` as JSON.

    Args:
        path: the file to write (folders are created).
        results: JSON-ready data (dataclasses with `to_dict` are converted).
        **extra: more top-level entries (e.g. ceilings=..., config=...).

    Returns:
        The path written.

    Example:
        >>> import tempfile, json
        >>> p = write_results(tempfile.mkdtemp() + "/r.json", results=[{"t": 1.0}])
        >>> json.loads(p.read_text())["results"]
        [{'t': 1.0}]
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "results": results, **extra}
    path.write_text(json.dumps(payload, indent=1, default=_to_json))
    return path


def _to_json(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON; give it a to_dict() method.")


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
