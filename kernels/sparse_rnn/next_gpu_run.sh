# The next H100 run of the sparse RNN kernel variants (kernels/sparse_rnn/NOTES.md), one device
# call of at most 9 minutes. From the repository root, on the GPU machine:
#     source benchmarks/gpu_env.sh && bash kernels/sparse_rnn/next_gpu_run.sh
# Every step runs in its own process under `timeout`, capped by what is left of BUDGET_S, so a
# variant that hangs or compiles for minutes costs only its own slot. Results: $OUT/<name>/
# (JSON + log per process) and $OUT/gpu_tests.log.
BUDGET_S=${BUDGET_S:-510}
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

# The baselines and the current kernel first, so every ratio comes from this run.
bench 100 v3 --baselines dense,cudnn
# Most promising first (NOTES.md, "Predictions").
bench 70 f16_pf
bench 70 pf
bench 70 f16
bench 70 f16_u2
bench 70 f16_u4
bench 70 f16_pf_nw8
# (bf16_pf is left out: same bytes as f16_pf, and its 8-bit state is expected to fail the check.)
# Forward and gradients of every variant against the reference over 300 steps (LSTM H=2304),
# in the order of tests/gpu's _VARIANTS, as far as the budget goes.
# From /tmp with the absolute path: at the repository root ./jaxpp would shadow the package tree
# that gpu_env.sh builds in /tmp/pp.
repo=$PWD
JAX_PLATFORMS=cuda,cpu slot 170 bash -c "cd /tmp && python3 -m pytest -o addopts='' -q \
  -p no:cacheprovider '$repo/tests/gpu/test_sparse_rnn_gpu.py' -k 'variant and lstm'" \
  2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log"
echo "== done at ${SECONDS}s"
