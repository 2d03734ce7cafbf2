# The next H100 call of the sparse RNN (kernels/sparse_rnn/NOTES.md, "The next GPU run"): the
# GPU tests of the Mosaic forward with the three backward levers (after they pass, the levers
# can become the default: 24.57 against 29.41 us/step forward+backward at the headline size,
# session 7), then the whole sweep with the default ("auto": the Mosaic forward on
# Hopper where it fits, else the Triton kernel; every forward row checked against the float32
# reference) and its baselines in the same process, LSTM then tanh. Session 7 measured the bar
# cases and most of tanh (results/sparse_rnn_2026-11-22_s7/); cases beyond the on-chip capacity
# are now recorded without pruning (the LSTM H=4096 d=30% prune alone took minutes).
# One device call of at most 9.5 minutes. From the repository root, on the GPU machine:
#     source benchmarks/gpu_env.sh && bash kernels/sparse_rnn/next_gpu_run.sh
# Every step runs in its own process under `timeout`, capped by what is left of BUDGET_S, so a
# step that hangs or compiles for minutes costs only its own slot. Results: $OUT/<name>/
# (JSON + log per process) and $OUT/gpu_tests_bwd3.log.
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

bench() {  # bench LIMIT NAME [extra flags]: the bar's three LSTM cases for one named variant
  local limit=$1 name=$2
  shift 2
  slot "$limit" "$name" python3 benchmarks/sparse_rnn_bench.py --mode variants --variants "$name" \
    --out "$OUT/$name" "$@"
}

sweep() {  # sweep LIMIT CELL: the grid for one cell (bar cases first), stops starting cases
  # 25 s before its limit
  local limit=$1 cell=$2
  slot "$limit" "sweep_$cell" python3 benchmarks/sparse_rnn_bench.py --mode sweep --cells "$cell" \
    --budget-s $((limit - 25)) --out "$OUT/sweep_$cell"
}

repo=$PWD
JAX_PLATFORMS=cuda,cpu slot 140 gpu_tests_bwd3 bash -c "cd /tmp && python3 -m pytest -o addopts='' \
  -q -rA -p no:cacheprovider '$repo/tests/gpu/test_sparse_rnn_gpu.py' -k 'mosaic and bwd3'" \
  2>&1 | tail -n 20 | tee "$OUT/gpu_tests_bwd3.log"
sweep 260 lstm
sweep 150 tanh
echo "== done at ${SECONDS}s"
