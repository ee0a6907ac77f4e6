"""Stage f, evaluation on the GPU: `melama eval --backend hf` of a tiny LLaMA on MIBE-shaped records,
once on the GPU and once on the CPU (CUDA_VISIBLE_DEVICES empty): records/s of each, and the greedy
generations of every record equal.

The model is a random 2-layer LLaMA (fp32, so both devices run the same precision) with large
weights, so that greedy choices are far apart and rounding cannot flip them; it speaks the synthetic
corpus's tokenizer (fixtures.py). Its end-of-sequence row is scaled by EOS_SCALE so that generations
end at varied lengths (1 to 256 tokens, about 40 on average, measured) rather than all running to
256: the CPU's generation then fits the stage's budget. The records (pubmedqa and mednli, the one-label schema of
docs/evaluation.md) are made-up words: generations are compared here and never printed.

    python -m gpu_check.stage_eval --make-model DIR --tokenizer PATH     # run as a job
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from gpu_check import fixtures
from gpu_check.runner import Context, Mode, Stage

TASKS = {"pubmedqa": ["yes", "no", "maybe"], "mednli": ["entailment", "contradiction", "neutral"]}
RECORDS = {"gpu": 16, "smoke": 2}  # per task
EOS_SCALE = 2.5
HARNESS_RATE = re.compile(r"evaluated (\d+) records in ([\d.]+) s.*?\(([\d.]+) records/s\)")


def make_model(out: Path, tokenizer: Path) -> None:
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from melama_mcore.checkpoint.hf_folder import copy_tokenizer

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=pieces.vocab_size(), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=pieces.bos_id(), eos_token_id=pieces.eos_id()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for i in range(pieces.vocab_size()):  # never emit byte or unknown pieces: generations stay words
            if pieces.is_byte(i) or pieces.is_unknown(i):
                model.lm_head.weight[i] = 0
        model.lm_head.weight[pieces.eos_id()] *= EOS_SCALE
    model.save_pretrained(out)
    copy_tokenizer(tokenizer, out)


def write_records(folder: Path, per_task: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    syllables = ["ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "zo"]

    def phrase(n: int) -> str:
        return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n))

    folder.mkdir(parents=True, exist_ok=True)
    for task, choices in TASKS.items():
        lines = [json.dumps({"query": f"{phrase(12)}? Answer {', '.join(choices[:-1])} or {choices[-1]}.",
                             "choices": choices, "gold": rng.randrange(len(choices))}) for _ in range(per_task)]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")


def generations(out: Path) -> dict[tuple[str, int], str]:
    """(task, doc_id) -> generation, from melama eval's samples_<task>.jsonl."""
    found = {}
    for task in TASKS:
        for line in (out / f"samples_{task}.jsonl").read_text().splitlines():
            sample = json.loads(line)
            found[(task, sample["doc_id"])] = sample["generation"]
    return found


def differing(device: dict[tuple[str, int], str], cpu: dict[tuple[str, int], str]) -> list[str]:
    """`task doc_id` of every record whose generation on the device is not the CPU's (or is missing)."""
    return sorted(f"{task} {doc}" for (task, doc), text in cpu.items() if device.get((task, doc)) != text)


def scores(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "results.json").read_text()).items() if k != "protocol"}


def rate(job, records: int) -> tuple[float, str]:
    """records/s as the harness logged it (model loading included), else over the whole job."""
    match = HARNESS_RATE.search(job.output())
    if match:
        return float(match[3]), "model loading included"
    return records / job.seconds, "process start-up included"


def run(ctx: Context) -> None:
    if ctx.lacks_gpu("eval"):
        return
    tokenizer = fixtures.tokenizer(ctx)
    model, data = ctx.work / "model", ctx.work / "records"
    ctx.job("model", "gpu_check.stage_eval", ["--make-model", model, "--tokenizer", tokenizer])
    per_task = RECORDS["smoke" if ctx.mode.smoke else "gpu"]
    write_records(data, per_task)
    records = per_task * len(TASKS)
    command = ["eval", "--model", model, "--tasks", ",".join(TASKS), "--data-dir", data, "--backend", "hf",
               "--log-samples", "--no-chat"]
    outputs = {}
    runs = [("device", {})] + ([] if ctx.mode.smoke else [("cpu", {"CUDA_VISIBLE_DEVICES": ""})])
    for where, env in runs:
        job = ctx.job(f"eval on the {where}", "melama_mcore.cli", [*command, "--out", ctx.work / where], env=env)
        outputs[where] = {"generations": generations(ctx.work / where), "scores": scores(ctx.work / where),
                          "rate": rate(job, records)}
        written = len(outputs[where]["generations"])
        ctx.part(f"eval on the {where}", written == records, f"{written} of {records} records' generations written")
    if ctx.mode.smoke:
        ctx.skip("equal to the CPU's", "--cpu-smoke: the device is the CPU (no second run)")
    device = outputs["device"]
    rate_text = f"{device['rate'][0]:.2f} records/s on the {'CPU (smoke)' if ctx.mode.smoke else 'GPU'}"
    ctx.record.metrics.update(records=records, device_records_per_s=device["rate"][0], rate_measured=device["rate"][1],
                              scores=device["scores"])
    if "cpu" in outputs:
        cpu = outputs["cpu"]
        differ = differing(device["generations"], cpu["generations"])
        ctx.part("generations equal the CPU's", not differ, f"{records - len(differ)} of {records} equal"
                 + (f"; differ: {', '.join(differ[:8])}" if differ else ""))
        ctx.part("scores equal the CPU's", device["scores"] == cpu["scores"], json.dumps(device["scores"]))
        ctx.record.metrics.update(cpu_records_per_s=cpu["rate"][0], differing=differ)
        rate_text += (f", {cpu['rate'][0]:.2f} on the CPU; generations {'equal' if not differ else 'DIFFER'} "
                      f"({records - len(differ)}/{records})")
    ctx.record.summary = f"{records} records: {rate_text} ({device['rate'][1]})"


def plan(mode: Mode) -> list[str]:
    n = RECORDS["smoke" if mode.smoke else "gpu"]
    return [f"a random 2-layer LLaMA (HF folder, fp32); {n} made-up records each of {', '.join(TASKS)}",
            f"melama eval --backend hf --tasks {','.join(TASKS)} --log-samples on the "
            + ("CPU (smoke: no second run)" if mode.smoke
               else "GPU, then with CUDA_VISIBLE_DEVICES= on the CPU; compare")]


STAGE = Stage("f", "evaluation (hf backend)", 55, run, plan)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write a tiny random LLaMA as a Hugging Face folder")
    parser.add_argument("--make-model", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    args = parser.parse_args()
    make_model(args.make_model, args.tokenizer)
    sys.exit(0)
