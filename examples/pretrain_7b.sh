#!/usr/bin/env bash
# LLaMA-2 7B continual pre-training on the Me-LLaMA mix: examples/configs/llama2_7b.yaml
# (1 node(s) x 8 GPUs). Same variables and overrides as pretrain_70b.sh:
#   NNODES=1 NODE_RANK=<rank> MASTER_ADDR=<node 0> bash examples/pretrain_7b.sh [overrides...]
set -euo pipefail
CONFIG=examples/configs/llama2_7b.yaml NNODES=${NNODES:-1} exec bash "$(dirname "$0")/pretrain_70b.sh" "$@"
