"""The training loop: LLaMA-2 continual pre-training on megatron-core.

    torchrun --nproc-per-node 8 -m melama_mcore.train --config examples/configs/llama2_7b.yaml \
        training.train_iters=100 parallel.tensor_parallel=4

Order of work (each step in one place): read and check the config (before any process group), start
process groups (distributed/parallel.py), build the model (models/llama/model.py) and wrap it in
megatron's DDP, build optimizer and schedule (components/optimizer.py), resume or initialise from a
checkpoint (components/checkpointer.py), build the data (data/), then loop: megatron's pipeline
schedule runs forward and backward over the micro-batches, the optimizer steps unless the loss or
grad norm is non-finite, metrics are logged, and checkpoints are saved every N steps, at the end,
and when SIGTERM/SIGUSR1 (cluster preemption) arrives.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from melama_mcore.checkpoint.checkpointer import Checkpointer, TrainState
from melama_mcore.checkpoint.integrity import model_identity
from melama_mcore.components.metrics import MetricsLogger, StepStats, flops_per_token, peak_tflops
from melama_mcore.components.optimizer import build_optimizer, build_scheduler
from melama_mcore.config.job_config import JobConfig, dump_config, load_config
from melama_mcore.config.validate import detect_environment, resolve, resolve_arch, validate
from melama_mcore.data.blend import load_blend
from melama_mcore.data.dataset import build_pretraining_datasets
from melama_mcore.data.loader import build_loader
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.distributed import parallel
from melama_mcore.errors import UserError
from melama_mcore.models.llama.model import build_model_chunks, choose_backend, output_vocab_size

log = logging.getLogger("melama")


class TrainingStopped(UserError):
    """Too many consecutive non-finite steps."""

    exit_code = 3


class _StepAbandoned(Exception):
    """Every rank agreed to abandon the step in progress: it would not finish before the preemption deadline."""


class Trainer:
    def __init__(self, cfg: JobConfig):
        # 1. Configuration, checked before any process group exists.
        world_size = parallel.world_size_from_env()
        env = detect_environment(world_size)
        self.cfg = resolve(cfg, env)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
        self.arch = resolve_arch(cfg, self.tokenizer.vocab_size if self.tokenizer else None)
        validate(cfg, self.arch, env)
        self.blend = load_blend(cfg.data.blend) if cfg.data.blend is not None else None
        if self.blend is None or self.tokenizer is None:
            raise UserError("data.blend and data.tokenizer must be set (see examples/configs/)")

        # 2. Process groups.
        parallel.initialize(cfg)
        self.rank = dist.get_rank()
        # Where collectives' tensors live: NCCL reduces only CUDA tensors.
        gpu = cfg.training.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_logging_rank = self.rank == dist.get_world_size() - 1  # last pipeline stage holds the loss
        if self.rank == 0:
            log.info("world %d = TP %d x PP %d x DP %d%s | %s, %s", world_size, cfg.parallel.tensor_parallel,
                     cfg.parallel.pipeline_parallel, self.dp_size,
                     f" x VP {cfg.parallel.virtual_pipeline}" if cfg.parallel.virtual_pipeline else "",
                     cfg.training.device, cfg.training.precision)

        # 3. Model chunks (one per virtual pipeline stage), wrapped for training.
        backend = choose_backend(cfg.model.backend, cfg.training.device, env.transformer_engine)
        self.chunks = build_model_chunks(cfg, self.arch, backend)
        self.model = parallel.wrap_for_training(cfg, self.chunks)

        # 4. Optimizer, schedule, checkpoint.
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.checkpointer = Checkpointer(cfg, self.chunks, self.optimizer, self.scheduler,
                                         identity=model_identity(self.arch, self.tokenizer))
        self.state = self.checkpointer.resume() if cfg.checkpoint.resume else None
        if self.state is None:
            self.checkpointer.clean_partial()
            self.state = TrainState()
            if cfg.checkpoint.init_from:
                self.checkpointer.load_weights(cfg.checkpoint.init_from)

        # 5. Data: each rank reads its data-parallel share; every model chunk gets its own iterator
        # because the interleaved schedule pulls micro-batches per chunk.
        t = cfg.training
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.train_ds, self.valid_ds = build_pretraining_datasets(
            self.blend, tokenizer=self.tokenizer, seq_length=t.seq_length, seed=t.seed,
            train_samples=t.train_iters * t.global_batch_size,
            valid_samples=cfg.logging.eval_iters * t.global_batch_size,
            split=cfg.data.split, cache_dir=cfg.data.cache_dir or f"{cfg.output_dir}/data_cache",
            data_parallel_size=self.dp_size,
        )
        self.train_iters = [self._loader(self.train_ds, self.state.consumed_samples) for _ in self.model]

        # 6. Metrics. FLOPs over the padded vocabulary the output layer is built with (as Megatron-LM).
        self.forward_backward = get_forward_backward_func()
        vocab = output_vocab_size(cfg, self.arch)
        self.metrics = MetricsLogger(
            cfg.output_dir, enabled=self.is_logging_rank, tensorboard=cfg.logging.tensorboard,
            num_gpus=dist.get_world_size(), flops_per_token=flops_per_token(self.arch, t.seq_length, vocab),
            peak_tflops=peak_tflops(t.precision, t.fp8 is not None, cfg.logging.peak_tflops),
            train_iters=t.train_iters,
        )
        self.stop_signal: int | None = None
        self.stop_signal_at: float | None = None  # time.monotonic() of the first stop signal
        # Preemption deadline: a step can be abandoned between micro-batches only when every rank runs
        # the same micro-batch loop (no pipeline), so that all ranks can agree at each micro-batch.
        self.can_abandon_step = (cfg.checkpoint.preemption_grace_s is not None and len(self.model) == 1
                                 and parallel_state.get_pipeline_model_parallel_world_size() == 1)
        self._microbatch = 0
        self._step_started = 0.0
        self._microbatch_s = 0.0  # measured time of one micro-batch (last completed step)
        self._save_s = 0.0  # measured time of the last checkpoint save
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # -- wiring ------------------------------------------------------------------------------------
    def _loader(self, dataset, consumed_samples: int):
        return build_loader(
            dataset, consumed_samples=consumed_samples, micro_batch_size=self.cfg.training.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, kind=self.cfg.data.loader,
            device=self.cfg.training.device,
        )

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.stop_signal_at is None:
            self.stop_signal_at = time.monotonic()
        log.warning("rank %d received %s: saving a checkpoint at the end of this step, then exiting",
                    self.rank, signal.Signals(signum).name)

    # -- one step ----------------------------------------------------------------------------------
    def _abandon_step(self) -> bool:
        """At a micro-batch boundary, agreed by all ranks: would the step in progress plus a save run
        past the preemption grace period? Then it is abandoned (the state before it is unchanged)."""
        late = False
        if self.stop_signal_at is not None:
            now = time.monotonic()
            per_microbatch = (now - self._step_started) / self._microbatch if self._microbatch else self._microbatch_s
            remaining = (self.num_microbatches - self._microbatch) * per_microbatch
            late = (now - self.stop_signal_at) + remaining + self._save_s > self.cfg.checkpoint.preemption_grace_s
        return self._any_rank(late)

    def _forward_step(self, data_iterator, model):
        """Called by megatron's schedule once per micro-batch and model chunk."""
        if self.can_abandon_step and model.training:
            if self._abandon_step():
                raise _StepAbandoned()
            self._microbatch += 1
        chunk = model
        while hasattr(chunk, "module"):  # DDP -> (Float16Module ->) GPTModel
            chunk = chunk.module
        if chunk.pre_process or chunk.post_process:
            batch = next(data_iterator)
            tokens, labels = batch["tokens"], batch["labels"]
            position_ids, loss_mask = batch["position_ids"], batch["loss_mask"]
        else:  # a middle pipeline stage: its input arrives from the previous stage
            tokens = labels = position_ids = loss_mask = None
        output = model(tokens, position_ids, None, labels=labels)
        return output, partial(self._loss, loss_mask)

    @staticmethod
    def _loss(loss_mask, per_token_loss):
        """Mean over unmasked tokens; returns (sum, count) too so steps and evals average exactly."""
        mask = loss_mask.reshape(-1).float()
        loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
        count = mask.sum()
        return loss_sum, count.to(torch.int), {"loss": torch.stack([loss_sum.detach(), count])}

    def _loss_totals(self, reduced: list[dict]) -> torch.Tensor:
        """[loss sum, token count] over the micro-batches of one schedule run (zeros off the last stage)."""
        if not reduced:
            return torch.zeros(2, device=self.device)
        return torch.stack([r["loss"].float() for r in reduced]).sum(0)

    def _data_parallel_mean(self, totals: torch.Tensor) -> float:
        """Token-weighted mean loss over the data-parallel ranks."""
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        return (totals[0] / totals[1].clamp(min=1)).item()

    def _any_rank(self, condition: bool) -> bool:
        """True on every rank when it is true on any: decisions that all ranks must take together."""
        flag = torch.tensor([float(condition)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _all_finite(self, loss: float, grad_norm: float | None) -> bool:
        """Every rank must agree, or ranks would step different models. The loss exists on the last
        pipeline stage only; the grad norm is already reduced over all ranks."""
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        bad = (last_stage and not math.isfinite(loss)) or (grad_norm is not None and not math.isfinite(grad_norm))
        return not self._any_rank(bad)

    def train_step(self) -> StepStats:
        t, o = self.cfg.training, self.cfg.optimizer
        start = time.perf_counter()
        self._microbatch, self._step_started = 0, time.monotonic()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=self.train_iters if len(self.model) > 1 else self.train_iters[0],
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            decoder_seq_length=t.seq_length,
            forward_only=False,
        )
        self._microbatch_s = (time.monotonic() - self._step_started) / self.num_microbatches
        # The loss exists on the last pipeline stage only.
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        loss = self._data_parallel_mean(self._loss_totals(reduced)) if last_stage else float("nan")
        # megatron's optimizer.step(), split so that a non-finite loss or grad norm skips the update.
        found_inf = self.optimizer.prepare_grads()
        grad_norm = None if found_inf else self.optimizer.get_grad_norm()
        ok = not found_inf and self._all_finite(loss, grad_norm)
        if ok:
            if o.clip_grad > 0:
                clip_grads.clip_grad_by_total_norm_fp32(
                    self.optimizer.get_parameters(), max_norm=o.clip_grad, total_norm=grad_norm)
            ok = self.optimizer.step_with_ready_grads()
        if ok:
            self.state.consecutive_skips = 0
        else:
            self.state.consecutive_skips += 1
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        # Samples are consumed either way: a skipped step does not replay its data.
        self.scheduler.step(increment=t.global_batch_size)
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        if t.device == "cuda":
            torch.cuda.synchronize()
        return StepStats(
            step=self.state.step, loss=loss, lr=lr, grad_norm=grad_norm,
            step_time_s=time.perf_counter() - start, tokens=t.global_batch_size * t.seq_length,
            skipped=not ok,
        )

    # -- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per blend source (watch general-domain forgetting)."""
        t = self.cfg.training
        for m in self.model:
            m.eval()
        losses = {}
        for name, dataset in self.valid_ds.items():
            iterators = [self._loader(dataset, 0) for _ in self.model]
            totals = torch.zeros(2, device=self.device)
            for _ in range(self.cfg.logging.eval_iters):
                reduced = self.forward_backward(
                    forward_step_func=self._forward_step,
                    data_iterator=iterators if len(self.model) > 1 else iterators[0],
                    model=self.model, num_microbatches=self.num_microbatches, seq_length=t.seq_length,
                    micro_batch_size=t.micro_batch_size, decoder_seq_length=t.seq_length, forward_only=True,
                )
                totals += self._loss_totals(reduced)
            losses[name] = self._data_parallel_mean(totals)
        for m in self.model:
            m.train()
        return losses

    # -- the loop ----------------------------------------------------------------------------------
    def _agreed_stop(self) -> bool:
        return self._any_rank(self.stop_signal is not None)

    def save(self, last: bool = False) -> None:
        """`last`: no later save will follow (end of run, stop signal), so a failure is fatal even with
        on_save_failure=continue: exiting 0 would lose the steps since the previous checkpoint."""
        if self.cfg.parallel.overlap_param_gather:  # the step's param all-gather may still be in flight
            for m in self.model:
                m.start_param_sync(force_sync=True)
        try:
            started = time.monotonic()
            self.checkpointer.save(self.state)
            self._save_s = time.monotonic() - started
        except (OSError, RuntimeError) as err:
            if self.cfg.checkpoint.on_save_failure == "stop" or last:
                raise UserError(f"checkpoint save at step {self.state.step} failed: {err}. The previous "
                                f"checkpoint is still the latest; free space / fix the path and rerun") from err
            log.warning("CHECKPOINT SAVE FAILED at step %d (%s); the previous checkpoint stays latest, "
                        "training continues (checkpoint.on_save_failure=continue)", self.state.step, err)

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        if self.rank == 0:
            log.info("training %s from step %d to %d (%d micro-batches of %d per step and DP rank)",
                     cfg.run_name, self.state.step, t.train_iters, self.num_microbatches, t.micro_batch_size)
        history = []
        last_saved = self.state.step
        while self.state.step < t.train_iters:
            try:
                stats = self.train_step()
            except _StepAbandoned:
                elapsed = time.monotonic() - self.stop_signal_at
                log.warning("step %d abandoned %.1f s after %s: it would not finish within "
                            "checkpoint.preemption_grace_s=%g; saving the state after step %d",
                            self.state.step + 1, elapsed, signal.Signals(self.stop_signal).name,
                            cfg.checkpoint.preemption_grace_s, self.state.step)
                for m in self.model:
                    m.zero_grad_buffer()
                if last_saved != self.state.step:
                    self.save(last=True)
                log.warning("stopped after step %d (signal); rerun the same command to resume", self.state.step)
                return {"history": history, "stopped": True}
            history.append(stats)
            if self.is_logging_rank and (stats.step % cfg.logging.log_interval == 0 or stats.skipped
                                         or len(history) == 1):
                self.metrics.log_step(stats)
            if self.state.consecutive_skips >= t.max_consecutive_skips:
                raise TrainingStopped(
                    f"{self.state.consecutive_skips} consecutive steps had a non-finite loss or grad norm "
                    f"(last at step {stats.step}); the last checkpoint is in {self.checkpointer.root}. "
                    "Lower the learning rate or check the data, then rerun to resume from it")
            if cfg.logging.eval_interval and stats.step % cfg.logging.eval_interval == 0:
                self.metrics.log_eval(stats.step, self.evaluate())
            stop = self._agreed_stop() or stats.step == t.stop_after_step
            if stop or stats.step % cfg.checkpoint.save_interval == 0:
                self.save(last=stop or stats.step == t.train_iters)
                last_saved = self.state.step
            if stop:
                log.warning("stopped after step %d (%s); rerun the same command to resume", stats.step,
                            "signal" if self.stop_signal else "training.stop_after_step")
                return {"history": history, "stopped": True}
        if last_saved != self.state.step:
            self.save(last=True)
        final_eval = self.evaluate()
        self.metrics.log_eval(self.state.step, final_eval)
        self.metrics.close()
        return {"history": history, "stopped": False, "eval": final_eval}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melama train",
        description="Continue the pre-training of a LLaMA-2 model on megatron-core. Run it directly for one "
                    "process, or under torchrun / srun for many (TP x PP x DP = number of processes).",
        epilog="Overrides are section.key=value, e.g. training.train_iters=100 parallel.tensor_parallel=2 "
               "optimizer.lr=1e-5. Sections: model, parallel, training, optimizer, data, checkpoint, logging "
               "(see melama_mcore/config/job_config.py for every field and its default).",
    )
    parser.add_argument("--config", help="recipe YAML (examples/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--create-seed-checkpoint", metavar="DIR",
                        help="write the freshly initialised weights to DIR and exit; runs that set "
                             "checkpoint.init_from=DIR start from identical weights whatever their layout")
    return parser


def setup_logging() -> None:
    rank = int(__import__("os").environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    trainer = Trainer(cfg)
    try:
        if args.create_seed_checkpoint:
            trainer.checkpointer.save_weights(args.create_seed_checkpoint)
            return 0
        result = trainer.train()
    finally:
        parallel.shutdown()
    return 0 if result else 1


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer spawns into this module
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
