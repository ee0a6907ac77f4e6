#!/usr/bin/env bash
# LLaMA-2 13B continual pre-training on the Me-LLaMA mix: examples/configs/llama2_13b.yaml
# (4 node(s) x 8 GPUs). Same variables and overrides as pretrain_70b.sh:
#   NNODES=4 NODE_RANK=<rank> MASTER_ADDR=<node 0> bash examples/pretrain_13b.sh [overrides...]
set -euo pipefail
CONFIG=examples/configs/llama2_13b.yaml NNODES=${NNODES:-4} exec bash "$(dirname "$0")/pretrain_70b.sh" "$@"
