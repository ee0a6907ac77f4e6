"""Where this process stands in the job, as its launcher (torchrun, srun, or none) says: the one
reader of the launch environment. Light on purpose: the CLI reads it before importing torch."""

from __future__ import annotations

import os
from dataclasses import dataclass

from melama_mcore.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher told it (read once, by `launch_env`)."""

    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """torchrun (WORLD_SIZE, RANK, LOCAL_RANK), srun starting every rank itself (SLURM_PROCID and
    the step's task count; MASTER_ADDR must be exported, as examples/pretrain_70b.slurm does), or
    one process. The one reader of these variables."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return LaunchEnv(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        launch = LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)))
        if launch.world_size > 1 and "MASTER_ADDR" not in env:
            raise ConfigError(f"srun started {launch.world_size} ranks but MASTER_ADDR is not set: export "
                              "MASTER_ADDR (the first node) and MASTER_PORT before srun, as "
                              "examples/pretrain_70b.slurm does")
        return launch
    return LaunchEnv(0, 1, 0)
