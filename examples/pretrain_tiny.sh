#!/usr/bin/env bash
# The tiny CPU demo: synthetic medical-style corpus -> tokenizer -> indexed datasets -> a tiny LLaMA
# pretrained with TP=2 on 2 CPU processes, checkpointed, resumed. About a minute on 2 cores.
#   bash examples/pretrain_tiny.sh [--output-dir DIR] [training overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m melama_mcore.demo.command "$@"
