"""The job's processes under ``torchrun``: joining its process group, each rank's place in the
(replicas × stages) mesh, and leaving it. One process without torchrun is rank 0 of 1."""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from trainer.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun).

    A job of ``world_size = stages × replicas`` processes is a 2-D mesh: each row of ``stages``
    consecutive ranks is one pipeline (``trainer.parallel.layout.Pipeline``), and the ranks holding
    the same stage in every row are its data-parallel replicas. ``stages = 1`` is plain data
    parallelism (``trainer.parallel.data_parallel``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    stages: int = 1
    pipeline_group: Any = None  # this rank's row (None: the default group)
    replica_group: Any = None  # the ranks holding this rank's stage (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def replicas(self) -> int:
        return self.world_size // self.stages

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    def rank_of(self, stage: int) -> int:
        """The global rank of ``stage`` in this rank's pipeline."""
        return self.replica * self.stages + stage

    @property
    def is_main(self) -> bool:
        """The rank that prints, logs and writes the run folder: the last stage of the first
        pipeline (the one that sees the loss); rank 0 without a pipeline."""
        return self.rank == self.stages - 1


def init_distributed(device_type: str, stages: int = 1, timeout_s: float | None = None) -> DistEnv:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a no-op otherwise.
    With ``stages > 1``, lay the ranks out as a (replicas, stages) device mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % stages:
        raise ConfigError(f"[train] pipeline_stages = {stages} does not divide the {world} processes: launch "
                          f"stages × data-parallel replicas processes (torchrun --nproc_per_node={stages})")
    if world == 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **timeout)
    if stages == 1:
        return env
    mesh = init_device_mesh(device_type, (world // stages, stages), mesh_dim_names=("replica", "stage"))
    return dataclasses.replace(env, stages=stages, pipeline_group=mesh.get_group("stage"),
                               replica_group=mesh.get_group("replica"))


def finish(env: DistEnv) -> None:
    """Leave the job cleanly: wait for every rank, then tear the process group down (an exit
    with the group alive can abort a rank that is still closing its connections)."""
    if env.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
