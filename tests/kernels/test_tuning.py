"""Tests for jaxpp.kernels.tuning (CPU: wall-clock timer)."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxpp.kernels import tuning


def _make_args(key):
    return (jax.random.normal(key, (32, 32)),)


def test_benchmark_correct_fn_returns_samples_and_rates():
    m = tuning.benchmark(
        jax.jit(lambda x: x @ x),
        _make_args,
        reference=lambda x: x @ x,
        samples=5,
        flops=2 * 32**3,
        bytes_moved=2 * 32 * 32 * 4,
    )
    assert len(m.samples_s) == 5 and m.median_s > 0
    assert m.rel_error is not None and m.rel_error < 1e-6
    assert m.tflops == pytest.approx(2 * 32**3 / m.median_s / 1e12)
    assert m.timer == "wall"
    assert json.dumps(m.to_dict())


def test_benchmark_wrong_fn_raises_correctness_error():
    with pytest.raises(tuning.CorrectnessError, match="exceeds rtol"):
        tuning.benchmark(jax.jit(lambda x: x + 1.0), _make_args, reference=lambda x: x, samples=1)


def test_benchmark_nan_output_raises_correctness_error():
    with pytest.raises(tuning.CorrectnessError, match="exceeds rtol"):
        tuning.benchmark(
            jax.jit(lambda x: x * jnp.nan), _make_args, reference=lambda x: x, samples=1
        )


def test_benchmark_draws_fresh_inputs_each_sample():
    seen = []

    def make_args(key):
        x = jax.random.normal(key, (4,))
        seen.append(float(x[0]))
        return (x,)

    tuning.benchmark(jax.jit(lambda x: x), make_args, samples=4, warmup=0)
    assert len(set(seen)) == 5


def test_benchmark_zero_samples_raises():
    with pytest.raises(ValueError, match="at least 1"):
        tuning.benchmark(jax.jit(lambda x: x), _make_args, samples=0)


def test_relative_error_pytree_matches_manual():
    out = (jnp.array([1.0, 2.0]), jnp.array([3.0]))
    ref = (jnp.array([1.0, 2.0]), jnp.array([4.0]))
    assert tuning.relative_error(out, ref) == pytest.approx(1.0 / (1 + 4 + 16) ** 0.5)


def test_sol_time_is_larger_of_compute_and_memory():
    c = tuning.Ceilings(matmul_bf16_tflops=100.0, hbm_bytes_per_s=1e9)
    assert tuning.sol_time(1e14, 1.0, c) == pytest.approx(1.0)
    assert tuning.sol_time(1.0, 2e9, c) == pytest.approx(2.0)


def test_sol_score_at_bound_and_baseline():
    assert tuning.sol_score(1.0, 1.0, 3.0) == 1.0
    assert tuning.sol_score(3.0, 1.0, 3.0) == 0.5


def test_sol_score_baseline_below_bound_raises():
    with pytest.raises(ValueError, match="re-measure the ceilings"):
        tuning.sol_score(1.0, 2.0, 1.0)


def test_write_results_records_environment(tmp_path):
    m = tuning.benchmark(jax.jit(lambda x: x), _make_args, samples=2)
    path = tuning.write_results(tmp_path / "a" / "r.json", results=[m], note="x")
    data = json.loads(path.read_text())
    assert data["environment"]["jax"] == jax.__version__
    assert data["results"][0]["median_s"] == m.median_s and data["note"] == "x"
