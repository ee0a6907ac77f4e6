"""`melama eval-ppl`: loss and perplexity of a checkpoint on held-out data, per blend source.

    melama eval-ppl --model outputs/me-llama-7b --blend examples/blends/me_llama_15_1_4.yaml --out ppl/
    melama eval-ppl --model outputs/me-llama-7b --blend ... --out ppl/me-llama --all-checkpoints
    torchrun --nproc-per-node 8 -m melama_mcore.eval.perplexity --model ... --tp 8 ...

The paper's forgetting analysis in one command: the same held-out biomedical, clinical and general
text scored for base LLaMA-2 (a `convert import-hf` folder) and for a continued model. It is the
trainer's own validation (step.validation_totals on the run's datasets, data/run_data.py): the same
samples, the same precision and the same loss, so for a run's checkpoint and blend it reproduces the
validation loss the run logged at that step. A checkpoint saved at any layout evaluates at any other
(--tp/--pp, the rest of the processes in data parallel). --all-checkpoints (or --steps) scores a
run's checkpoints one after the other into OUT/iter_<step>/perplexity.json, a checkpoint series for
`melama report`: the model and the data are built once, only the weights are loaded per checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

from megatron.core import parallel_state

from melama_mcore import ready_model, step
from melama_mcore.checkpoint.integrity import model_identity
from melama_mcore.checkpoint.layout import METADATA, checkpoint_step, find_checkpoint, read_config, run_checkpoints
from melama_mcore.checkpoint.opened import open_checkpoint
from melama_mcore.config.job_config import JobConfig
from melama_mcore.data.blend import load_blend
from melama_mcore.data.loader import build_loader
from melama_mcore.data.run_data import build_run_datasets, check_run_data, data_kind
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.distributed import parallel
from melama_mcore.distributed.launch import launch_env
from melama_mcore.errors import ConfigError
from melama_mcore.eval.model_source import checkpoint_tokenizer
from melama_mcore.output_paths import check_output_dir, remove_created_folders, write_atomic
from melama_mcore.startup import start

log = logging.getLogger("melama")

PERPLEXITY_FILE = "perplexity.json"


def evaluation_config(ckpt: Path, args):
    """The run's settings from the checkpoint's config.yaml (model, tokenizer, sequence length,
    batch sizes, seed, split, precision, training strategy: an adapter checkpoint loads on its base),
    with the blend and layout asked for."""
    cfg = read_config(ckpt)
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
    return cfg


def scoring_config(cfg: JobConfig, samples: int | None, world_size: int) -> tuple[JobConfig, int]:
    """(the config the validation runs with, the sequences it scores per source). Without --samples:
    the run's validation, logging.eval_iters global batches. With --samples N: one batch of N
    sequences when the layout can split N into whole micro-batches (the run's micro_batch_size on
    every data-parallel rank; the interleaved pipeline: a multiple of pp of them), else of the
    nearest count above N that it can. The sequences are the first of the validation data, which
    `cfg` (the datasets') then covers: the run's own, or as many global batches as a run validating
    on that many would have built."""
    t = cfg.training
    if samples is None:
        return cfg, cfg.logging.eval_iters * t.global_batch_size
    p = cfg.parallel
    data_parallel = max(1, world_size // (p.tensor_parallel * p.pipeline_parallel))
    unit = t.micro_batch_size * data_parallel * (p.pipeline_parallel if p.virtual_pipeline else 1)
    count = math.ceil(samples / unit) * unit
    if count != samples:
        pipeline = f" x pipeline {p.pipeline_parallel}" if p.virtual_pipeline else ""
        log.info("--samples %d: scoring %d sequences per source instead, the nearest count this layout can split "
                 "into whole micro-batches (a multiple of %d: micro_batch_size %d x data-parallel %d%s)", samples,
                 count, unit, t.micro_batch_size, data_parallel, pipeline)
    cfg.logging.eval_iters = max(cfg.logging.eval_iters, math.ceil(count / t.global_batch_size))
    scoring = copy.deepcopy(cfg)
    scoring.training.global_batch_size, scoring.logging.eval_iters = count, 1
    return scoring, count


def _steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of steps (e.g. 500,1000)")
    return steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama eval-ppl", description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="a run folder (its latest checkpoint), its checkpoints/ folder, one iter_* folder, "
                             "or a `melama convert import-hf` folder; adapter checkpoints load their base too")
    parser.add_argument("--blend", required=True, help="blend YAML of the held-out data (its sources are reported "
                                                       "one by one; a source's valid prefixes, else its split's valid part)")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for perplexity.json (and the index cache); with --all-checkpoints or --steps, "
                             "one sub-folder iter_<step>/perplexity.json per checkpoint")
    series = parser.add_mutually_exclusive_group()
    series.add_argument("--all-checkpoints", action="store_true",
                        help="score every complete checkpoint of the run --model names (its folder or its "
                             "checkpoints/ folder), in step order; interrupted saves are skipped")
    series.add_argument("--steps", type=_steps, metavar="STEP,...",
                        help="score the run's checkpoints of these steps (e.g. 500,1000), as --all-checkpoints does")
    parser.add_argument("--samples", type=int,
                        help="sequences per source, the first of the validation data (default: the run's "
                             "logging.eval_iters global batches, as its validation); rounded up, with a note, "
                             "to a whole number of micro-batches per data-parallel rank when the layout needs it")
    parser.add_argument("--tokenizer", help="default: the run's data.tokenizer; it must have the vocabulary the "
                                            "checkpoint recorded, and the held-out data's")
    parser.add_argument("--allow-tokenizer-mismatch", action="store_true",
                        help="score with a tokenizer whose vocabulary is not the checkpoint's or the data's (refused "
                             "by default: token ids would mean other text)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to evaluate at (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--vp", type=int, default=None, help="virtual pipeline stages per rank (default none)")
    return parser


def checkpoints_to_score(args) -> tuple[list[tuple[int | None, Path]], list[Path]]:
    """((step, folder) of each checkpoint asked for, in step order (step None: a folder that is not a
    run's iter_*), the incomplete folders --all-checkpoints passes over). Every mistake is found
    here, before any work."""
    if not (args.all_checkpoints or args.steps):
        ckpt = find_checkpoint(args.model)
        return [(checkpoint_step(ckpt), ckpt)], []
    flag = "--all-checkpoints" if args.all_checkpoints else "--steps"
    if (args.model / METADATA).is_file():
        raise ConfigError(f"{flag} scores the checkpoints of a run, but --model {args.model} is one checkpoint: give "
                          f"the run's folder (or its checkpoints/ folder), or leave out {flag} to score this one")
    complete, skipped = run_checkpoints(args.model)
    if not complete:
        raise ConfigError(f"{args.model} holds no complete checkpoint (only interrupted saves)")
    if args.steps:
        missing = [s for s in args.steps if s not in complete]
        if missing:
            raise ConfigError(f"--steps: {args.model} has no checkpoint of step {', '.join(map(str, missing))}; "
                              f"its checkpoints are of steps {', '.join(map(str, complete))}")
        return [(s, complete[s]) for s in args.steps], []
    return list(complete.items()), skipped


def check_one_run(checkpoints: list[tuple[int | None, Path]]) -> None:
    """The checkpoints of a series are scored by one model: each must have been saved with the same
    model, tokenizer, training strategy (and, for adapters, base) and sequence length."""
    def signature(cfg: JobConfig) -> dict:
        return {"model": asdict(cfg.model), "data.tokenizer": cfg.data.tokenizer, "peft": asdict(cfg.peft),
                "training.seq_length": cfg.training.seq_length,
                "checkpoint.init_from": cfg.checkpoint.init_from if cfg.peft.method != "none" else None}

    latest = checkpoints[-1][1]
    expected = signature(read_config(latest))
    for _, folder in checkpoints[:-1]:
        got = signature(read_config(folder))
        if got != expected:
            key = next(k for k in expected if got[k] != expected[k])
            raise ConfigError(f"{folder} was saved with another {key} than {latest} ({got[key]!r}, not "
                              f"{expected[key]!r}): not one run's checkpoints; score them separately")


def check_no_other_series(out: Path, checkpoints: list[tuple[int | None, Path]]) -> None:
    """`melama report` reads every iter_*/perplexity.json of a folder as one series: scores of another
    run's checkpoints left in --out would be drawn into this run's curve. Those of this run's own
    checkpoints may stay (a later --steps call adds points to its series)."""
    run = checkpoints[-1][1].resolve().parent
    for found in sorted(out.glob(f"iter_*/{PERPLEXITY_FILE}")) if out.is_dir() else []:
        try:
            scored = Path(json.loads(found.read_text(encoding="utf-8"))["checkpoint"]).resolve().parent
        except (OSError, ValueError, KeyError, TypeError):
            scored = None
        if scored != run:
            raise ConfigError(f"--out {out} already holds {found.relative_to(out)}, not of a checkpoint of {run}: "
                              "its points would join this run's series; choose another --out")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples is not None and args.samples < 1:
        raise ConfigError("--samples must be at least 1")

    checkpoints, skipped = checkpoints_to_score(args)
    series = args.all_checkpoints or bool(args.steps)
    if series:
        check_one_run(checkpoints)
    # The checkpoints' one tokenizer check (melama eval's, as export's), before any work; the data's
    # follows in check_run_data, under the same flag.
    checkpoint_tokenizer(open_checkpoint(checkpoints[-1][1], verify=False),
                         Path(args.tokenizer) if args.tokenizer else None, args.allow_tokenizer_mismatch)
    cfg = evaluation_config(checkpoints[-1][1], args)  # one setting for all: every checkpoint on the same samples
    cfg.data.allow_tokenizer_mismatch = args.allow_tokenizer_mismatch
    if not args.samples and cfg.logging.eval_iters < 1:
        raise ConfigError(f"{checkpoints[-1][1]}: the run validated on nothing (logging.eval_iters=0): give "
                          "--samples N")
    if series:
        check_no_other_series(args.out, checkpoints)
    created = check_output_dir(args.out, "--out")
    if skipped:
        log.info("skipping %d incomplete checkpoint folder(s) (interrupted saves): %s", len(skipped),
                 ", ".join(folder.name for folder in skipped))
    try:
        results = _score(args, cfg, checkpoints, series)
    except BaseException:
        remove_created_folders(created)
        raise
    if results and series:
        print(_series_table(results))
    return 0


def _score(args, cfg: JobConfig, checkpoints: list, series: bool) -> list[dict]:
    """Score each checkpoint, writing its perplexity.json; the reports (on the rank that writes them)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    blend = load_blend(cfg.data.blend)
    kind = data_kind(blend)
    scoring, count = scoring_config(cfg, args.samples, launch_env().world_size)
    check_run_data(cfg, blend, kind, tokenizer, override="--allow-tokenizer-mismatch")
    runtime = start(scoring, tokenizer.vocab_size)
    results = []
    try:
        # Its tokenizer was checked (or its mismatch allowed) above; the architecture is checked at load.
        identity = model_identity(runtime.arch, None if args.allow_tokenizer_mismatch else tokenizer, scoring)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        _, valid = build_run_datasets(cfg, blend, kind, tokenizer, dp_size)
        t = scoring.training
        loader = partial(_loader, t.micro_batch_size, dp_rank, dp_size, scoring.data.loader, t.device)
        step_fn = partial(step.forward_step, data=kind, loss_normalization=t.loss_normalization)
        writes = (runtime.launch.rank == runtime.launch.world_size - 1
                  and parallel_state.is_pipeline_last_stage(ignore_virtual=True))
        ready = None
        for step_, ckpt in checkpoints:
            if ready is None:
                ready = ready_model.for_inference(scoring, runtime, ckpt, identity=identity)
            else:
                ready_model.load_checkpoint(ready, runtime, ckpt)
            totals = step.validation_totals(step.Schedule(scoring, ready.model, runtime.device), scoring, valid,
                                            loader, step_fn)
            if writes:
                report = _report(ckpt, step_, scoring, tokenizer, totals, count)
                out = args.out / ckpt.name if series else args.out
                out.mkdir(exist_ok=True)
                write_atomic(out / PERPLEXITY_FILE, json.dumps(report, indent=1))
                print((f"step {step_} ({ckpt})\n" if series else "") + _table(report), flush=True)
                results.append(report)
    finally:
        parallel.shutdown()
    return results


def _loader(micro_batch_size, dp_rank, dp_size, loader_kind, device, dataset, consumed_samples):
    return build_loader(dataset, consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
                        dp_rank=dp_rank, dp_size=dp_size, kind=loader_kind, device=device)


def _report(ckpt: Path, step_: int | None, cfg: JobConfig, tokenizer, totals: dict, count: int) -> dict:
    """perplexity.json, as melama report reads it (report/inputs.py: PerplexityPoint)."""
    sources = {}
    for name, t in totals.items():
        loss = (t[0] / t[1].clamp(min=1)).item()
        sources[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(round(t[1].item())),
                         "sequences": count}
    return {"checkpoint": str(ckpt), "step": step_, "seq_length": cfg.training.seq_length,
            "tokenizer": {"path": str(tokenizer.path), "vocab_size": tokenizer.vocab_size,
                          "vocab_hash": tokenizer.vocab_sha256},
            "sources": sources}


def _table(report: dict) -> str:
    lines = [f"{'source':<16}{'loss':>10}{'perplexity':>12}{'tokens':>12}"]
    for name, r in report["sources"].items():
        lines.append(f"{name:<16}{r['loss']:>10.4f}{r['perplexity']:>12.2f}{r['tokens']:>12,}")
    return "\n".join(lines)


def _series_table(reports: list[dict]) -> str:
    """Perplexity per source (rows) and step (columns): the forgetting curve at a glance."""
    width = max(12, *(len(str(r["step"])) + 2 for r in reports))
    lines = ["perplexity by step", f"{'source':<16}" + "".join(f"{r['step']:>{width}}" for r in reports)]
    for name in reports[0]["sources"]:
        lines.append(f"{name:<16}" + "".join(f"{r['sources'][name]['perplexity']:>{width}.2f}" for r in reports))
    return "\n".join(lines)


if __name__ == "__main__":  # guarded: megatron's checkpoint code may spawn into this module
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
