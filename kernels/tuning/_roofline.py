"""Speed-of-light bounds from ceilings measured on the device in the same run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpp.kernels.tuning import _benchmark

_PRODUCTS = 4  # matmuls per timed sample


@dataclasses.dataclass(frozen=True, slots=True)
class Ceilings:
    """Measured device ceilings.

    Attributes:
        matmul_bf16_tflops: rate of a large bf16 matrix product on random data, TFLOP/s.
        hbm_bytes_per_s: device-to-device copy bandwidth, bytes read plus written per second.
    """

    matmul_bf16_tflops: float
    hbm_bytes_per_s: float


def measure_ceilings(
    *, matmul_size: int | None = None, copy_bytes: int | None = None, samples: int = 30
) -> Ceilings:
    """Measures the bf16 matmul rate and the copy bandwidth through `benchmark`.

    Each ceiling is the fastest of `samples` timed samples (a bound, not a typical run);
    a matmul sample chains several products on random data.

    Args:
        matmul_size: n of the n x n x n product (default 8192 on GPU, 256 on CPU).
        copy_bytes: size of the copied buffer (default 2 GiB on GPU, 4 MiB on CPU).
        samples: timed samples per ceiling.

    Returns:
        `Ceilings` of this device, now.

    Example:
        >>> c = measure_ceilings(matmul_size=64, copy_bytes=1 << 16, samples=2)
        >>> c.matmul_bf16_tflops > 0 and c.hbm_bytes_per_s > 0
        True
    """
    on_gpu = jax.devices()[0].platform == "gpu"
    n = matmul_size or (8192 if on_gpu else 256)
    nbytes = copy_bytes or ((2 << 30) if on_gpu else (4 << 20))

    def make_mats(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        ka, kb = jax.random.split(key)
        return (
            jax.random.normal(ka, (n, n), jnp.bfloat16),
            jax.random.normal(kb, (n, n), jnp.bfloat16),
        )

    def products(a: jax.Array, b: jax.Array) -> jax.Array:
        # Several products per sample keep the clocks up between samples.
        return jax.lax.fori_loop(0, _PRODUCTS, lambda _, c: jnp.dot(a, c), b)

    matmul = _benchmark.benchmark(
        jax.jit(products),
        make_mats,
        samples=samples,
        flops=2.0 * n**3 * _PRODUCTS,
        flush_l2=False,
    )
    count = nbytes // 4

    def make_buf(key: jax.Array) -> tuple[jax.Array]:
        return (jax.random.uniform(key, (count,), jnp.float32),)

    copy = _benchmark.benchmark(
        jax.jit(lambda x: x * 1.0 + 0.5),
        make_buf,
        samples=samples,
        bytes_moved=2.0 * count * 4,
        flush_l2=False,
    )
    # A ceiling is the best the device did, so the fastest sample, not the median.
    best_matmul = 2.0 * n**3 * _PRODUCTS / min(matmul.samples_s) / 1e12
    best_copy = 2.0 * count * 4 / min(copy.samples_s)
    return Ceilings(matmul_bf16_tflops=best_matmul, hbm_bytes_per_s=best_copy)


def sol_time(flops: float, bytes_moved: float, ceilings: Ceilings) -> float:
    """Speed-of-light time: the larger of FLOPs over the matmul rate and bytes over bandwidth.

    Example:
        >>> sol_time(1e12, 1e9, Ceilings(matmul_bf16_tflops=1000.0, hbm_bytes_per_s=1e12))
        0.001
    """
    return max(flops / (ceilings.matmul_bf16_tflops * 1e12), bytes_moved / ceilings.hbm_bytes_per_s)


def sol_score(t: float, t_sol: float, t_base: float) -> float:
    """SOL score 1 / (1 + (t - t_sol) / (t_base - t_sol)): 1 at the bound, 0.5 at the baseline.

    Args:
        t: measured time of the candidate.
        t_sol: speed-of-light time (`sol_time`).
        t_base: time of the baseline (e.g. the best library implementation).

    Raises:
        ValueError: if `t_base <= t_sol` (the baseline cannot beat the bound).

    Example:
        >>> sol_score(2.0, 1.0, 3.0)
        0.6666666666666666
    """
    if t_base <= t_sol:
        raise ValueError(
            f"t_base={t_base:g} <= t_sol={t_sol:g}: the baseline beats the speed-of-light bound; "
            "re-measure the ceilings in the same run as the baseline."
        )
    return 1.0 / (1.0 + (t - t_sol) / (t_base - t_sol))
