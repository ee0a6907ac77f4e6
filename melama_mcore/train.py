"""The training loop: LLaMA-2 continual pre-training on megatron-core.

    torchrun --nproc-per-node 8 -m melama_mcore.train --config examples/configs/llama2_7b.yaml \
        training.train_iters=100 parallel.tensor_parallel=4

Order of work, each in one place: start-up (startup.py: the training strategy chosen, the config
resolved and checked before any process group, then the groups), the ready model (ready_model.py:
built, the strategy applied, wrapped in megatron's DDP with its optimizer and schedule, then resumed
or initialised from a checkpoint), the data (data/run_data.py: its kind decided once), then the
loop: one step (step.py: megatron's pipeline schedule over the global batch's micro-batches, then
the optimizer update unless the loss or grad norm is non-finite), metrics, validation per blend
source, and checkpoints every N steps, at the end, and when SIGTERM/SIGUSR1 (cluster preemption)
arrives.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from melama_mcore import ready_model, step
from melama_mcore.checkpoint.integrity import model_identity
from melama_mcore.checkpoint.opened import init_from_problem
from melama_mcore.components.metrics import MetricsLogger, StepStats, peak_tflops
from melama_mcore.config.job_config import JobConfig, dump_config, load_config
from melama_mcore.data.blend import load_blend
from melama_mcore.data.loader import build_loader
from melama_mcore.data.run_data import build_run_datasets, check_run_data, data_kind
from melama_mcore.data.sft.indexed import blend_chat_template
from melama_mcore.data.tokenizer import load_tokenizer
from melama_mcore.distributed import parallel
from melama_mcore.errors import UserError
from melama_mcore.output_paths import check_new_folder, check_output_dir, remove_created_folders
from melama_mcore.startup import configure, start

log = logging.getLogger("melama")


class TrainingStopped(UserError):
    """Too many consecutive non-finite steps."""

    exit_code = 3


class Trainer:
    def __init__(self, cfg: JobConfig):
        # 1. Start-up: the config checked before any process group, then the groups.
        missing = [f"data.{key} must be set (see examples/configs/)"
                   for key, value in (("tokenizer", cfg.data.tokenizer), ("blend", cfg.data.blend)) if not value]
        if cfg.checkpoint.init_from and (problem := init_from_problem(Path(cfg.checkpoint.init_from))):
            missing.append(problem)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
        configure(cfg, self.tokenizer and self.tokenizer.vocab_size, missing)  # fails here, before any group
        created = (check_output_dir(cfg.output_dir, "output_dir")
                   + check_output_dir(Path(cfg.output_dir) / "checkpoints", "output_dir"))
        try:
            self._start(cfg)
        except BaseException:  # a start that fails leaves no empty output folder behind
            remove_created_folders(created)
            raise

    def _start(self, cfg: JobConfig) -> None:
        """The rest of the start-up, once the outputs are known to be writable."""
        self.blend = load_blend(cfg.data.blend)
        self.data_kind = data_kind(self.blend)  # pre-training text, or packed instruction data
        cfg.data.chat_template = blend_chat_template(self.blend)  # kept in every checkpoint's config.yaml
        t = cfg.training
        check_run_data(cfg, self.blend, self.data_kind, self.tokenizer)
        runtime = start(cfg, self.tokenizer.vocab_size)
        self.cfg, self.arch, self.device, self.strategy = cfg, runtime.arch, runtime.device, runtime.strategy
        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_logging_rank = self.rank == world - 1  # the last pipeline stage holds the loss
        p = cfg.parallel
        log.info("world %d = TP %d x PP %d x DP %d%s | %s, %s%s", world, p.tensor_parallel, p.pipeline_parallel,
                 self.dp_size, f" x VP {p.virtual_pipeline}" if p.virtual_pipeline else "", t.device, t.precision,
                 ", distributed optimizer" if p.use_distributed_optimizer else "")

        # 2. The model, ready: chunks (one per virtual pipeline stage) with the training strategy applied,
        # wrapped for training with optimizer and schedule, then this run resumed, or started from
        # checkpoint.init_from's weights, or from scratch.
        ready = ready_model.for_training(cfg, runtime, identity=model_identity(self.arch, self.tokenizer, cfg))
        self.chunks, self.model = ready.chunks, ready.model
        self.optimizer, self.scheduler = ready.optimizer, ready.scheduler
        self.checkpointer, self.state = ready.checkpointer, ready.state
        self.schedule = step.Schedule(cfg, self.model, self.device)

        # 3. Data: each rank reads its data-parallel share; every model chunk gets its own iterator
        # because the interleaved schedule pulls micro-batches per chunk.
        self.train_ds, self.valid_ds = build_run_datasets(cfg, self.blend, self.data_kind, self.tokenizer,
                                                          self.dp_size)
        self._step_fn = partial(step.forward_step, data=self.data_kind, loss_normalization=t.loss_normalization)
        self.train_iters = [self._loader(self.train_ds, self.state.consumed_samples) for _ in self.model]

        # 4. Metrics. FLOPs as the strategy trains (LoRA: no weight gradients for the frozen base), over
        # the padded vocabulary the output layer is built with (as Megatron-LM).
        self.metrics = MetricsLogger(
            cfg.output_dir, enabled=self.is_logging_rank, tensorboard=cfg.logging.tensorboard, num_gpus=world,
            flops_per_token=step.flops_per_token(cfg, self.arch, self.strategy),
            peak_tflops=peak_tflops(t.precision, t.fp8 is not None, cfg.logging.peak_tflops),
            train_iters=t.train_iters, first_step=self.state.step,
        )

        # 5. Preemption: SIGTERM/SIGUSR1 ask for a save at the end of the step. With a grace period,
        # a step is run as groups of micro-batches, and between groups all ranks agree whether the
        # rest of the step plus a save would still fit (see _groups).
        self.stop_signal: int | None = None
        self.stop_signal_at: float | None = None  # time.monotonic() of the first stop signal
        self._group_s = 0.0  # measured time of one micro-batch group
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

    def _forward_step(self, data_iterator, model):
        """The forward step megatron's schedule calls (one micro-batch, one model chunk)."""
        return self._step_fn(data_iterator, model)

    # -- one step ----------------------------------------------------------------------------------
    def _groups(self) -> list[int]:
        """Micro-batches per group of this step. Without a grace period: one group, the whole step.
        With one: a group per micro-batch without a pipeline (no cost); with a pipeline, groups of a
        multiple of the pipeline size (the interleaved schedule needs it), about four per step: each
        group boundary is a pipeline flush, so this costs (groups - 1) extra pipeline bubbles."""
        n = self.schedule.num_microbatches
        if self.cfg.checkpoint.preemption_grace_s is None:
            return [n]
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        size = 1 if pp == 1 else pp * max(1, n // (4 * pp))
        return [size] * (n // size) + ([n % size] if n % size else [])

    def _fits_before_deadline(self, groups_left: int) -> bool:
        """Agreed by all ranks between micro-batch groups: False when a stop signal has arrived and
        the rest of the step plus a save would run past the preemption grace period."""
        late = False
        if self.stop_signal_at is not None:
            remaining = groups_left * self._group_s + self._save_s
            late = time.monotonic() - self.stop_signal_at + remaining > self.cfg.checkpoint.preemption_grace_s
        return not step.any_rank(late, self.device)

    def train_step(self) -> StepStats | None:
        """One optimizer step over a global batch; None when the step was abandoned (preemption)."""
        t, o = self.cfg.training, self.cfg.optimizer
        started = time.perf_counter()
        groups = self._groups()

        def go_on(done: int) -> bool:
            self._group_s = (time.perf_counter() - started) / done
            return self._fits_before_deadline(len(groups) - done)

        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        result = step.train_step(self.schedule, self.optimizer, self.train_iters, self._forward_step, o.clip_grad,
                                 groups=groups, go_on=go_on)
        if result is None:
            return None
        self.state.consecutive_skips = 0 if result.updated else self.state.consecutive_skips + 1
        # Samples are consumed either way: a skipped step does not replay its data.
        self.scheduler.step(increment=t.global_batch_size)
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        totals = result.totals
        return StepStats(step=self.state.step, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                         step_time_s=step.synchronized_time(self.device) - started,
                         tokens=t.global_batch_size * t.seq_length, skipped=not result.updated,
                         packing_efficiency=(totals[2] / totals[3]).item() if self.data_kind.packed else None)

    # -- validation --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation loss per blend source (watch general-domain forgetting)."""
        totals = step.validation_totals(self.schedule, self.cfg, self.valid_ds, self._loader, self._forward_step)
        return {name: (t[0] / t[1].clamp(min=1)).item() for name, t in totals.items()}

    # -- the loop ----------------------------------------------------------------------------------
    def save(self, last: bool = False) -> None:
        """`last`: no later save will follow (end of run, stop signal), so a failure is fatal even with
        on_save_failure=continue: exiting 0 would lose the steps since the previous checkpoint."""
        step.sync_params(self.model, self.cfg)
        try:
            started = time.monotonic()
            self.checkpointer.save(self.state)
            self._save_s = time.monotonic() - started
        except (OSError, RuntimeError) as err:
            previous = self.checkpointer.latest()
            kept = (f"the checkpoint of step {previous} is still the latest" if previous is not None
                    else "no checkpoint of this run exists yet")
            if self.cfg.checkpoint.on_save_failure == "stop" or last:
                raise UserError(f"checkpoint save at step {self.state.step} failed: {err}. {kept[0].upper()}{kept[1:]}; "
                                "free space / fix the path and rerun") from err
            log.warning("CHECKPOINT SAVE FAILED at step %d (%s); %s, training continues "
                        "(checkpoint.on_save_failure=continue)", self.state.step, err, kept)

    def _stop(self, history: list, reason: str) -> dict:
        log.warning("stopped after step %d (%s); rerun the same command to resume", self.state.step, reason)
        self.metrics.close()
        return {"history": history, "stopped": True}

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        log.info("training %s from step %d to %d (%d micro-batches of %d per step and DP rank)",
                 cfg.run_name, self.state.step, t.train_iters, self.schedule.num_microbatches, t.micro_batch_size)
        history = []
        last_saved = self.state.step
        while self.state.step < t.train_iters:
            stats = self.train_step()
            if stats is None:
                log.warning("step %d abandoned %.1f s after %s: it would not finish within "
                            "checkpoint.preemption_grace_s=%g; saving the state after step %d",
                            self.state.step + 1, time.monotonic() - self.stop_signal_at,
                            signal.Signals(self.stop_signal).name, cfg.checkpoint.preemption_grace_s, self.state.step)
                if last_saved != self.state.step:
                    self.save(last=True)
                return self._stop(history, "signal")
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
            stop = step.any_rank(self.stop_signal is not None, self.device) or stats.step == t.stop_after_step
            if stop or stats.step % cfg.checkpoint.save_interval == 0:
                self.save(last=stop or stats.step == t.train_iters)
                last_saved = self.state.step
            if stop:
                return self._stop(history, "signal" if self.stop_signal else "training.stop_after_step")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    if args.create_seed_checkpoint:
        check_new_folder(args.create_seed_checkpoint, "--create-seed-checkpoint")
    try:  # the process groups are shut down however the run ends, also when the trainer fails to start
        trainer = Trainer(cfg)
        if args.create_seed_checkpoint:
            trainer.checkpointer.save_weights(args.create_seed_checkpoint)
            return 0
        trainer.train()
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
