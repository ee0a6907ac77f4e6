"""`melama blend-report` for a blend of pre-training prefixes: per source, its share of the training
tokens, its share of the tokens on disk, and the epochs a run implies (above 1 it repeats). Token
counts come from the .idx files; data that training would refuse is refused here too
(data/dataset.py's checks). Instruction data has its own report (data/sft/report.py).
"""

from __future__ import annotations

from melama_mcore.data.blend import Blend
from melama_mcore.data.dataset import check_pretraining_data


def blend_report(blend: Blend, samples: int, seq_length: int, split: str = "98,2,0") -> list[dict]:
    """Per source: weight share, tokens drawn for `samples` samples of `seq_length`, tokens available
    to training (the train part of `split`, or whole prefixes when the blend names `valid` prefixes),
    and the epochs that implies (> 1: the source repeats). Refuses what training would refuse."""
    check = check_pretraining_data(blend, vocab_size=None, seq_length=seq_length, train_samples=samples,
                                   valid_samples=0, split=split)
    rows = []
    available = [sum(check.train_tokens[p] for p in s.train) for s in blend.sources]
    total_available = sum(available)
    for source, share, tokens in zip(blend.sources, blend.normalized_weights(), available):
        drawn = share * samples * seq_length
        rows.append(dict(name=source.name, weight=source.weight, share=share,
                         natural_share=tokens / total_available, tokens_drawn=int(round(drawn)),
                         tokens_available=tokens, epochs=drawn / tokens))
    return rows


def format_report(rows: list[dict], samples: int, seq_length: int) -> str:
    lines = [f"{samples:,} samples x {seq_length:,} tokens = {samples * seq_length:,} training tokens",
             f"{'source':<16} {'weight':>7} {'share':>7} {'on disk':>8} {'tokens drawn':>16} "
             f"{'tokens available':>17} {'epochs':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<16} {r['weight']:>7g} {r['share']:>7.1%} {r['natural_share']:>8.1%} "
                     f"{r['tokens_drawn']:>16,} {r['tokens_available']:>17,} {r['epochs']:>8.2f}")
    repeating = [r["name"] for r in rows if r["epochs"] > 1]
    if repeating:
        lines.append(f"repeats (more than one epoch): {', '.join(repeating)}")
    return "\n".join(lines)
