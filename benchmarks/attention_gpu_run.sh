#!/usr/bin/env bash
# One GPU-machine call for kernels/attention: install, GPU tests, then the benchmark.
# Usage (repo root, on the GPU machine): benchmarks/attention_gpu_run.sh [bench args...]
# Writes under $OUT: attention_tests.log, attention_tests_summary.txt, attention_bench.log,
# attention_bench.json.
# Env: SKIP_TESTS=1, SKIP_BENCH=1, TEST_K=<pytest -k expression>,
#   TEST_TIMEOUT (seconds for all tests), TEST_EACH_TIMEOUT (seconds per test),
#   BENCH_TIMEOUT (seconds for the whole bench, --budget = BENCH_TIMEOUT - 45; its rows have
#   --row-timeout of their own).
# Hang-proof: every test runs in its own pytest process under `timeout -s KILL` (a hung GPU
# kernel blocks in C, where no in-process timeout can interrupt it); a test still running
# 10 s before its limit dumps its Python stacks (faulthandler). Output is unbuffered.
set -u -f  # -f: test ids like name[True] are not globs
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attention_out}
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_env.sh"   # wheels from .whl/ and jaxpp as a package tree
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
repo=$PWD
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  each=${TEST_EACH_TIMEOUT:-60}
  end=$(( $(date +%s) + ${TEST_TIMEOUT:-240} ))
  log=$OUT/attention_tests.log summary=$OUT/attention_tests_summary.txt
  : > "$log"; : > "$summary"
  # from /tmp, so that the repo's own jaxpp/ folder does not shadow the package tree
  ids=$(cd /tmp && python3 -m pytest -q --collect-only -o addopts="" -p no:cacheprovider \
    ${TEST_K:+-k "$TEST_K"} "$repo/tests/gpu/test_attention_gpu.py" 2>>"$log" | grep "::" | sed "s|^tests/|$repo/tests/|")
  echo "$(echo "$ids" | grep -c .) tests, ${each}s each, ${TEST_TIMEOUT:-240}s in all" | tee -a "$log"
  for id in $ids; do
    left=$(( end - $(date +%s) ))
    if [ "$left" -le 5 ]; then echo "NOT RUN (TEST_TIMEOUT spent) $id" | tee -a "$summary"; continue; fi
    limit=$(( each < left ? each : left ))
    t0=$(date +%s)
    echo "=== $id" >>"$log"
    (cd /tmp && timeout -s KILL "$limit" python3 -X faulthandler -m pytest -v -s -rs -o addopts="" \
      -p no:cacheprovider -o faulthandler_timeout=$(( limit > 20 ? limit - 10 : limit )) \
      "$id" >"$OUT/.one_test.log" 2>&1)
    rc=$?
    cat "$OUT/.one_test.log" >>"$log"
    case $rc in
      0) verdict=PASSED; grep -q " SKIPPED" "$OUT/.one_test.log" && verdict=SKIPPED ;;
      5) verdict="NOT COLLECTED" ;; 137) verdict="TIMEOUT(${limit}s, killed)" ;;
      *) verdict="FAILED(rc $rc)" ;;
    esac
    echo "$verdict $id ($(( $(date +%s) - t0 ))s)" | tee -a "$summary"
  done
  rm -f "$OUT/.one_test.log"
  echo "tests: $(grep -c '^PASSED' "$summary") passed, $(grep -c '^FAILED' "$summary") failed," \
    "$(grep -c '^TIMEOUT' "$summary") timed out, $(grep -c '^SKIPPED' "$summary") skipped"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # no new shape after the budget; a child still running 30 s after it is killed
  # (attention_bench.BUDGET_GRACE_S), which leaves 15 s to write the JSON and the summary
  budget=$(( ${BENCH_TIMEOUT:-300} - 45 ))
  timeout -s KILL "${BENCH_TIMEOUT:-300}" python3 -X faulthandler benchmarks/attention_bench.py \
    --out "$OUT/attention_bench.json" --budget "$budget" "$@" \
    2>&1 | tee "$OUT/attention_bench.log" | grep --line-buffered -v "^  "
fi
