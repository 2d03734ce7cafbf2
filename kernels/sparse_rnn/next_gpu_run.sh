# The sparse RNN runs on an H100 (kernels/sparse_rnn/NOTES.md). Session 7's second call: the
# issue's sweep with the default ("auto": the Mosaic forward on Hopper where it fits, else the
# Triton kernel; every forward row checked against the float32 reference), its baselines in the
# same process, then the Mosaic forward with the three backward levers. One device call of at
# most 9 minutes. From the repository root, on the GPU machine:
#     source benchmarks/gpu_env.sh && bash kernels/sparse_rnn/next_gpu_run.sh
# Every step runs in its own process under `timeout`, capped by what is left of BUDGET_S, so a
# step that hangs or compiles for minutes costs only its own slot. Results: $OUT/<name>/
# (JSON + log per process).
BUDGET_S=${BUDGET_S:-540}
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

sweep 290 lstm
sweep 190 tanh
bench 60 mosaic_packed_bwd3
echo "== done at ${SECONDS}s"
