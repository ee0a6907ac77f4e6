#!/usr/bin/env python
"""Padding waste of instruction tuning: packed sequences vs one sample per sequence.

1. measured: the project's synthetic medical instruction set (short QA to summaries of long notes)
   through `melama preprocess-sft` and the training datasets' packing (first-fit-decreasing per source,
   as PackedSFTDataset packs), at the given sequence length: sequences per epoch, real-token share,
   FFD time, and how fast the dataset assembles packed samples.
2. modelled: Me-LLaMA's instruction mix at 4,096 tokens: the source sizes the paper publishes (about
   219.5K samples) with token-length distributions ASSUMED here (log-normal; the medians below are
   guesses for each task, the paper publishes no lengths), packed the same way. It shows the order of
   magnitude at production scale; replace the lengths with `melama blend-report` on real data.

    python benchmarks/sft_packing.py --samples 4000 --seq-length 1024

Tokens/s of training packed vs unpacked, on samples drawn from the same modelled mix
(`me_llama_sample`), is measured through the trainer's step by
`benchmarks/throughput.py --data packed unpacked`; the padding share here bounds it: one sample per
sequence spends (1 - real share) of every step on padding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melama_mcore.data.sft.packing import first_fit_decreasing, packing_efficiency  # noqa: E402

# Me-LLaMA's instruction sources (paper table; counts published) and an ASSUMED median length in
# LLaMA-2 tokens (prompt + answer) and log-normal sigma for each.
ME_LLAMA_MIX = {
    "general (Alpaca, Dolly, ShareGPT)": (20_000, 300, 1.0),
    "HealthCareMagic + iCliniq": (20_000, 300, 0.5),
    "MedInstruct": (52_000, 200, 0.6),
    "Medical Flash Cards": (34_000, 80, 0.4),
    "MEDIQA": (2_220, 400, 0.6),
    "MedicationQA": (690, 250, 0.6),
    "LiveQA": (634, 500, 0.6),
    "WikiDocPatient": (5_490, 300, 0.6),
    "GuidelineQA": (2_000, 400, 0.6),
    "PMC summarisation": (10_000, 1_500, 0.5),
    "PMC next-sentence generation": (20_000, 300, 0.5),
    "PMC keyword prediction": (10_000, 400, 0.5),
    "PubMed causal relations": (2_450, 120, 0.4),
    "UMLS relation extraction": (10_000, 100, 0.4),
    "MIMIC-III/IV QA, summaries, classification": (30_000, 2_000, 0.6),
}
REFERENCE_LENGTH = 4_096  # the sequence length the medians above are meant for


def pack(positions_per_source: dict[str, np.ndarray], capacity: int) -> dict:
    sequences, seconds = 0, 0.0
    for positions in positions_per_source.values():
        start = time.perf_counter()
        sequences += len(first_fit_decreasing(positions, capacity)[0]) - 1
        seconds += time.perf_counter() - start
    positions = np.concatenate(list(positions_per_source.values()))
    return {"samples": int(len(positions)), "positions": int(positions.sum()), "packed_sequences": sequences,
            "packed_real_share": packing_efficiency(positions, sequences, capacity),
            "unpacked_sequences": int(len(positions)),
            "unpacked_real_share": packing_efficiency(positions, len(positions), capacity),
            "sequence_reduction": len(positions) / sequences if sequences else 0.0, "ffd_seconds": seconds}


def measured(samples: int, seq_length: int, workers: int, work: Path) -> dict:
    from melama_mcore.data.sft.indexed import SFTIndexedData
    from melama_mcore.data.sft.preprocess import preprocess_sft
    from melama_mcore.demo.instructions import write_synthetic_instructions
    from melama_mcore.demo.corpus import write_demo_corpus
    from melama_mcore.data.train_tokenizer import train_sentencepiece

    corpus = write_demo_corpus(work / "corpus", docs_per_source=2000)
    model = train_sentencepiece([str(p) for p in corpus.values()], str(work / "spm"), vocab_size=2000, overwrite=True)
    sources = write_synthetic_instructions(work / "sft", samples=samples)
    positions, summaries = {}, {}
    for name, path in sources.items():
        summary = preprocess_sft([str(path)], str(work / name), str(model), seq_length=seq_length, workers=workers,
                                 progress=False, overwrite=True)
        summaries[name] = {"samples": summary.samples, "dropped_too_long": summary.too_long,
                           "samples_per_s": summary.samples / summary.seconds}
        positions[name] = SFTIndexedData(summary.prefix).lengths - 1
    result = pack(positions, seq_length)
    result["preprocess"] = summaries
    result["assembly_samples_per_s"] = _assembly_rate(work, sources, model, seq_length)
    return result


def _assembly_rate(work: Path, sources: dict, model, seq_length: int) -> float:
    """Packed samples per second from PackedSFTDataset.__getitem__ (one process)."""
    from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
    from megatron.core.datasets.utils import Split

    from melama_mcore.data.sft.dataset import PackedSFTDataset, _SFTTokenizerView
    from melama_mcore.data.tokenizer import load_tokenizer

    prefix = str(work / "patient_chat_sft_document")
    config = BlendedMegatronDatasetConfig(random_seed=0, sequence_length=seq_length,
                                          tokenizer=_SFTTokenizerView(load_tokenizer(str(model))),
                                          blend=([prefix], None), split="100,0,0")
    low = PackedSFTDataset.build_low_level_dataset(prefix, config)
    dataset = PackedSFTDataset(low, prefix, np.arange(len(low)), None, Split.train, config)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / (time.perf_counter() - start)


def me_llama_positions(counts: dict[str, int], seq_length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Training positions (tokens - 1) of `counts[name]` samples of each ME_LLAMA_MIX source: log-normal
    around the ASSUMED median, scaled by seq_length / REFERENCE_LENGTH (so that at a shorter benchmark
    length the lengths keep their share of the context), clipped to [max(2, 8 x scale), seq_length]."""
    scale = seq_length / REFERENCE_LENGTH
    low = max(2, round(8 * scale))
    return {name: np.clip(rng.lognormal(np.log(median * scale), sigma, counts[name]).astype(np.int64), low, seq_length)
            for name, (_, median, sigma) in ME_LLAMA_MIX.items() if counts.get(name)}


def me_llama_sample(samples: int, seq_length: int, seed: int) -> np.ndarray:
    """Positions of `samples` samples drawn from the mix in proportion to the published source sizes,
    shuffled (what benchmarks/throughput.py --data packed|unpacked trains on)."""
    rng = np.random.default_rng(seed)
    sizes = np.array([count for count, _, _ in ME_LLAMA_MIX.values()], dtype=np.float64)
    counts = dict(zip(ME_LLAMA_MIX, rng.multinomial(samples, sizes / sizes.sum()).tolist()))
    return rng.permutation(np.concatenate(list(me_llama_positions(counts, seq_length, rng).values())))


def modelled(seq_length: int, seed: int) -> dict:
    counts = {name: count for name, (count, _, _) in ME_LLAMA_MIX.items()}
    return pack(me_llama_positions(counts, seq_length, np.random.default_rng(seed)), seq_length)


def _print(label: str, r: dict, seq_length: int) -> None:
    print(f"{label} at {seq_length:,} positions: {r['samples']:,} samples, {r['positions']:,} real positions")
    print(f"  one sample per sequence: {r['unpacked_sequences']:,} sequences, {r['unpacked_real_share']:.1%} real "
          f"tokens ({1 - r['unpacked_real_share']:.1%} padding)")
    print(f"  packed (FFD per source): {r['packed_sequences']:,} sequences, {r['packed_real_share']:.1%} real tokens "
          f"({1 - r['packed_real_share']:.1%} padding); {r['sequence_reduction']:.1f}x fewer sequences; "
          f"FFD {r['ffd_seconds']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000, help="synthetic instruction records (default 4000)")
    parser.add_argument("--seq-length", type=int, default=1024, help="sequence length for the synthetic set")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="melama-sft-bench-"))
    results = {"measured": measured(args.samples, args.seq_length, args.workers, work),
               "me_llama_modelled": modelled(4096, seed=0)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    _print("synthetic set (measured)", results["measured"], args.seq_length)
    print(f"  packed samples assembled: {results['measured']['assembly_samples_per_s']:,.0f}/s (one process)")
    _print("Me-LLaMA mix (lengths assumed)", results["me_llama_modelled"], 4096)


if __name__ == "__main__":
    main()
