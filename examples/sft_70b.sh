#!/usr/bin/env bash
# Me-LLaMA-70B-chat: LoRA instruction tuning on one node of 8 GPUs
# (examples/configs/llama2_70b_me_llama_chat.yaml), with the same launcher as pre-training.
#   bash examples/sft_70b.sh [overrides...]          e.g. training.train_iters=100
# Then export the adapter for Hugging Face PEFT (or merge it into the base):
#   melama convert export-peft --ckpt outputs/me-llama-70b-chat --out me-llama-70b-chat-lora --base-hf me-llama-70b-hf
#   melama convert export-hf --ckpt outputs/me-llama-70b-chat --out me-llama-70b-chat-hf --merge-lora --dtype bf16
set -euo pipefail
cd "$(dirname "$0")/.."
export CONFIG=${CONFIG:-examples/configs/llama2_70b_me_llama_chat.yaml}
export NNODES=${NNODES:-1} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
exec bash examples/pretrain_70b.sh "$@"
