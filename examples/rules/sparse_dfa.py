"""Sparse DFA: direct feedback alignment through sparse ±1 feedback matrices.

Unit l below the top gets ``g_l = e·B_l / √(density·C)``, reshaped to its output, where B_l is a
fixed C x D_l matrix whose entries are +1 or −1 with probability density/2 each and 0 otherwise
(unit variance after the scale, as DFA's Gaussian feedback); the top unit gets ``e`` itself. A DFA
variant is a subclass that makes its own feedback matrices (``DFA.feedback_matrix``); everything
else (the signals, bp_units, per-position logits, pipelines, ``prepare()``) is DFA's. From the
repository root: ``trainer run examples/rules/sparse_dfa.toml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.rules.dfa import DFA, DFAOptions
from trainer.rules.projection import FixedProjection


@dataclass
class SparseDFAOptions(DFAOptions):
    """DFA's options (its feedback_init, feedback_storage and feedback_scale are not used: the
    matrices are sparse ±1, scaled by 1/√(density·C)), and the share of non-zero entries."""

    density: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not 0 < self.density <= 1:
            raise ValueError(f"density: must be in (0, 1], got {self.density}")


class SparseDFA(DFA):
    """DFA whose fixed feedback is sparse ±1: each class reaches only a share of a unit's outputs."""

    name = "sparse_dfa"
    Options = SparseDFAOptions

    def feedback_matrix(self, index: int, dim: int) -> FixedProjection:
        density, classes = self.options.density, self.ctx.num_classes
        u = torch.rand(classes, dim, generator=torch.Generator().manual_seed(self.ctx.seed + index))  # same on every process
        b = torch.where(u < density / 2, -1.0, 1.0) * (u < density)
        return FixedProjection(classes, dim, matrix=b / math.sqrt(density), scale=1.0, device=self.ctx.device)
