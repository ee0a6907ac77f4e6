"""Process groups and seeds: torch.distributed from torchrun/SLURM variables, then megatron's groups.

Single-process runs (`melama train` without torchrun) get a one-rank group on a local port, so the
same code path serves a laptop, CI and a 160-GPU cluster.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module

from melama_mcore.config.job_config import JobConfig
from melama_mcore.distributed import cpu_compat, watchdog
from melama_mcore.distributed.launch import LaunchEnv, free_local_port


def initialize(cfg: JobConfig, launch: LaunchEnv) -> None:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) and megatron's model-parallel groups."""
    rank, world, local_rank = launch.rank, launch.world_size, launch.local_rank
    # From here a rank waits on its peers: orphaned by torchrun it would wait forever. Under srun the
    # ranks are children of slurmstepd, not srun, and SLURM itself kills every process of a step when it
    # ends; one process waits on nobody (and `nohup melama train` must outlive its shell).
    if launch.agent_pid is not None:
        watchdog.exit_with_parent(launch.agent_pid, f"rank {rank}: exiting, its launcher (torchrun, pid "
                                                    f"{launch.agent_pid}) is gone")
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_local_port()))
    gpu = cfg.training.device == "cuda"
    if gpu:
        torch.cuda.set_device(local_rank)
    else:
        cpu_compat.enable()
    dist.init_process_group(
        backend="nccl" if gpu else "gloo",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=30),
    )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
    )
    set_seed(cfg.training.seed, gpu)


def set_seed(seed: int, gpu: bool) -> None:
    """Same seed on every rank, so data order is rank-independent. On CPU (use_cpu_initialization)
    megatron builds each full matrix and keeps this rank's slice, so initial weights do not depend
    on TP; on GPU each TP rank initialises its own slice. For weights independent of any layout,
    start runs from one seed checkpoint (`melama train --create-seed-checkpoint DIR`)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if gpu:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.install_rng_tracker()


def wrap_for_training(cfg: JobConfig, chunks: list) -> list[DistributedDataParallel]:
    """Model chunks -> megatron DDP modules (fp32 grad buffers, bucketed, optionally overlapped
    reduce and param gather), with the hooks megatron's schedules call installed on the config, as
    Megatron-LM installs them: no_sync during gradient accumulation, overlapped grad reduce, param
    gathers aligned across pipeline stages under interleaving, and grad finalisation (DP reduce, SP
    norm grads). In bf16 each chunk is first wrapped in megatron's Float16Module (bf16 weights, fp32
    output on the last stage), as Megatron-LM does."""
    p = cfg.parallel
    # Megatron-LM's align_param_gather (on by default, interleaved schedule only): every chunk's
    # gather is launched by the schedule; otherwise the optimizer dispatches the first and DDP's
    # forward pre-hooks the rest.
    align_param_gather = bool(p.overlap_param_gather) and p.virtual_pipeline is not None
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
        align_param_gather=align_param_gather,
    )
    model = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config,
                                module=Float16Module(chunk.config, chunk) if chunk.config.bf16 else chunk,
                                disable_bucketing=i > 0)  # only the first chunk overlaps its reduce
        for i, chunk in enumerate(chunks)
    ]
    config = chunks[0].config

    def hook(name: str):
        return getattr(model[0], name) if len(model) == 1 else [getattr(m, name) for m in model]

    config.no_sync_func = hook("no_sync")
    if p.overlap_grad_reduce:
        config.grad_sync_func = hook("start_grad_sync")
    if align_param_gather:
        config.param_sync_func = hook("start_param_sync")
    config.finalize_model_grads_func = finalize_model_grads
    return model


def wrap_for_inference(cfg: JobConfig, chunks: list) -> list:
    """Model chunks for forward-only use (evaluation): in bf16 wrapped in megatron's Float16Module,
    as for training, so the numbers are the trainer's; no DDP, no gradient buffers."""
    return [Float16Module(chunk.config, chunk) if chunk.config.bf16 else chunk for chunk in chunks]


def shutdown() -> None:
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
