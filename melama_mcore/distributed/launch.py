"""Where this process stands in the job, as its launcher (torchrun, srun, or none) says: the one
reader of the launch environment. Light on purpose: the CLI reads it before importing torch."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from melama_mcore.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher told it (read once, by `launch_env`)."""

    rank: int
    world_size: int
    local_rank: int
    # torchrun's agent, the parent of this rank (None unless torchrun started it): ranks exit when it
    # dies (distributed/watchdog.py).
    agent_pid: int | None = None


# The parent as it was when the CLI started (this module is among its first imports): read later, the
# agent may already have died and the rank been re-parented.
_PARENT_AT_START = os.getppid()


def launch_env() -> LaunchEnv:
    """torchrun (WORLD_SIZE, RANK, LOCAL_RANK; TORCHELASTIC_RUN_ID marks its ranks), srun starting
    every rank itself (SLURM_PROCID and the step's task count; MASTER_ADDR must be exported, as
    examples/pretrain_70b.slurm does), or one process. The one reader of these variables."""
    env = os.environ
    if "WORLD_SIZE" in env:
        agent = _PARENT_AT_START if "TORCHELASTIC_RUN_ID" in env else None
        return LaunchEnv(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), agent)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        launch = LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)))
        if launch.world_size > 1 and "MASTER_ADDR" not in env:
            raise ConfigError(f"srun started {launch.world_size} ranks but MASTER_ADDR is not set: export "
                              "MASTER_ADDR (the first node) and MASTER_PORT before srun, as "
                              "examples/pretrain_70b.slurm does")
        return launch
    return LaunchEnv(0, 1, 0)


def free_local_port() -> int:
    """A TCP port free on this machine now: the rendezvous of a job whose ranks all run here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
