"""`melama convert`: Hugging Face LLaMA-2 checkpoints into this project's checkpoints and back, and
LoRA adapters out to Hugging Face PEFT.

    melama convert import-hf --hf-dir Llama-2-7b-hf --out ckpt/llama2-7b --tp 2 --pp 1
    melama train ... checkpoint.init_from=ckpt/llama2-7b model.preset=llama2-7b
    melama convert export-hf --ckpt outputs/run --out me-llama-7b-hf --dtype bf16
    melama convert export-peft --ckpt outputs/chat --out me-llama-7b-chat-lora --base-hf me-llama-7b-hf
    melama convert export-hf --ckpt outputs/chat --out me-llama-7b-chat-hf --merge-lora

The conversions are the checkpoint room's library (checkpoint/convert.py); `--verify` is the trunk's
logits against transformers' (melama_mcore/logits.py), run before the output is published.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import resource
import sys
from pathlib import Path

import torch

from melama_mcore.checkpoint.convert import DEFAULT_SHARD_BYTES, DTYPES, export_hf, export_peft, import_hf
from melama_mcore.cli import positive_int
from melama_mcore.errors import UserError
from melama_mcore.output_paths import check_new_folder

log = logging.getLogger(__name__)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_verify_possible() -> None:
    """--verify loads the result with transformers and runs the framework's model on CPU: refuse
    before converting when either cannot happen here."""
    if importlib.util.find_spec("transformers") is None:
        raise UserError("--verify compares the logits with transformers', which is not installed: "
                        "pip install melama-mcore[hf] (or drop --verify)")
    if torch.cuda.is_available():
        raise UserError("--verify runs the framework's model on CPU, which megatron allows only with CUDA hidden: "
                        "prefix the command with CUDA_VISIBLE_DEVICES= (or drop --verify)")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB or 500MB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama convert",
        description="Convert LLaMA-2 checkpoints between Hugging Face (safetensors or .bin) and this project's "
                    "megatron dist-checkpoints, and LoRA adapters to Hugging Face PEFT. Both directions stream "
                    "(about one decoder layer in memory) and write atomically (nothing appears at --out unless "
                    "the conversion, and --verify when asked, succeed).")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import-hf", help="HF folder -> weights-only dist-checkpoint for `checkpoint.init_from`",
        description="Read config.json + weights of a HF LlamaForCausalLM and write a weights-only megatron "
                    "checkpoint. Train from it with checkpoint.init_from=OUT and the model fields written in "
                    "OUT/config.yaml (a run with another architecture is refused). The checkpoint loads at any "
                    "TP/PP/VP; --tp/--pp/--vp name the layout it is validated and chunked for, and --tp sets the "
                    "vocabulary padding (a multiple of 128 x TP; a run at another TP loads the real rows and "
                    "pads its own way). Pickled .bin weights are read with torch's weights_only loader.")
    imp.add_argument("--hf-dir", required=True, type=Path, help="folder with config.json and *.safetensors or *.bin")
    imp.add_argument("--out", required=True, type=Path, help="new folder for the checkpoint (must not exist)")
    imp.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size to validate and pad for (default 1)")
    imp.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size to validate for (default 1)")
    imp.add_argument("--vp", type=positive_int, default=None, help="virtual pipeline stages per rank (default none)")
    imp.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128, metavar="N",
                     help="pad the vocabulary to a multiple of N x TP, as the trunk does (default 128)")
    imp.add_argument("--verify", action="store_true",
                     help="before publishing, compare fp32 logits of transformers and the framework on a few "
                          "tokens (loads both full models in memory; needs transformers: melama-mcore[hf])")
    exp = sub.add_parser(
        "export-hf", help="dist-checkpoint -> HF safetensors folder (with --merge-lora: adapters merged)",
        description="Write a checkpoint of this project (a run's folder or its checkpoints/ folder: the latest; "
                    "one iter_* folder; a weights-only folder; saved at any TP/PP) as sharded safetensors with "
                    "model.safetensors.index.json and config.json, loadable by "
                    "transformers.AutoModelForCausalLM.from_pretrained. Vocabulary padding is stripped; the "
                    "architecture, context length, RoPE base and norm eps are the checkpoint's. The tokenizer "
                    "the run trained with (data.tokenizer in the checkpoint's config.yaml) is copied alongside, "
                    "so AutoTokenizer, lm-eval and vLLM load the folder as it is; an import records its Hugging Face "
                    "folder's tokenizer.model, if it had one (--tokenizer gives another). With --merge-lora, --ckpt is an adapter checkpoint (a run "
                    "with peft.method=lora) and the adapters are merged into the weights of its base.")
    exp.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder (see above)")
    exp.add_argument("--out", required=True, type=Path, help="new folder for the HF model (must not exist)")
    exp.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                     help="weights dtype (default auto: as stored in the checkpoint)")
    exp.add_argument("--tokenizer", type=Path,
                     help="a sentencepiece .model or a HF tokenizer folder to copy alongside instead of the run's; "
                          "also the vocabulary size when the checkpoint records none")
    exp.add_argument("--allow-tokenizer-mismatch", action="store_true",
                     help="export with a --tokenizer whose vocabulary differs from the one the checkpoint records "
                          "(refused otherwise)")
    exp.add_argument("--merge-lora", action="store_true",
                     help="--ckpt is an adapter checkpoint: write its base with the LoRA adapters merged in")
    exp.add_argument("--base", type=Path,
                     help="with --merge-lora: the base model (default: the checkpoint.init_from the adapter run "
                          "recorded)")
    exp.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                     help="per safetensors file (default 5GB)")
    exp.add_argument("--verify", action="store_true",
                     help="before publishing, compare fp32 logits of the framework and of transformers on the "
                          "export, within a bound that follows --dtype (needs transformers: melama-mcore[hf])")
    peft = sub.add_parser(
        "export-peft", help="adapter checkpoint -> Hugging Face PEFT adapter folder",
        description="Write the LoRA adapters of an adapter checkpoint (a run with peft.method=lora; its folder, "
                    "checkpoints/ folder or one iter_* folder; saved at any TP/PP) as a PEFT adapter: "
                    "adapter_config.json (peft_type LORA, r, lora_alpha, target_modules in Hugging Face names) "
                    "and adapter_model.safetensors, which peft.PeftModel.from_pretrained loads on the base "
                    "exported with `melama convert export-hf`. adapter_config.json names the Hugging Face base "
                    "(base_model_name_or_path), so that peft.AutoPeftModelForCausalLM.from_pretrained(OUT) loads "
                    "both: --base-hf, else the folder the base was imported from with `melama convert import-hf` "
                    "(recorded in its model_identity.json) if it still holds the base's weights, else none.")
    peft.add_argument("--ckpt", required=True, type=Path, help="adapter checkpoint (see above)")
    peft.add_argument("--out", required=True, type=Path, help="new folder for the adapter (must not exist)")
    peft.add_argument("--base", type=Path,
                      help="the base model the adapters were trained on (default: the checkpoint.init_from the "
                           "adapter run recorded); checked against the architecture the adapters recorded")
    peft.add_argument("--base-hf", metavar="PATH_OR_ID",
                      help="the Hugging Face model adapter_config.json names as the base: a folder holding the "
                           "base's weights (its `melama convert export-hf`; checked: architecture and norm weights), "
                           "or a Hub model id such as meta-llama/Llama-2-7b-hf (taken as given)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    check_new_folder(args.out, "--out")  # before anything is read: the output is published whole, never replaced
    if args.command == "export-hf" and args.base is not None and not args.merge_lora:
        raise UserError("--base names the base model of --merge-lora: add --merge-lora, or leave --base out")
    verify = None
    if getattr(args, "verify", False):
        check_verify_possible()  # before converting
        from melama_mcore.logits import verify_conversion  # megatron loads only for --verify

        verify = verify_conversion
    if args.command == "import-hf":
        import_hf(args.hf_dir, args.out, args.tp, args.pp, args.vp, args.make_vocab_size_divisible_by, verify)
    elif args.command == "export-hf":
        export_hf(args.ckpt, args.out, args.dtype, args.tokenizer, args.max_shard_size, merge_lora=args.merge_lora,
                  base=args.base, verify=verify, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    else:
        export_peft(args.ckpt, args.out, args.base, args.base_hf)
    log.info("wrote %s (peak RSS %.0f MiB)", args.out, peak_rss_mib())
    return 0


if __name__ == "__main__":  # the guard matters: megatron's checkpoint code may spawn into this module
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
