"""The one timing path for kernel benchmarks: gate on correctness, then time device work."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class CorrectnessError(ValueError):
    """The function under test disagrees with its float32 reference beyond `rtol`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    """One function timed by `benchmark`.

    Attributes:
        median_s: median device time of one call, in seconds.
        samples_s: every sample, in seconds, in the order taken.
        rel_error: ||out - ref|| / ||ref|| over all outputs (None without a reference).
        tflops: `flops / median_s / 1e12` (None without `flops`).
        bytes_per_s: `bytes_moved / median_s` (None without `bytes_moved`).
        timer: "cupti" (summed kernel device time) or "wall" (host clock after a sync).
        flops: the FLOP count passed in, or None.
        bytes_moved: the byte count passed in, or None.
    """

    median_s: float
    samples_s: tuple[float, ...]
    rel_error: float | None
    tflops: float | None
    bytes_per_s: float | None
    timer: str
    flops: float | None = None
    bytes_moved: float | None = None

    @property
    def spread(self) -> float:
        """(p90 - p10) / median of the samples: how much the timing moves."""
        lo, hi = np.percentile(self.samples_s, (10, 90))
        return float((hi - lo) / self.median_s)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (samples included)."""
        out = dataclasses.asdict(self)
        out["samples_s"] = list(self.samples_s)
        out["spread"] = self.spread
        return out


def benchmark(
    fn: Callable[..., Any],
    make_args: Callable[[jax.Array], tuple[Any, ...]],
    *,
    reference: Callable[..., Any] | None = None,
    rtol: float = 2e-2,
    warmup: int = 3,
    samples: int = 30,
    flush_l2: bool = True,
    flops: float | None = None,
    bytes_moved: float | None = None,
    seed: int = 0,
    timer: str = "auto",
) -> Measurement:
    """Times `fn` on fresh inputs after checking it against a float32 reference.

    Each sample draws new inputs with `make_args(key)` (outside the timed region),
    optionally overwrites a buffer larger than L2 so the inputs are not cached, and
    times one call. On GPU the time is the summed device time of the call's kernels
    read through CUPTI; on CPU it is the host clock around the call and a sync.

    Args:
        fn: the (jitted) callable to time; any pytree of arrays out.
        make_args: key -> tuple of inputs for `fn`; called once per sample.
        reference: (*args) -> the answer in float32 (any pytree matching `fn`'s
            output). Checked on the first inputs before timing.
        rtol: largest relative error ||out - ref|| / ||ref|| accepted.
        warmup: calls before timing (compilation, autotuning, handles).
        samples: how many timed calls; the median is reported (>= 30 for reports).
        flush_l2: overwrite a 256 MiB buffer before each timed call (GPU only).
        flops: FLOPs of one call, for `tflops`.
        bytes_moved: fewest bytes one call must move, for `bytes_per_s`.
        seed: seed of the input keys.
        timer: "auto" (cupti on GPU, else wall), "cupti" or "wall".

    Returns:
        A `Measurement`.

    Raises:
        CorrectnessError: if the relative error exceeds `rtol` or is NaN.
        ValueError: if `samples` < 1 or `timer` is unknown.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> m = benchmark(jax.jit(lambda x: x * 2), lambda k: (jax.random.normal(k, (64,)),),
        ...               reference=lambda x: x * 2.0, samples=3, flops=64)
        >>> m.rel_error == 0.0, len(m.samples_s), m.timer
        (True, 3, 'wall')
    """
    if samples < 1:
        raise ValueError(f"samples={samples}; need at least 1 (use >= 30 for reported numbers).")
    if timer not in ("auto", "cupti", "wall"):
        raise ValueError(f"timer={timer!r}; use 'auto', 'cupti' or 'wall'.")
    platform = jax.devices()[0].platform
    if timer == "auto":
        timer = "cupti" if platform == "gpu" else "wall"
    keys = jax.random.split(jax.random.key(seed), samples + 1)

    args = make_args(keys[0])
    rel_error = None
    if reference is not None:
        rel_error = relative_error(fn(*args), reference(*args))
        if not rel_error <= rtol:
            raise CorrectnessError(
                f"relative error {rel_error:.3g} exceeds rtol={rtol:g}; the function under test "
                "is wrong (or rtol is too tight for its precision)."
            )
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    del args

    flush = _l2_flusher() if (flush_l2 and platform == "gpu") else None
    times = []
    for i in range(samples):
        args = jax.block_until_ready(make_args(keys[i + 1]))
        if flush is not None:
            jax.block_until_ready(flush())
        times.append(_time_once(fn, args, timer))
        del args
    median = float(np.median(times))
    return Measurement(
        median_s=median,
        samples_s=tuple(times),
        rel_error=rel_error,
        tflops=None if flops is None else flops / median / 1e12,
        bytes_per_s=None if bytes_moved is None else bytes_moved / median,
        timer=timer,
        flops=flops,
        bytes_moved=bytes_moved,
    )


def relative_error(out: Any, ref: Any) -> float:
    """||out - ref|| / ||ref|| in float32 over all leaves of two matching pytrees.

    Example:
        >>> import jax.numpy as jnp
        >>> round(relative_error(jnp.array([1.0, 2.0]), jnp.array([1.0, 2.5])), 4)
        0.1857
    """
    outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
    if len(outs) != len(refs):
        raise ValueError(f"output has {len(outs)} arrays but the reference {len(refs)}.")
    num = den = 0.0
    for o, r in zip(outs, refs, strict=True):
        if o.shape != r.shape:
            raise ValueError(f"output shape {o.shape} != reference shape {r.shape}.")
        o32, r32 = jnp.asarray(o, jnp.float32), jnp.asarray(r, jnp.float32)
        num += float(jnp.sum(jnp.square(o32 - r32)))
        den += float(jnp.sum(jnp.square(r32)))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def _time_once(fn: Callable[..., Any], args: tuple[Any, ...], timer: str) -> float:
    if timer == "wall":
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib  # GPU wheels only

    ext = mosaic_gpu_lib._mosaic_gpu_ext
    ext._cupti_init()
    try:
        jax.block_until_ready(fn(*args))
    finally:
        timings = ext._cupti_get_timings(True)  # finalize: the path jax's profiler uses
    if not timings:
        raise RuntimeError("CUPTI recorded no kernel for this call; is `fn` running on the GPU?")
    return sum(t for _, t in timings) / 1e3  # CUPTI reports milliseconds


def _l2_flusher() -> Callable[[], jax.Array]:
    buf = jnp.zeros((64 * 1024 * 1024,), jnp.float32)  # 256 MiB, > 50 MiB L2
    add_one = jax.jit(lambda b: b + 1.0)
    return lambda: add_one(buf)
