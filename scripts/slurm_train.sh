#!/bin/bash
# Multi-node MDETR training under Slurm: one torchrun per node, one training process per GPU. The first
# node of the allocation is the rendezvous point; torchrun gives every process RANK, WORLD_SIZE and
# LOCAL_RANK, and `mdetr train` joins the NCCL process group from them.
#
#   sbatch scripts/slurm_train.sh CONFIG.yaml [section.key=value ...]
#   sbatch --nodes 8 scripts/slurm_train.sh configs/pretrain.yaml train.output_dir=runs/pretrain
#
# Resume an interrupted run by passing --resume runs/pretrain/last among the arguments.
#SBATCH --job-name=mdetr-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml [section.key=value ...]}
shift

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

# One task per node (--ntasks-per-node=1): srun starts torchrun once on each node.
srun torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \
    --rdzv-id "$SLURM_JOB_ID" \
    -m mdetr.cli train --config "$CONFIG" --no-progress train.device=cuda "$@"
