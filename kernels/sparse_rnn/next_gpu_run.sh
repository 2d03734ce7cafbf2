# The next H100 run of the sparse RNN kernels (kernels/sparse_rnn/NOTES.md, "The next GPU run"):
# the Mosaic GPU forward's first compile, check, timing and GPU tests, then the Triton default's
# ratios against the baselines, then the backward variants in whatever time is left. One device
# call of at most 9 minutes. From the repository root, on the GPU machine:
#     source benchmarks/gpu_env.sh && bash kernels/sparse_rnn/next_gpu_run.sh
# Every step runs in its own process under `timeout`, capped by what is left of BUDGET_S, so a
# step that hangs or compiles for minutes costs only its own slot. Results: $OUT/<name>/
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

# 1. The Mosaic forward (conflict-free slot order): first GPU compile of its raw IR; H=2304 d=30%
#    forward checked against the float32 reference (2e-3), forward+backward, and H=4096 d=10%
#    (expected: a ValueError row, 240 KiB of shared memory needed).
bench 90 mosaic
# 2. GPU tests, 300 steps, forward and all gradients against the reference: the default's four
#    long-sequence cases (float16 state + unroll 2 since this session), then the Mosaic ones
#    (LSTM 2304 both slot orders, tanh 4096, GRU 512, the spin bound). From /tmp with the
#    absolute path: at the repository root ./jaxpp would shadow the package tree of gpu_env.sh.
repo=$PWD
JAX_PLATFORMS=cuda,cpu slot 150 gpu_tests bash -c "cd /tmp && python3 -m pytest -o addopts='' \
  -q -rA -p no:cacheprovider '$repo/tests/gpu/test_sparse_rnn_gpu.py' \
  -k '(long_sequence and not variant) or mosaic'" 2>&1 | tail -n 40 | tee "$OUT/gpu_tests.log"
# 3. The slot order's effect (packed = column order) and 32 warps.
bench 60 mosaic_packed
bench 60 mosaic_nw32
# 4. The Triton default (f16_u2 at these sizes) with the baselines, so every ratio is from this run.
bench 100 default --baselines dense,cudnn
# (The f16 re-run of the unexplained 40.22 us was dropped for the backward steps below.)
# 5-10. Backward variants (NOTES.md "Backward variants"), each only in the time left (a step
#    with under 15 s is skipped): all three levers (float16 dm copy, folded small row group,
#    inputs loaded before the wait) first (the fwd+bwd row at H=2304 is the second bench row),
#    then their GPU tests (300 steps vs the reference; gradient scales 1e-9..1e7; the float32
#    fallback), then the levers one by one and all three on the Mosaic forward.
bench 60 f16_u2_bwd3
JAX_PLATFORMS=cuda,cpu slot 90 gpu_tests_bwd bash -c "cd /tmp && python3 -m pytest -o addopts='' \
  -q -rA -p no:cacheprovider '$repo/tests/gpu/test_sparse_rnn_gpu.py' \
  -k 'f16_u2_bwd3 or dm16_scale or dm16_overflow'" 2>&1 | tail -n 30 | tee "$OUT/gpu_tests_bwd.log"
bench 50 f16_u2_dm16_fold
bench 50 f16_u2_fold
bench 50 f16_u2_dm16
bench 60 mosaic_bwd3
echo "== done at ${SECONDS}s"
