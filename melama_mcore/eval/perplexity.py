"""`melama eval-ppl`: loss and perplexity of a checkpoint on held-out data, per blend source.

    melama eval-ppl --model outputs/me-llama-7b --blend examples/blends/me_llama_15_1_4.yaml --out ppl/
    torchrun --nproc-per-node 8 -m melama_mcore.eval.perplexity --model ... --tp 8 ...

The paper's forgetting analysis in one command: the same held-out biomedical, clinical and general
text scored for base LLaMA-2 (a `convert import-hf` folder) and for a continued model. It is the
trainer's own validation (step.validation_totals on the run's datasets, data/run_data.py): the same
samples, the same precision and the same loss, so for a run's checkpoint and blend it reproduces the
validation loss the run logged at that step. A checkpoint saved at any layout evaluates at any other
(--tp/--pp, the rest of the processes in data parallel).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from functools import partial
from pathlib import Path

from megatron.core import parallel_state

from melama_mcore import ready_model, step
from melama_mcore.checkpoint.integrity import model_identity
from melama_mcore.checkpoint.layout import find_checkpoint, read_config
from melama_mcore.data.blend import load_blend
from melama_mcore.data.loader import build_loader
from melama_mcore.data.run_data import build_run_datasets, check_run_data, data_kind
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.distributed import parallel
from melama_mcore.errors import CheckpointError, ConfigError
from melama_mcore.eval.report import write_atomic
from melama_mcore.startup import start

log = logging.getLogger("melama")


def evaluation_config(ckpt: Path, args):
    """The run's settings from the checkpoint's config.yaml (model, tokenizer, sequence length,
    batch sizes, seed, split, precision, training strategy: an adapter checkpoint loads on its base),
    with the blend, layout and sample count asked for."""
    cfg = read_config(ckpt)
    if not cfg.data.tokenizer and not args.tokenizer:
        raise CheckpointError(f"{ckpt}: its config.yaml names no tokenizer (data.tokenizer); set it with "
                              "--tokenizer")
    cfg.data.blend = args.blend
    cfg.output_dir = str(args.out)
    cfg.data.cache_dir = str(args.out / "data_cache")
    cfg.training.device = "auto"
    cfg.training.train_iters = 1  # the validation samples do not depend on it; fewer training indices to build
    cfg.optimizer.lr_warmup_iters = 0  # no training here: nothing to warm up
    cfg.training.stop_after_step = None
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = args.tp, args.pp
    cfg.parallel.virtual_pipeline = args.vp
    cfg.parallel.sequence_parallel = args.tp > 1
    # No optimizer here: nothing to shard or overlap.
    cfg.parallel.use_distributed_optimizer = cfg.parallel.overlap_grad_reduce = cfg.parallel.overlap_param_gather = False
    if args.tokenizer:
        cfg.data.tokenizer = args.tokenizer
    if args.samples is not None:
        cfg.logging.eval_iters = math.ceil(args.samples / cfg.training.global_batch_size)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama eval-ppl", description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="a run folder (its latest checkpoint), its checkpoints/ folder, one iter_* folder, "
                             "or a `melama convert import-hf` folder; adapter checkpoints load their base too")
    parser.add_argument("--blend", required=True, help="blend YAML of the held-out data (its sources are reported "
                                                       "one by one; a source's valid prefixes, else its split's valid part)")
    parser.add_argument("--out", required=True, type=Path, help="folder for perplexity.json (and the index cache)")
    parser.add_argument("--samples", type=int, help="sequences per source (default: the run's logging.eval_iters "
                                                    "global batches, as its validation)")
    parser.add_argument("--tokenizer", help="default: the run's data.tokenizer")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to evaluate at (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--vp", type=int, default=None, help="virtual pipeline stages per rank (default none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples is not None and args.samples < 1:
        raise ConfigError("--samples must be at least 1")

    ckpt = find_checkpoint(args.model)
    cfg = evaluation_config(ckpt, args)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    blend = load_blend(cfg.data.blend)
    kind = data_kind(blend)
    args.out.mkdir(parents=True, exist_ok=True)
    check_run_data(cfg, blend, kind, tokenizer)
    runtime = start(cfg, tokenizer.vocab_size)
    try:
        identity = model_identity(runtime.arch, tokenizer, cfg)
        model = ready_model.for_inference(cfg, runtime, ckpt, identity=identity).model
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        _, valid = build_run_datasets(cfg, blend, kind, tokenizer, dp_size)
        t = cfg.training
        loader = partial(_loader, t.micro_batch_size, dp_rank, dp_size, cfg.data.loader, t.device)
        step_fn = partial(step.forward_step, data=kind, loss_normalization=t.loss_normalization)
        totals = step.validation_totals(step.Schedule(cfg, model, runtime.device), cfg, valid, loader, step_fn)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if runtime.launch.rank == runtime.launch.world_size - 1 and last_stage:
            report = _report(ckpt, cfg, totals)
            write_atomic(args.out / "perplexity.json", json.dumps(report, indent=1))
            print(_table(report))
    finally:
        parallel.shutdown()
    return 0


def _loader(micro_batch_size, dp_rank, dp_size, loader_kind, device, dataset, consumed_samples):
    return build_loader(dataset, consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
                        dp_rank=dp_rank, dp_size=dp_size, kind=loader_kind, device=device)


def _report(ckpt: Path, cfg, totals: dict) -> dict:
    sources = {}
    for name, t in totals.items():
        loss = (t[0] / t[1].clamp(min=1)).item()
        sources[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(round(t[1].item())),
                         "sequences": cfg.logging.eval_iters * cfg.training.global_batch_size}
    return {"checkpoint": str(ckpt), "seq_length": cfg.training.seq_length, "sources": sources}


def _table(report: dict) -> str:
    lines = [f"{'source':<16}{'loss':>10}{'perplexity':>12}{'tokens':>12}"]
    for name, r in report["sources"].items():
        lines.append(f"{name:<16}{r['loss']:>10.4f}{r['perplexity']:>12.2f}{r['tokens']:>12,}")
    return "\n".join(lines)


if __name__ == "__main__":  # guarded: megatron's checkpoint code may spawn into this module
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
