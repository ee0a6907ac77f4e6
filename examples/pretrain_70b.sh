#!/usr/bin/env bash
# Me-LLaMA 70B continual pre-training on 20 nodes x 8 GPUs (examples/configs/llama2_70b_me_llama.yaml).
#
# Run this script once per node (your scheduler, pdsh, or by hand):
#   NNODES=20 NODE_RANK=<0..19> MASTER_ADDR=<node 0 hostname> bash examples/pretrain_70b.sh [overrides...]
# Extra arguments are config overrides, e.g. training.train_iters=100 logging.eval_interval=50.
# The script runs from the repository root: relative paths (CONFIG, overrides) are relative to it.
# On SLURM use examples/pretrain_70b.slurm (srun starts one task per GPU, no torchrun). Rerunning the same command resumes from the
# latest complete checkpoint (after a crash, preemption or time limit).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-examples/configs/llama2_70b_me_llama.yaml}
NNODES=${NNODES:-20}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

# NCCL: keep TP traffic on NVLink, one communicator stream per device (megatron's overlap needs it).
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# CPU threads per rank: 8, or the node's cores shared among its ranks if fewer (CPU-only runs).
CORES_PER_RANK=$(( $(getconf _NPROCESSORS_ONLN) / GPUS_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES_PER_RANK < 1 ? 1 : CORES_PER_RANK > 8 ? 8 : CORES_PER_RANK ))}

exec torchrun \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m melama_mcore.train --config "$CONFIG" "$@"
