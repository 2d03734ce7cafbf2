#!/bin/bash
# Template: the throughput race (`jaxpp bench pipeline`, issue 6) as a SLURM job.
#
#   sbatch benchmarks/sbatch_bench.sh                                   # 8B on 4 GPUs, the plan
#   sbatch --gpus-per-node=2 --export=ALL,MODEL=2b benchmarks/sbatch_bench.sh
#   sbatch --export=ALL,CONFIGS=spmd/fsdp4/acc4/noremat,jaxpp/zbv/pp4/mb32/noremat \
#          benchmarks/sbatch_bench.sh
#
# ONE node, ONE task: the benchmark is single-controller (one Python process drives every
# GPU of the node; jaxpp's LocalExecutor, jax.jit over all local devices). It is not
# multi-controller safe, so do not raise --nodes or --ntasks: its state and batch are
# placed from host arrays with device_put, the reference loss runs on jax.devices()[0],
# losses are read with float(), memory is read from local devices only, every process
# would write the results file, and --isolate children are spawned per process.
# Larger scales are predicted, not run: feed a measured row to the cluster what-if model,
#   python benchmarks/cluster_whatif.py --from-bench RESULTS.json --config NAME \
#       --cluster nodes=64,gpus_per_node=8,ib=400Gbps
#
# Each configuration runs in its own process (--isolate): an OOM or a crash fails only
# its row, and memory peaks are per configuration; one running past CONFIG_TIMEOUT s gets a
# `timeout` row naming its phase. The children share a compilation cache (CACHE_DIR), so a
# resubmitted job loads what an earlier one compiled. Output lines carry [+seconds] stamps. Configurations predicted not to fit
# are skipped before compiling ("predicted OOM: X GiB > Y GiB" rows). Results merge into
# one JSON per model (+ .md table, .png chart, traces/) under benchmarks/results/.
#SBATCH --job-name=jaxpp-bench
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --output=jaxpp-bench-%j.out
set -euo pipefail

REPO="${SLURM_SUBMIT_DIR:-$PWD}"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"   # an environment with jaxpp installed
MODEL="${MODEL:-8b}"
GPUS="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}"
OUT="${OUT:-$REPO/benchmarks/results/bench_${MODEL}_${GPUS}x_${SLURM_JOB_ID:-local}.json}"
export PYTHONUNBUFFERED=1
# JAX may allocate 0.75 of each GPU by default; both sides get the same 0.9.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# NVLink multicast (NVLS) off, as on the machines the first results come from; remove
# these on a cluster where NVLS is supported and wanted (then say so with the results).
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"

# The strongest predicted-to-fit candidates of each side (the docstring of
# jaxpp/_cli_bench.py lists them with their predicted GiB); CONFIGS overrides.
case "$MODEL" in
  8b) PLAN="spmd/fsdp4/acc4/noremat,spmd/dp2-tp2/acc8/noremat,spmd/fsdp4/acc2/noremat,\
spmd/tp4/acc4/noremat,spmd/fsdp2-tp2/acc4/noremat,spmd/fsdp4/acc1/remat,\
jaxpp/zbv/pp4/mb32/noremat,jaxpp/zb-h1/pp4/mb32/noremat,jaxpp/dualpipev/pp4/mb32/noremat,\
jaxpp/1f1b/pp4/mb32/noremat,jaxpp/interleaved-1f1b/pp4/mb32/noremat,jaxpp/1f1b/pp4/mb16/noremat" ;;
  2b) PLAN="spmd/dp2/acc2/noremat,spmd/fsdp2/acc2/noremat,spmd/tp2/acc2/noremat,\
jaxpp/zbv/pp2/mb16/noremat,jaxpp/zb-h1/pp2/mb16/noremat,jaxpp/dualpipev/pp2/mb16/noremat,\
jaxpp/1f1b/pp2/mb16/noremat,jaxpp/zbv/pp2/mb8/noremat,jaxpp/interleaved-1f1b/pp2/mb16/noremat" ;;
  *) PLAN="" ;;
esac
CONFIGS="${CONFIGS:-$PLAN}"
if [ -z "$CONFIGS" ]; then
  echo "sbatch_bench.sh: no plan for MODEL=$MODEL; set CONFIGS=name,name,..." >&2
  exit 2
fi

# Run from an empty folder: a `jaxpp/` in the working directory (the repository root)
# would shadow the installed package under `python -m`.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# The plan with each configuration's predicted peak GiB per device (the run itself gates
# on the limit JAX reports for the real GPU).
"$PYTHON" -m jaxpp.cli bench pipeline --model "$MODEL" --devices "$GPUS" --list \
    --configs "$CONFIGS" --device-kind "${DEVICE_KIND:-h200}"
srun --ntasks=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m jaxpp.cli bench pipeline --model "$MODEL" --devices "$GPUS" --isolate \
    --steps "${STEPS:-10}" --warmup "${WARMUP:-2}" --configs "$CONFIGS" --out "$OUT" \
    --config-timeout "${CONFIG_TIMEOUT:-900}" --cache-dir "${CACHE_DIR:-$REPO/.cache/jaxpp-bench}"
