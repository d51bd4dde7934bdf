#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, which starts one process per GPU.
#   sbatch --nodes=2 launch/slurm_train.sh llama3_70b_eagle3 [key=value ...]
# Run from the repository root, with the virtualenv active (sbatch passes the environment on).
# run.output_dir must be on a filesystem every node sees. SIGTERM (scancel, or --signal below five
# minutes before the time limit) makes every rank finish its step and write a checkpoint; submitting
# the same command again resumes from it.
#SBATCH --job-name=eagle_online
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch launch/slurm_train.sh RECIPE [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
# c10d rendezvous: every node's torchrun finds the others through node 0, so no per-node rank is needed.
srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${SLURM_JOB_ID:-eagle}" \
  launch/train.py --recipe "$RECIPE" "$@"
