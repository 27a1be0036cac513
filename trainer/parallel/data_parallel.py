"""Data-parallel training under ``torchrun``, for every rule.

Rules write their updates into ``.grad`` and step the optimizer themselves (once per batch, or
once per unit for forward-only rules), so the one place every update passes through is
``optimizer.step``. A step pre-hook averages the gradients present across ranks there: BP, the
local rules and forward-only per-unit steps are all covered by the same ten lines, with no
wrapper around the model. Fixed random matrices come from the shared seed, so they are identical
on every rank; parameters are broadcast from rank 0 once at the start.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def broadcast_state(modules: list[nn.Module]) -> None:
    """Give every rank rank 0's parameters and buffers."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)  # channels_last tensors too (dense, checked with gloo)


def average_gradients_before_step(optimizer: torch.optim.Optimizer, world_size: int, group: Any = None) -> None:
    """Average, across the ``world_size`` ranks of ``group`` (default: all), every gradient present
    when ``optimizer.step`` is called."""

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
        dist.all_reduce(flat, group=group)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    optimizer.register_step_pre_hook(hook)


def average_buffers(module: nn.Module, world_size: int, group: Any = None) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ``world_size`` ranks
    of ``group`` (default: all) so that they evaluate alike."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, group=group)
            buffer /= world_size


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few Python numbers over ranks (on the GPU for NCCL, which has no CPU tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
