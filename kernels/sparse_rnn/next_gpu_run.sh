# The next H100 call of the sparse RNN (kernels/sparse_rnn/NOTES.md, "The next GPU run"). The
# issue's grid is complete since session 10 (benchmarks/README.md); what a later change to the
# kernels needs is this: the GPU tests of the default path (11 tests, 139 s on a cold machine in
# session 10), then the bar's cases with their baselines in one process (`--mode sweep` takes
# them first: LSTM H=2304 B=4 d=30% forward and forward+backward, H=4096 B=4 d=10%), then the
# rest of the LSTM batch-4 row while the budget lasts.
# One device call of at most 9.5 minutes. From the repository root, on the GPU machine:
#     source benchmarks/gpu_env.sh && bash kernels/sparse_rnn/next_gpu_run.sh
# Every step runs in its own process under `timeout`, capped by what is left of BUDGET_S, so a
# step that hangs or compiles for minutes costs only its own slot. Results: $OUT/<name>/
# (JSON + log per process) and $OUT/gpu_tests_default.log.
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-/tmp/sparse_rnn_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

slot() {  # slot SECONDS NAME COMMAND...: run COMMAND with min(SECONDS, time left) as its limit
  local want=$1 name=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  local limit=$((want < left ? want : left))
  if ((limit < 15)); then
    echo "== $name: skipped, ${left}s left"
    return
  fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  timeout "$limit" "$@" || echo "== $name: exit $?"
}

sweep() {  # sweep LIMIT CELL [flags]: the grid for one cell (bar cases first), stops starting
  # cases 25 s before its limit
  local limit=$1 cell=$2
  shift 2
  slot "$limit" "sweep_$cell" python3 benchmarks/sparse_rnn_bench.py --mode sweep --cells "$cell" \
    --budget-s $((limit - 25)) --out "$OUT/sweep_$cell" "$@"
}

repo=$PWD
JAX_PLATFORMS=cuda,cpu slot 200 gpu_tests_default bash -c "cd /tmp && python3 -m pytest -o addopts='' \
  -q -rA -p no:cacheprovider '$repo/tests/gpu/test_sparse_rnn_gpu.py' -k 'long_sequence and not variant'" \
  2>&1 | tail -n 20 | tee "$OUT/gpu_tests_default.log"
sweep 340 lstm --batches 4
echo "== done at ${SECONDS}s"
