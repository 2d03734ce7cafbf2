# The next H100 call of the sparse RNN (kernels/sparse_rnn/NOTES.md, "The next GPU run"): the
# LSTM cells of the issue's sweep that no run has measured yet with `sparse_rnn`'s default
# (session 9 measured the bar cases, all of batch 16 for tanh and most for LSTM; with
# sessions 7 and 8, tanh is complete). Missing: LSTM batch 1 at hidden 1152 and 4096 (and
# 2304 at 5%), LSTM batch 16 at hidden 1152 (and 4096 at 5%); the sweep takes them first
# (`--no-bar-first`, hidden order 1152,4096,2304), then re-measures what is done while the
# budget lasts. First the GPU tests of the default path (11 tests; in session 9 the first
# 8 passed in a 130 s slot on a cold machine, the slot is 200 s now).
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
sweep 340 lstm --batches 1,16 --hiddens 1152,4096,2304 --no-bar-first
echo "== done at ${SECONDS}s"
