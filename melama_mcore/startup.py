"""Start-up, the same for every entry point that runs the model: training, the throughput
benchmark, conversion checks and evaluation of a checkpoint.

    launch environment -> training strategy -> config resolved for this machine -> checked -> process groups

Everything before the process groups runs on every rank without communicating, so a bad recipe
fails in seconds, with one message listing every problem (printed by rank 0 only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from melama_mcore.config.job_config import JobConfig
from melama_mcore.config.validate import Environment, detect_environment, resolve, validate
from melama_mcore.distributed import parallel
from melama_mcore.distributed.launch import LaunchEnv, launch_env
from melama_mcore.errors import ConfigError
from melama_mcore.models.llama.config_registry import LlamaArch, resolve_arch
from melama_mcore.models.llama.model import choose_backend
from melama_mcore.strategies import TrainingStrategy, strategy_for

log = logging.getLogger("melama")


@dataclass
class Runtime:
    cfg: JobConfig
    arch: LlamaArch
    strategy: TrainingStrategy  # which weights train (the recipe's peft section), chosen once here
    env: Environment
    launch: LaunchEnv
    backend: str  # the layer backend the model is built with
    device: torch.device  # where collectives' tensors live: NCCL reduces only CUDA tensors


@dataclass
class Configured:
    arch: LlamaArch
    strategy: TrainingStrategy
    env: Environment
    launch: LaunchEnv


def configure(cfg: JobConfig, tokenizer_vocab_size: int | None = None, problems: list[str] = ()) -> Configured:
    """Resolve `cfg` in place for this machine and check it, with the caller's own `problems` and
    the training strategy's reported in the same message; no process group is started."""
    launch = launch_env()
    env = detect_environment(launch.world_size)
    problems = list(problems)
    try:
        strategy = strategy_for(cfg.peft)
    except ConfigError as err:  # reported with everything else below
        strategy = strategy_for(None)
        problems.append(str(err))
    problems += strategy.config_problems(cfg)
    resolve(cfg, env, optimizer_format=strategy.default_optimizer_format)
    arch = resolve_arch(cfg.model, tokenizer_vocab_size)
    validate(cfg, arch, env, problems)
    return Configured(arch, strategy, env, launch)


def start(cfg: JobConfig, tokenizer_vocab_size: int | None = None, problems: list[str] = ()) -> Runtime:
    """configure(), then torch.distributed and megatron's model-parallel groups."""
    c = configure(cfg, tokenizer_vocab_size, problems)
    parallel.initialize(cfg, c.launch)
    gpu = cfg.training.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    backend = choose_backend(cfg.model.backend, cfg.training.device, c.env.transformer_engine,
                             c.strategy.megatron_linears_only)
    return Runtime(cfg=cfg, arch=c.arch, strategy=c.strategy, env=c.env, launch=c.launch, backend=backend,
                   device=device)
