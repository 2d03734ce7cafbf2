#!/usr/bin/env bash
# One GPU-machine call for kernels/attention: install, GPU tests, then the benchmark.
# Usage (repo root, on the GPU machine): benchmarks/attention_gpu_run.sh [bench args...]
# Writes under $OUT: attention_tests.log, attention_bench.log, attention_bench.json.
set -u
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
OUT=${OUT:-/tmp/attention_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
  export PYTHONPATH=/tmp/site
fi
# jaxpp as a package tree of links (the folders are subpackages, see setup.py)
rm -rf /tmp/pp && mkdir -p /tmp/pp/jaxpp && cp -r jaxpp/. /tmp/pp/jaxpp/
for sub in schedules runtime kernels; do ln -s "$PWD/$sub" "/tmp/pp/jaxpp/$sub"; done
export PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # from /tmp, so that the repo's own jaxpp/ folder does not shadow the package tree
  repo=$PWD
  (cd /tmp && timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -o addopts="" \
    -p no:cacheprovider --timeout 90 "$repo/tests/gpu/test_attention_gpu.py" 2>&1) \
    | tee "$OUT/attention_tests.log" | tail -25
fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/attention_bench.py --out "$OUT/attention_bench.json" "$@" \
  2>&1 | tee "$OUT/attention_bench.log" | grep -v "^  " | tail -60
