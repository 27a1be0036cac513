"""Sparse DFA: direct feedback alignment through sparse ±1 feedback matrices.

Unit l below the top gets ``g_l = e·B_l / √(density·C)``, reshaped to its output, where B_l is a
fixed C x D_l matrix whose entries are +1 or −1 with probability density/2 each and 0 otherwise
(unit variance after the scale, as DFA's Gaussian feedback); the top unit gets ``e`` itself. From
the repository root: ``trainer run examples/rules/sparse_dfa.toml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trainer.rules import RuleContext, UnitBatch, UnitOptions, UnitRule
from trainer.units import primary


@dataclass
class SparseDFAOptions(UnitOptions):
    """granularity and units (``UnitOptions``), and the share of non-zero feedback entries."""

    density: float = 0.1

    def validate(self) -> None:
        if not 0 < self.density <= 1:
            raise ValueError(f"density: must be in (0, 1], got {self.density}")


class SparseDFA(UnitRule):
    """DFA whose fixed feedback is sparse ±1: each class reaches only a share of a unit's outputs."""

    name = "sparse_dfa"
    Options = SparseDFAOptions

    def __init__(self, model: nn.Module, options: SparseDFAOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        gen = torch.Generator().manual_seed(ctx.seed)  # the same matrices on every process
        for index, shape in enumerate(self.output_shapes[:-1]):
            u = torch.rand(ctx.num_classes, math.prod(shape), generator=gen)
            b = torch.where(u < options.density / 2, -1.0, 1.0) * (u < options.density)
            self.register_buffer(f"feedback{index}", (b / math.sqrt(options.density * ctx.num_classes)).to(ctx.device))

    @torch.no_grad()
    def signals(self, batch: UnitBatch) -> list[torch.Tensor]:
        signals = []
        for index in batch.indices():  # all units on one process, a pipeline stage's own on a stage
            if index == self.top:
                signals.append(batch.error)
                continue
            h = primary(batch.output_of(index))
            signals.append((batch.error @ getattr(self, f"feedback{index}")).view(h.shape).to(h.dtype))
        return signals
