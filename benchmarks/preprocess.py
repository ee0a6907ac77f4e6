#!/usr/bin/env python
"""Preprocessing throughput and peak memory against the tokenizer's own ceiling.

ceiling:    sentencepiece's batched encode of the same documents, already in memory, on the same
            number of cores (`encode(texts, num_threads=workers)`): no reading, parsing or writing.
preprocess: `melama preprocess` end to end (read JSONL, parse, tokenise in workers, write .bin/.idx),
            in a subprocess whose process tree's RSS is sampled for the peak.
Run on the corpus at 1x and at `--scale`x size to show that peak memory does not grow with input.
`--megatron-lm PATH` also times PATH/tools/preprocess_data.py on the same input (optional).
`--long-document MB` instead compares one document of MB megabytes with the same text cut into
10 KB documents (one worker each): tokens/s and peak RSS, and their ratios.

    python benchmarks/preprocess.py --docs-per-source 20000 --workers 2
    python benchmarks/preprocess.py --long-document 80 --tokenizer-model HF_FOLDER_OR_MODEL
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melama_mcore.demo.corpus import write_demo_corpus  # noqa: E402
from melama_mcore.data.train_tokenizer import train_sentencepiece  # noqa: E402


def run_with_peak_rss(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS of the process tree in bytes, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return seconds, peak, out


def ceiling(model: str, inputs: list[Path], workers: int) -> tuple[int, float]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    texts = [json.loads(line)["text"] for path in inputs for line in open(path, encoding="utf-8")]
    start = time.perf_counter()
    ids = sp.encode(texts, num_threads=workers)
    seconds = time.perf_counter() - start
    return sum(map(len, ids)) + len(ids), seconds  # + BOS per document, as preprocess writes


def _preprocess_run(work: Path, src: Path, model: str, workers: int, extra=()) -> tuple[int, float, int]:
    """(tokens written, seconds by preprocess's own timer, peak RSS of the process tree)."""
    cmd = [sys.executable, "-m", "melama_mcore.cli", "preprocess", "--input", str(src), "--output-prefix",
           str(work / f"out_{src.stem}"), "--tokenizer-model", model, "--workers", str(workers), "--no-progress",
           "--overwrite", *extra]
    _, peak, out = run_with_peak_rss(cmd)
    written = int(next(l for l in out.splitlines() if l.startswith("tokens:")).split()[1].replace(",", ""))
    inner = float(next(l for l in out.splitlines() if l.startswith("time:")).split()[1])
    return written, inner, peak


def long_document(work: Path, model: str, megabytes: float) -> None:
    """One document of `megabytes` MB against the same text as 10 KB documents, one worker each."""
    texts = [json.loads(line)["text"] for p in write_demo_corpus(work / "corpus", docs_per_source=2000).values()
             for line in open(p, encoding="utf-8")]
    unit = " ".join(texts)
    size = int(megabytes * 1e6)
    text = (unit * (size // len(unit) + 1))[:size]
    one, many = work / "one.jsonl", work / "many.jsonl"
    one.write_text(json.dumps({"text": text}) + "\n")
    many.write_text("".join(json.dumps({"text": text[i:i + 10_000]}) + "\n" for i in range(0, size, 10_000)))
    results = {}
    for label, src in (("one document", one), ("10 KB documents", many)):
        tokens, seconds, peak = _preprocess_run(work, src, model, 1, ["--max-document-bytes", str(2 * size)])
        results[label] = (tokens / seconds, peak)
        print(f"{label}: {tokens:,} tokens, {tokens / seconds:,.0f} tokens/s, peak RSS {peak / 2**20:,.0f} MiB")
    (rate, peak), (base_rate, base_peak) = results["one document"], results["10 KB documents"]
    print(f"one document / 10 KB documents: {rate / base_rate:.2f}x the rate; {(peak - base_peak) / 2**20:,.0f} MiB "
          f"more memory ({(peak - base_peak) / size:.1f}x the document's size)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs-per-source", type=int, default=20000)
    parser.add_argument("--scale", type=int, default=4, help="also run on the corpus repeated this many times")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--tokenizer-model", default=None, help="default: train a 2,000-token model (the templated corpus supports no more)")
    parser.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout to time as well")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--long-document", type=float, default=None, metavar="MB",
                        help="compare one document of MB megabytes with the same text as 10 KB documents")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="melama-bench-"))
    if args.long_document:
        model = args.tokenizer_model or str(train_sentencepiece(
            [str(p) for p in write_demo_corpus(work / "tok_corpus", docs_per_source=2000).values()],
            str(work / "spm"), vocab_size=2000, overwrite=True))
        long_document(work, model, args.long_document)
        return
    inputs = list(write_demo_corpus(work / "corpus", docs_per_source=args.docs_per_source).values())
    model = args.tokenizer_model or str(train_sentencepiece([str(p) for p in inputs], str(work / "spm"),
                                                            vocab_size=2000, overwrite=True))
    mb = sum(p.stat().st_size for p in inputs) / 1e6
    tokens, seconds = ceiling(model, inputs, args.workers)
    ceiling_rate = tokens / seconds
    print(f"corpus: {mb:.1f} MB, {3 * args.docs_per_source:,} documents; workers: {args.workers}; "
          f"cpu cores: {os.cpu_count()}")
    print(f"ceiling (sentencepiece batched encode, in memory): {ceiling_rate:,.0f} tokens/s")

    scaled = work / "scaled.jsonl"
    with open(scaled, "wb") as f:
        for _ in range(args.scale):
            for p in inputs:
                f.write(p.read_bytes())
    for label, files in (("1x", [str(p) for p in inputs]), (f"{args.scale}x", [str(scaled)])):
        cmd = [sys.executable, "-m", "melama_mcore.cli", "preprocess", "--input", *files, "--output-prefix",
               str(work / f"out_{label}"), "--tokenizer-model", model, "--workers", str(args.workers),
               "--no-progress", "--overwrite"]
        seconds, peak, out = run_with_peak_rss(cmd)
        written = int(next(l for l in out.splitlines() if l.startswith("tokens:")).split()[1].replace(",", ""))
        inner = float(next(l for l in out.splitlines() if l.startswith("time:")).split()[1])
        print(f"preprocess {label}: {written:,} tokens, {written / inner:,.0f} tokens/s "
              f"({written / inner / ceiling_rate:.1%} of ceiling; {written / seconds:,.0f} tokens/s "
              f"including start-up), peak RSS {peak / 2**20:,.0f} MiB")

    if args.megatron_lm:
        merged = work / "merged.jsonl"
        merged.write_bytes(b"".join(p.read_bytes() for p in inputs))
        cmd = [sys.executable, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"), "--input", str(merged),
               "--output-prefix", str(work / "megatron"), "--tokenizer-type", "SentencePieceTokenizer",
               "--tokenizer-model", model, "--workers", str(args.workers), "--append-eod"]
        env_path = f"{args.megatron_lm}:{os.environ.get('PYTHONPATH', '')}"
        os.environ["PYTHONPATH"] = env_path
        seconds, peak, _ = run_with_peak_rss(cmd)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(str(work / "megatron_text_document"))  # kept alive while read
        written = int(dataset.sequence_lengths.sum())
        print(f"Megatron-LM tools/preprocess_data.py 1x: {written:,} tokens in {seconds:.1f} s including "
              f"start-up = {written / seconds:,.0f} tokens/s ({written / seconds / ceiling_rate:.1%} of ceiling), "
              f"peak RSS {peak / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
