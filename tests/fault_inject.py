"""Test-side launcher: `python -m fault_inject ARGS` (or under torchrun) runs the real trainer,
`melama_mcore.train.main`, with faults monkeypatched in from the outside. Production code carries
no test hooks; everything here wraps its public methods.

Faults come from the MELAMA_FAULTS environment variable, a JSON object (every key optional):
    kill:             {"step": N, "microbatch": M, "rank": R, "job": bool}
                      SIGKILL in the forward pass of micro-batch M (0-based) of step N, on rank R;
                      "job": true also kills torchrun's agent (the ranks' parent), as a node failure
                      or `scancel --signal=KILL` would; the other ranks then exit by themselves
                      (torchrun starts each rank in its own session, so no signal to a process
                      group reaches them all; melama's watchdog ends a rank whose agent is gone).
    kill_in_save:     {"step": N, "job": bool}  SIGKILL right after megatron finished writing the
                      checkpoint of step N into its .partial folder, before it is published.
    save_error:       {"steps": [N...], "errno": "ENOSPC"}  the save of step N writes part of the
                      checkpoint, then raises OSError(errno), as a full disk does.
    write_error:      {"steps": [N...], "rank": R, "errno": "ENOSPC"}  on rank R only, megatron's
                      checkpoint writer fails writing its files of step N (a full local disk).
    nan_loss_steps:   [N...]  the loss of step N is multiplied by NaN (so are all its gradients).
    inf_grad_steps:   [N...]  one gradient of step N is set to +inf (the loss stays finite).
    slow_step:        {"step": N, "seconds": S}  every micro-batch of step N sleeps S seconds.
    marker_step:      N       after step N, write <output_dir>/reached_step_N (tests wait on it).
Recorded for the test (files under MELAMA_FAULT_DIR):
    exit_rank{R}               the exit status main() returned on rank R
    params_step{N}_rank{R}.pt  model parameters after every step (when MELAMA_FAULT_DIR is set)
    samples_rank{R}.jsonl      {"step", "indices"}: the global sample indices each step consumed
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from melama_mcore import train
from melama_mcore.checkpoint import checkpointer as ckpt_module
from melama_mcore.data import loader as loader_module

FAULTS = json.loads(os.environ.get("MELAMA_FAULTS", "{}"))
RECORD_DIR = os.environ.get("MELAMA_FAULT_DIR")
RANK = int(os.environ.get("RANK", 0))


def _die(job: bool) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if job:
        os.kill(os.getppid(), signal.SIGKILL)  # torchrun's agent
    os.kill(os.getpid(), signal.SIGKILL)


# -- sample indices actually consumed -------------------------------------------------------------
_consumed: list[list[int]] = []
_original_indices = loader_module.rank_sample_indices


def _recording_indices(*args, **kwargs):
    inner = _original_indices(*args, **kwargs)

    def gen():
        for batch in inner:
            _consumed.append([int(i) for i in batch])
            yield batch

    return gen()


loader_module.rank_sample_indices = _recording_indices


# -- the step -------------------------------------------------------------------------------------
_original_train_step = train.Trainer.train_step
_original_forward_step = train.Trainer._forward_step
_original_init = train.Trainer.__init__


def _step_in_progress(trainer) -> int:
    return trainer.state.step + 1


def _init(self, cfg):
    _original_init(self, cfg)
    self._fault_microbatch = 0
    inf_steps = set(FAULTS.get("inf_grad_steps", []))
    if inf_steps:
        prepare = self.optimizer.prepare_grads

        def prepare_with_inf():
            if _step_in_progress(self) in inf_steps:
                for chunk in self.model:
                    for p in chunk.parameters():
                        p.main_grad.view(-1)[0] = float("inf")
                        break
                    break
            return prepare()

        self.optimizer.prepare_grads = prepare_with_inf


def _forward_step(self, data_iterator, model):
    step = _step_in_progress(self)
    kill = FAULTS.get("kill")
    if kill and kill["step"] == step and kill.get("rank", 0) == RANK and self.model[0].training and \
            kill.get("microbatch", 0) == self._fault_microbatch:
        print(f"FAULT: SIGKILL {'job' if kill.get('job') else f'rank {RANK}'} in step {step}, "
              f"micro-batch {self._fault_microbatch}", flush=True)
        _die(kill.get("job", False))
    slow = FAULTS.get("slow_step")
    if slow and slow["step"] == step and self.model[0].training:
        time.sleep(slow["seconds"])
    self._fault_microbatch += 1
    output, loss_func = _original_forward_step(self, data_iterator, model)
    if step in FAULTS.get("nan_loss_steps", []) and self.model[0].training:
        output = output * float("nan")
    return output, loss_func


def _train_step(self):
    self._fault_microbatch = 0
    _consumed.clear()
    stats = _original_train_step(self)
    if stats is None:  # abandoned (preemption deadline)
        return stats
    if RECORD_DIR:
        out = Path(RECORD_DIR)
        out.mkdir(parents=True, exist_ok=True)
        params = {f"{i}.{name}": p.detach().clone() for i, chunk in enumerate(self.chunks)
                  for name, p in chunk.named_parameters()}
        torch.save(params, out / f"params_step{stats.step}_rank{RANK}.pt")
        with open(out / f"samples_rank{RANK}.jsonl", "a") as f:
            f.write(json.dumps({"step": stats.step, "indices": [i for b in _consumed for i in b]}) + "\n")
    if FAULTS.get("marker_step") == stats.step and RANK == 0:
        Path(self.cfg.output_dir, f"reached_step_{stats.step}").touch()
    return stats


train.Trainer.__init__ = _init
train.Trainer._forward_step = _forward_step
train.Trainer.train_step = _train_step


# -- checkpoint saves -----------------------------------------------------------------------------
_original_dcp_save = ckpt_module.dist_checkpointing.save


class _PatchedDistCheckpointing:
    """Stands in for the `dist_checkpointing` module inside checkpoint/checkpointer.py."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def save(self, state, path, *args, **kwargs):
        step = (state.get("train_state") or {}).get("step")
        error = FAULTS.get("save_error")
        if error and step in error["steps"]:
            Path(path, "__half_written.distcp").write_bytes(b"\0" * 1024)
            code = getattr(errno, error.get("errno", "ENOSPC"))
            print(f"FAULT: save of step {step} raises OSError({error.get('errno', 'ENOSPC')})", flush=True)
            raise OSError(code, os.strerror(code), str(path))
        result = self._real.save(state, path, *args, **kwargs)
        kill = FAULTS.get("kill_in_save")
        if kill and kill["step"] == step:
            print(f"FAULT: SIGKILL during the save of step {step} (files written, not published)", flush=True)
            _die(kill.get("job", False))
        return result


ckpt_module.dist_checkpointing = _PatchedDistCheckpointing(ckpt_module.dist_checkpointing)


# -- one rank's writes fail inside megatron's checkpoint writer -----------------------------------------
_WRITE_ERROR = FAULTS.get("write_error")
if _WRITE_ERROR and _WRITE_ERROR.get("rank", 0) == RANK:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _original_write_item = filesystem_async._write_item

    @functools.wraps(_original_write_item)  # megatron inspects its signature
    def _failing_write_item(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if any(f"iter_{step:07d}" in str(stream.name) for step in _WRITE_ERROR["steps"]):
            name = _WRITE_ERROR.get("errno", "ENOSPC")
            print(f"FAULT: rank {RANK} fails writing {Path(str(stream.name)).name} ({name})", flush=True)
            raise OSError(getattr(errno, name), os.strerror(getattr(errno, name)), str(stream.name))
        return _original_write_item(*args, **kwargs)

    filesystem_async._write_item = _failing_write_item


if __name__ == "__main__":  # megatron's checkpoint writer spawns into this module: keep the guard
    from melama_mcore.cli import run_main

    code = run_main(train.main, sys.argv[1:])
    if RECORD_DIR:  # each rank's own exit status (torchrun reports only the first failure)
        Path(RECORD_DIR).mkdir(parents=True, exist_ok=True)
        Path(RECORD_DIR, f"exit_rank{RANK}").write_text(str(code))
    sys.exit(code)
