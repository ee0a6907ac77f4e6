"""`melama blend-report` for a blend of preprocess-sft prefixes: per source, its conversations, the
packed sequences one epoch of it takes, and the epochs a run of N sequences draws (above 1 it repeats).

As in training, each prefix is packed on its own (first-fit-decreasing; the count does not depend on
the seed), a source's share of the sequences is split over its prefixes by tokens, and the counts are
of the whole prefixes on disk (the validation split is not subtracted, as for pre-training blends).
"""

from __future__ import annotations

import numpy as np

from melama_mcore.data.sft.indexed import SFTIndexedData
from melama_mcore.data.sft.packing import packing_efficiency, sequences_per_epoch
from melama_mcore.errors import DataError


def sft_blend_report(blend, samples: int, seq_length: int) -> list[dict]:
    rows = []
    for source, share in zip(blend.sources, blend.normalized_weights()):
        conversations = sequences = positions = 0
        for prefix in source.train:
            lengths = SFTIndexedData(prefix).lengths - 1
            if len(lengths) and lengths.max() > seq_length:
                raise DataError(f"{prefix}: a sample needs {int(lengths.max()):,} positions, more than "
                                f"--seq-length {seq_length:,}: run preprocess-sft with --seq-length {seq_length}")
            conversations += len(lengths)
            sequences += sequences_per_epoch(lengths, seq_length)
            positions += int(np.sum(lengths))
        drawn = share * samples
        rows.append(dict(name=source.name, weight=source.weight, share=share, conversations=conversations,
                         sequences_per_epoch=sequences,
                         efficiency=packing_efficiency(positions, sequences, seq_length),
                         unpacked_efficiency=packing_efficiency(positions, conversations, seq_length),
                         sequences_drawn=int(round(drawn)),
                         epochs=drawn / sequences if sequences else float("inf")))
    return rows


def format_sft_report(rows: list[dict], samples: int, seq_length: int) -> str:
    epoch = sum(r["sequences_per_epoch"] for r in rows)
    real = sum(r["efficiency"] * r["sequences_per_epoch"] for r in rows)
    unpacked = sum(r["conversations"] for r in rows)
    lines = [f"{samples:,} packed sequences x {seq_length:,} positions (instruction data from preprocess-sft)",
             f"{'source':<16} {'weight':>7} {'share':>7} {'samples':>10} {'seq/epoch':>10} {'packed':>7} "
             f"{'seq drawn':>11} {'samples drawn':>14} {'epochs':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<16} {r['weight']:>7g} {r['share']:>7.1%} {r['conversations']:>10,} "
                     f"{r['sequences_per_epoch']:>10,} {r['efficiency']:>7.1%} {r['sequences_drawn']:>11,} "
                     f"{round(r['epochs'] * r['conversations']):>14,} {r['epochs']:>8.2f}")
    if epoch:
        lines.append(f"one epoch of every source: {epoch:,} packed sequences ({real / epoch:.1%} real tokens); "
                     f"one sample per sequence would take {unpacked:,} ({real / unpacked:.1%} real tokens)")
    repeating = [r["name"] for r in rows if r["epochs"] > 1]
    if repeating:
        lines.append(f"repeats (more than one epoch): {', '.join(repeating)}")
    return "\n".join(lines)
