"""The embedded default: the three Me-LLaMA stages on a tiny LLaMA and data this project writes itself.

    melama demo                # about 3 minutes on 2 CPU cores, outputs under outputs/demo/

Each step is the real tool a user runs on real data:
  Continual pre-training
  1. write a synthetic three-domain corpus (biomedical-, clinical-, general-style JSONL; no real text)
  2. train a LLaMA-style sentencepiece tokenizer on it              (melama train-tokenizer)
  3. tokenise each domain into Megatron .bin/.idx datasets           (melama preprocess)
  4. pretrain the tiny preset with TP=2 on 2 CPU processes (torchrun + gloo), blending the domains
     15:1:4 as Me-LLaMA does; stop half-way with a checkpoint       (melama train, training.stop_after_step)
  5. run the same command again: it resumes from the checkpoint and finishes
  Instruction tuning (Me-LLaMA-chat)
  6. write a synthetic medical instruction set, with questions shaped like the evaluation's (their
     answer formats; none of its test records), and tokenise it with the Me-LLaMA chat template,
     loss on answers only                                           (melama preprocess-sft)
  7. train LoRA adapters on the pretrained model, conversations packed, TP=2   (melama train, peft.*)
  8. export the base to Hugging Face and the adapters to PEFT (naming that base), and answer one
     prompt with them in the template the export carries
     (melama convert export-hf / export-peft; AutoPeftModelForCausalLM generates)
  Evaluation
  9. a tiny MIBE run (PubMedQA-, MedNLI-, NER- and summarisation-shaped records) on
     lm-evaluation-harness of the base (plain prompts) and of the chat model (the template it was
     tuned with), scored under both extractors, and a base-vs-chat table      (melama eval)
 10. one report over both runs and both evaluations: curves, scores, the change against the base
     (melama report; pictures with the `report` extra)
Steps 8-10 need the `eval` extra (transformers, peft, lm-eval); without it the demo ends after 7.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from melama_mcore.config.job_config import load_config
from melama_mcore.data.preprocess import preprocess
from melama_mcore.data.sft.preprocess import preprocess_sft
from melama_mcore.data.train_tokenizer import train_sentencepiece
from melama_mcore.demo.corpus import write_demo_corpus
from melama_mcore.demo.instructions import write_mibe_format_instructions, write_synthetic_instructions
from melama_mcore.demo.mibe import held_out_queries, run_demo_evaluation
from melama_mcore.distributed.launch import free_local_port
from melama_mcore.errors import UserError
from melama_mcore.report.build import REPORT_HTML, REPORT_MD, make_report

# Shipped in the package (examples/configs/tiny_cpu.yaml links here), so an installed copy finds it too.
DEFAULT_RECIPE = Path(__file__).with_name("tiny_cpu.yaml")
DOMAINS = {"biomedical": 15, "clinical": 1, "general": 4}
# The chat stage's sequences are the tiny preset's whole context: with the demo's small tokenizers a
# MIBE-shaped question takes 100-200 tokens, and cutting it at the recipe's 128 cut off its answer.
# 1e-2 is about the largest rate the adapters train at without diverging (2e-2 did). The loss is
# averaged per sample, not per token: a one-word answer ("yes", "neutral") then weighs as much as a
# long letter; per token, the long answers drowned the short ones, and the tuned model never learnt
# the answer formats it is scored on.
CHAT_SEQ_LENGTH = 256
CHAT = ["peft.method=lora", "peft.rank=8", "peft.alpha=16", "optimizer.lr=1e-2", "optimizer.min_lr=1e-3",
        "training.global_batch_size=16", "checkpoint.save_interval=1000", f"training.seq_length={CHAT_SEQ_LENGTH}",
        "training.loss_normalization=sample"]
CHAT_STEPS_PER_PRETRAINING_STEP = 0.8  # 80 LoRA steps after the recipe's 100
MIBE_FORMAT_SAMPLES = 1000  # instruction samples shaped like the evaluation's records, beside the 600 others
PROMPT = "What is the usual first-line treatment for type 2 diabetes?"
STEPS = 10


def _say(step: int, message: str) -> None:
    print(f"[demo] {step}/{STEPS} {message}", flush=True)


def prepare_data(out: Path, docs_per_source: int, vocab_size: int) -> tuple[Path, list[dict]]:
    """Steps 1-3: corpus, tokenizer, indexed datasets. Returns the tokenizer path and the blend."""
    _say(1, f"writing the synthetic corpus ({docs_per_source} documents per domain) to {out / 'corpus'}")
    corpus = write_demo_corpus(out / "corpus", docs_per_source=docs_per_source, seed=0)
    _say(2, f"training a {vocab_size}-piece BPE sentencepiece tokenizer")
    tokenizer = train_sentencepiece([str(p) for p in corpus.values()], str(out / "tokenizer" / "demo"),
                                    vocab_size=vocab_size, seed=0)
    _say(3, "tokenising each domain into Megatron indexed datasets")
    blend = []
    for name, path in corpus.items():
        prefix = out / "data" / name
        preprocess([str(path)], str(prefix), str(tokenizer), append_eod=True, workers=2, progress=False)
        blend.append({"name": name, "weight": DOMAINS[name], "train": [f"{prefix}_text_document"]})
    return tokenizer, blend


def prepare_instructions(out: Path, tokenizer: Path, seq_length: int) -> list[dict]:
    """Step 6: the synthetic instruction set through preprocess-sft (Me-LLaMA's template). Returns the blend."""
    _say(6, "writing a synthetic medical instruction set and tokenising it with the Me-LLaMA chat template")
    files = [*write_synthetic_instructions(out / "instructions", samples=600, seed=0).values(),
             write_mibe_format_instructions(out / "instructions", samples=MIBE_FORMAT_SAMPLES,
                                            held_out=held_out_queries())]
    prefix = out / "data" / "instructions"
    summary = preprocess_sft([str(p) for p in files], str(prefix), str(tokenizer), seq_length=seq_length,
                             truncation="truncate", workers=2, progress=False)
    return [{"name": "instructions", "weight": 1, "train": [summary.prefix]}]


def run_training(config: Path, overrides: list[str], nproc: int, log_path: Path) -> None:
    """One torchrun launch of `melama train`; its output goes to the console and to log_path."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_local_port()), "-m", "melama_mcore.train", "--config", str(config), *overrides]
    _run(cmd, log_path, show=("step ", "resumed", "validation", "stopped", "trainable", "error"))


def _run(cmd: list[str], log_path: Path, show: tuple[str, ...] = ("error",)) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            if any(word in line for word in show) or line.startswith("error"):
                print("    " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise UserError(f"{Path(cmd[-1]).name if cmd else 'a step'} failed (exit {proc.returncode}); "
                            f"the full log is {log_path}")


def export_and_answer(run_dir: Path, chat_dir: Path, out: Path, log_path: Path) -> tuple[Path, Path, str]:
    """Step 8: the pretrained base as a Hugging Face folder (with its tokenizer), the adapters as a
    PEFT adapter naming that base, and AutoPeftModelForCausalLM answering one prompt, wrapped by the
    tokenizer's own chat template (the one the adapters were tuned with, which the export carries)."""
    _say(8, "exporting the base to Hugging Face and the adapters to PEFT; answering one prompt with them")
    base, adapter = out / "hf" / "base", out / "hf" / "chat-lora"
    melama = [sys.executable, "-m", "melama_mcore.cli", "convert"]
    _run(melama + ["export-hf", "--ckpt", str(run_dir), "--out", str(base)], log_path)
    _run(melama + ["export-peft", "--ckpt", str(chat_dir), "--out", str(adapter), "--base-hf", str(base)], log_path)

    import torch
    import transformers
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # a bar per weight load: noise in the demo's output

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)
    # export-peft writes the template the adapters were tuned with (step 6's me-llama) into the tokenizer files.
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return base, adapter, answer.strip()


def write_report(run_dir: Path, chat_dir: Path, evaluations: dict[str, Path], out: Path) -> Path:
    """Step 10: `melama report` over both runs and both evaluations, the change against the base."""
    _say(10, "one report over both runs and both evaluations, against the base (melama report)")
    report = make_report([run_dir, chat_dir, *evaluations.values()], out / "report",
                         labels=["pre-training", "chat (LoRA)", *evaluations], baseline="base")
    if report.pictures_missing:
        print(f"    no pictures: {report.pictures_missing}", flush=True)
    return report.folder


def summarize(run_dir: Path, chat_dir: Path, out: Path, answer: str | None, seconds: float) -> str:
    def records(folder: Path) -> tuple[list[dict], list[dict]]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r], [r for r in rows if "eval" in r]

    steps, evals = records(run_dir)
    chat_steps, chat_evals = records(chat_dir)
    tokens_per_s = sum(r["tokens_per_s"] for r in steps) / len(steps)
    lines = [
        "",
        "melama demo: done",
        f"  pre-training   loss {steps[0]['loss']:.3f} (step {steps[0]['step']}) -> {steps[-1]['loss']:.3f} "
        f"(step {steps[-1]['step']}), {tokens_per_s:,.0f} tokens/s on CPU (TP=2, 2 processes)",
    ]
    if evals:
        per_source = ", ".join(f"{k} {v['loss']:.3f}" for k, v in evals[-1]["eval"].items())
        lines.append(f"  validation     {per_source}")
    efficiency = chat_steps[-1].get("packing_efficiency")
    lines.append(f"  LoRA chat      loss {chat_steps[0]['loss']:.3f} -> {chat_steps[-1]['loss']:.3f} over "
                 f"{chat_steps[-1]['step']} steps" + (f", sequences {efficiency:.0%} full (packed)" if efficiency else ""))
    if answer is not None:
        lines.append(f"  chat answer    {PROMPT!r} -> {answer!r}")
    lines += [
        f"  wall time      {seconds:.0f} s",
        f"  data           {out / 'corpus'}, {out / 'instructions'} -> {out / 'data'}",
        f"  tokenizer      {out / 'tokenizer' / 'demo.model'}",
        f"  runs           {run_dir} (resumed once half-way), {chat_dir} (adapters only)",
        f"  metrics        {run_dir / 'metrics.jsonl'}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})",
    ]
    if answer is not None:
        lines += [f"  exports        {out / 'hf' / 'base'} (Hugging Face), {out / 'hf' / 'chat-lora'} (PEFT adapter)",
                  f"  evaluation     {out / 'eval' / 'base'}, {out / 'eval' / 'chat'} (results.json, results.md)",
                  f"  report         {out / 'report' / REPORT_HTML} (and {REPORT_MD})"]
    lines.append(f"  logs           {out / 'train.log'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melama demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything goes (default: %(default)s)")
    parser.add_argument("--config", default=str(DEFAULT_RECIPE),
                        help="pre-training recipe (default: the packaged tiny_cpu.yaml, also at examples/configs/tiny_cpu.yaml)")
    parser.add_argument("--docs-per-source", type=int, default=1500, help="synthetic documents per domain")
    parser.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary size")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (TP=2 needs 2)")
    parser.add_argument("overrides", nargs="*",
                        help="pre-training overrides, e.g. training.train_iters=10 for a quick run (LoRA then "
                             "trains half as many steps)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    out = Path(args.output_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: remove it or pass --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.log"
    tokenizer, blend = prepare_data(out, args.docs_per_source, args.vocab_size)

    # Continual pre-training, stopped half-way and resumed.
    run_dir = out / "run"
    overrides = [f"output_dir={run_dir}", f"data.tokenizer={tokenizer}", f"data.blend={json.dumps(blend)}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)  # fail fast on a bad override, before launching
    half = max(1, cfg.training.train_iters // 2)
    _say(4, f"pretraining the '{cfg.model.preset}' preset with TP={cfg.parallel.tensor_parallel} on "
            f"{args.nproc} CPU processes; stopping after step {half} of {cfg.training.train_iters}")
    run_training(Path(args.config), overrides + [f"training.stop_after_step={half}"], args.nproc, log_path)
    _say(5, "running the same command again: it resumes from the checkpoint")
    run_training(Path(args.config), overrides, args.nproc, log_path)

    # Instruction tuning: LoRA adapters on the pretrained model.
    chat_blend = prepare_instructions(out, tokenizer, CHAT_SEQ_LENGTH)
    chat_dir = out / "chat"
    lora_steps = max(1, round(cfg.training.train_iters * CHAT_STEPS_PER_PRETRAINING_STEP))
    _say(7, f"training LoRA adapters on the pretrained model for {lora_steps} steps (packed conversations, "
            "loss on answers)")
    run_training(Path(args.config), [f"output_dir={chat_dir}", f"data.tokenizer={tokenizer}",
                                     f"data.blend={json.dumps(chat_blend)}", f"checkpoint.init_from={run_dir}",
                                     *CHAT, f"training.train_iters={lora_steps}",
                                     f"logging.log_interval={max(1, lora_steps // 4)}"], args.nproc, log_path)

    answer = None
    missing = [m for m in ("transformers", "peft", "lm_eval") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"[demo] steps 8-10 (export, chat answer, evaluation, report) need {', '.join(missing)}: "
              "pip install 'melama-mcore[eval]'", flush=True)
    else:
        base, adapter, answer = export_and_answer(run_dir, chat_dir, out, log_path)
        _say(9, "a tiny MIBE evaluation of the base and the chat model on lm-evaluation-harness")
        # lm-eval's progress bars (a few per task, each over in a blink) go to the log with the other
        # steps' output; the evaluation's own log lines and its table stay on the console.
        with open(log_path, "a") as log, contextlib.redirect_stderr(log):
            evaluations = run_demo_evaluation(base, adapter, out)
        write_report(run_dir, chat_dir, evaluations, out)
    print(summarize(run_dir, chat_dir, out, answer, time.time() - start))
    return 0


if __name__ == "__main__":
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
