"""The `melama` command: one entry point, one subcommand per job.

Each subcommand lives in its own module with a `main(argv) -> int`; this file only dispatches, so
`melama train` and `python -m melama_mcore.train` are the same code. A `UserError` is printed as a
one-line message (no traceback) and the process exits with its exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from melama_mcore.distributed.launch import launch_env
from melama_mcore.errors import UserError
from melama_mcore.logs import setup_logging

SUBCOMMANDS = {
    "train": ("melama_mcore.train", "pretrain / continue pre-training a LLaMA model (torchrun-aware)"),
    "demo": ("melama_mcore.demo.command", "the tiny CPU demo: corpus -> tokenizer -> datasets -> train -> resume"),
    "preprocess": ("melama_mcore.data.preprocess", "tokenise JSONL/text into Megatron .bin/.idx"),
    "preprocess-sft": ("melama_mcore.data.sft.preprocess", "tokenise instruction JSONL into token ids + loss masks"),
    "train-tokenizer": ("melama_mcore.data.train_tokenizer", "train a LLaMA-style sentencepiece model"),
    "verify-data": ("melama_mcore.commands.verify_data", "check a .bin/.idx pair (sizes, offsets, token range)"),
    "blend-report": ("melama_mcore.commands.blend_report", "per-source token shares and epochs for a blend"),
    "convert": ("melama_mcore.commands.convert", "Hugging Face <-> megatron checkpoints, LoRA adapters to PEFT"),
    "plan": ("melama_mcore.commands.plan", "parallel layouts that fit, with predicted memory and MFU"),
    "eval": ("melama_mcore.eval.command", "score a checkpoint or HF model on MIBE and lm-eval tasks"),
    "eval-ppl": ("melama_mcore.eval.perplexity", "loss and perplexity of a checkpoint per blend source (torchrun-aware)"),
    "report": ("melama_mcore.commands.report", "runs, perplexities and scores side by side: report.html/.md with pictures"),
}


def positive_int(text: str) -> int:
    """argparse type of the subcommands' counts and sizes."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def run_main(main, argv) -> int:
    """Run a subcommand's main, turning a UserError into a message and an exit code. A config error
    that every rank meets alike (a config error, a checkpoint of another model) is printed by rank 0 only."""
    try:
        launch = launch_env()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    setup_logging(launch.rank, launch.world_size)
    try:
        return int(main(argv) or 0)
    except UserError as err:
        if launch.rank == 0 or not err.same_on_every_rank:
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: melama SUBCOMMAND [--help] ...\n\nsubcommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return run_main(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
