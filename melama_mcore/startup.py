"""Start-up, the same for every entry point that runs the model: training, the throughput
benchmark, conversion checks and evaluation of a checkpoint.

    launch environment -> config resolved for this machine -> checked -> process groups

Everything before the process groups runs on every rank without communicating, so a bad recipe
fails in seconds, with one message listing every problem (printed by rank 0 only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from melama_mcore.config.job_config import JobConfig
from melama_mcore.config.validate import Environment, detect_environment, resolve, validate
from melama_mcore.models.llama.config_registry import resolve_arch
from melama_mcore.distributed import parallel
from melama_mcore.distributed.launch import LaunchEnv, launch_env
from melama_mcore.models.llama.config_registry import LlamaArch
from melama_mcore.models.llama.model import choose_backend

log = logging.getLogger("melama")


@dataclass
class Runtime:
    cfg: JobConfig
    arch: LlamaArch
    env: Environment
    launch: LaunchEnv
    backend: str  # the layer backend the model is built with
    device: torch.device  # where collectives' tensors live: NCCL reduces only CUDA tensors


def configure(cfg: JobConfig, tokenizer_vocab_size: int | None = None,
              problems: list[str] = ()) -> tuple[LlamaArch, Environment, LaunchEnv]:
    """Resolve `cfg` in place for this machine and check it, with the caller's own `problems`
    reported in the same message; no process group is started."""
    launch = launch_env()
    env = detect_environment(launch.world_size)
    resolve(cfg, env)
    arch = resolve_arch(cfg.model, tokenizer_vocab_size)
    validate(cfg, arch, env, problems)
    return arch, env, launch


def start(cfg: JobConfig, tokenizer_vocab_size: int | None = None, problems: list[str] = ()) -> Runtime:
    """configure(), then torch.distributed and megatron's model-parallel groups."""
    arch, env, launch = configure(cfg, tokenizer_vocab_size, problems)
    parallel.initialize(cfg, launch)
    gpu = cfg.training.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    backend = choose_backend(cfg.model.backend, cfg.training.device, env.transformer_engine, cfg.peft.method == "lora")
    return Runtime(cfg=cfg, arch=arch, env=env, launch=launch, backend=backend, device=device)
