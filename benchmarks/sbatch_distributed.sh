#!/bin/bash
# Template: the pipelined GPT step on SLURM, one process per GPU, over jax.distributed.
#
#   sbatch benchmarks/sbatch_distributed.sh                     # 2 nodes x 8 GPUs, 16 stages
#   sbatch --nodes=1 --ntasks-per-node=4 --gpus-per-node=4 \
#          benchmarks/sbatch_distributed.sh --stages 4          # extra args go to the script
#
# Each task runs `jaxpp.runtime.initialize()`, which lets JAX read the SLURM variables
# (coordinator = the first node, process id = SLURM_PROCID). If a task dies or stops
# answering, the others stop within JAXPP_TIMEOUT seconds naming the rank and host they
# lost; --kill-on-bad-exit then ends the job step, so no task is left behind.
#SBATCH --job-name=jaxpp-pipeline
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=jaxpp-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
export JAXPP_TIMEOUT="${JAXPP_TIMEOUT:-60}"   # seconds without a heartbeat = lost peer
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-.venv/bin/python}"
STAGES=$(( SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE ))
OUT="benchmarks/results/distributed_train_${SLURM_JOB_NUM_NODES}x${SLURM_NTASKS_PER_NODE}_${SLURM_JOB_ID}.json"

# One GPU per task: every task sees the node's GPUs and JAX's SLURM detection gives
# task SLURM_LOCALID the GPU of that index (so do not bind GPUs per task here).
# Stage r runs on global process r (ranks follow process order, see stage_mesh).
srun --kill-on-bad-exit=1 \
    "$PYTHON" benchmarks/distributed_train.py --stages "$STAGES" --out "$OUT" "$@"
