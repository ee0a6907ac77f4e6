"""The embedded default: a tiny LLaMA continual-pretraining run on a corpus this project writes itself.

    melama demo                # ~2-4 minutes on 2 CPU cores, outputs under outputs/demo/

Steps, each the real tool a user would run on real data:
  1. write a synthetic three-domain corpus (biomedical-, clinical-, general-style JSONL; no real text)
  2. train a LLaMA-style sentencepiece tokenizer on it              (melama train-tokenizer)
  3. tokenise each domain into Megatron .bin/.idx datasets           (melama preprocess)
  4. pretrain the tiny preset with TP=2 on 2 CPU processes (torchrun + gloo), blending the domains
     15:1:4 as Me-LLaMA does; stop half-way with a checkpoint       (melama train, training.stop_after_step)
  5. run the same command again: it resumes from the checkpoint and finishes
  6. print a summary: first and last loss, tokens/s, per-domain validation loss, where things are
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from melama_mcore.errors import UserError

# Shipped in the package (examples/configs/tiny_cpu.yaml links here), so an installed copy finds it too.
DEFAULT_RECIPE = Path(__file__).with_name("tiny_cpu.yaml")
DOMAINS = {"biomedical": 15, "clinical": 1, "general": 4}


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def prepare_data(out: Path, docs_per_source: int, vocab_size: int) -> tuple[Path, list[dict]]:
    """Steps 1-3: corpus, tokenizer, indexed datasets. Returns the tokenizer path and the blend."""
    from melama_mcore.data.preprocess import preprocess
    from melama_mcore.commands.demo_corpus import write_demo_corpus
    from melama_mcore.data.train_tokenizer import train_sentencepiece

    _say(f"1/6 writing the synthetic corpus ({docs_per_source} documents per domain) to {out / 'corpus'}")
    corpus = write_demo_corpus(out / "corpus", docs_per_source=docs_per_source, seed=0)
    _say(f"2/6 training a {vocab_size}-piece BPE sentencepiece tokenizer")
    tokenizer = train_sentencepiece([str(p) for p in corpus.values()], str(out / "tokenizer" / "demo"),
                                    vocab_size=vocab_size, seed=0)
    _say("3/6 tokenising each domain into Megatron indexed datasets")
    blend = []
    for name, path in corpus.items():
        prefix = out / "data" / name
        preprocess([str(path)], str(prefix), str(tokenizer), append_eod=True, workers=2, progress=False)
        blend.append({"name": name, "weight": DOMAINS[name], "train": [f"{prefix}_text_document"]})
    return tokenizer, blend


def run_training(config: Path, overrides: list[str], nproc: int, log_path: Path) -> None:
    """One torchrun launch of `melama train`; its output goes to the console and to log_path."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), "-m", "melama_mcore.train", "--config", str(config), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if "step " in line or "resumed" in line or "validation" in line or "stopped" in line or "error" in line.lower():
                print("    " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise UserError(f"training failed (exit {proc.returncode}); the full log is {log_path}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(run_dir: Path, out: Path, seconds: float) -> str:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    tokens_per_s = sum(r["tokens_per_s"] for r in steps) / len(steps)
    lines = [
        "",
        "melama demo: done",
        f"  loss           {steps[0]['loss']:.3f} (step {steps[0]['step']}) -> {steps[-1]['loss']:.3f} (step {steps[-1]['step']})",
        f"  throughput     {tokens_per_s:,.0f} tokens/s on CPU (TP=2, 2 processes, fp32)",
    ]
    if evals:
        per_source = ", ".join(f"{k} {v['loss']:.3f}" for k, v in evals[-1]["eval"].items())
        lines.append(f"  validation     {per_source}")
    lines += [
        f"  wall time      {seconds:.0f} s",
        f"  corpus         {out / 'corpus'}",
        f"  tokenizer      {out / 'tokenizer' / 'demo.model'}",
        f"  datasets       {out / 'data'}",
        f"  checkpoints    {run_dir / 'checkpoints'}  (resumed once half-way)",
        f"  metrics        {run_dir / 'metrics.jsonl'}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})",
        f"  training log   {out / 'train.log'}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melama demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything goes (default: %(default)s)")
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="training recipe (default: the packaged tiny_cpu.yaml, "
                        "also at examples/configs/tiny_cpu.yaml)")
    parser.add_argument("--docs-per-source", type=int, default=1500, help="synthetic documents per domain")
    parser.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary size")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (TP=2 needs 2)")
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. training.train_iters=100")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from melama_mcore.config.job_config import load_config

    start = time.time()
    out = Path(args.output_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: remove it or pass --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, blend = prepare_data(out, args.docs_per_source, args.vocab_size)

    run_dir = out / "run"
    overrides = [f"output_dir={run_dir}", f"data.tokenizer={tokenizer}", f"data.blend={json.dumps(blend)}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)  # fail fast on a bad override, before launching
    half = max(1, cfg.training.train_iters // 2)
    log_path = out / "train.log"
    _say(f"4/6 pretraining the '{cfg.model.preset}' preset with TP={cfg.parallel.tensor_parallel} on "
         f"{args.nproc} CPU processes; stopping after step {half} of {cfg.training.train_iters}")
    run_training(Path(args.config), overrides + [f"training.stop_after_step={half}"], args.nproc, log_path)
    _say("5/6 running the same command again: it resumes from the checkpoint")
    run_training(Path(args.config), overrides, args.nproc, log_path)
    _say("6/6 summary")
    print(summarize(run_dir, out, time.time() - start))
    return 0


if __name__ == "__main__":
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
