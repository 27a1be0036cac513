"""Moved to ``trainer.parallel.processes`` (``DistEnv``, joining and leaving the job) and
``trainer.parallel.data_parallel`` (the collectives of data parallelism); this module re-exports
their names for one release."""

from trainer.parallel.data_parallel import (
    all_reduce_sum, average_buffers, average_gradients_before_step, broadcast_state,
)
from trainer.parallel.processes import DistEnv, finish, init_distributed

__all__ = ["DistEnv", "all_reduce_sum", "average_buffers", "average_gradients_before_step", "broadcast_state",
           "finish", "init_distributed"]
