#!/usr/bin/env bash
# One GPU-machine call for kernels/attention: install, GPU tests, then the benchmark.
# Usage (repo root, on the GPU machine): benchmarks/attention_gpu_run.sh [bench args...]
# Writes under $OUT: attention_tests.log, attention_bench.log, attention_bench.json.
# Env: SKIP_TESTS=1, TEST_K=<pytest -k expression>, TEST_TIMEOUT, BENCH_TIMEOUT (seconds).
set -u
export JAX_PLATFORMS=cuda
OUT=${OUT:-/tmp/attention_out}
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_env.sh"   # wheels from .whl/ and jaxpp as a package tree
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # from /tmp, so that the repo's own jaxpp/ folder does not shadow the package tree
  repo=$PWD
  (cd /tmp && timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -o addopts="" \
    -p no:cacheprovider --timeout 90 ${TEST_K:+-k "$TEST_K"} "$repo/tests/gpu/test_attention_gpu.py" 2>&1) \
    | tee "$OUT/attention_tests.log" | tail -25
fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/attention_bench.py --out "$OUT/attention_bench.json" "$@" \
  2>&1 | tee "$OUT/attention_bench.log" | grep -v "^  " | tail -60
