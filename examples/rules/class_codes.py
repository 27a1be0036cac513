"""Class-code targets: forward-only training toward a fixed random binary code of each class.

Each class c has, at every unit l below the top, a fixed random code ``t_l[c]`` in {0, 1}^D_l (each
bit on with probability ``density``). Unit l minimises ``J_l = ‖h_l − t_l[y]‖² / 2N``, so its signal
``g_l = (h_l − t_l[y]) / N`` needs only the labels: every unit updates right after its own forward
and frees its graph (forward-only, as DRTP), and the top unit gets ``e``. The codes are
non-negative, which suits ReLU units (a zero-mean target pulls them to zero, where they stop
learning). From the repository root: ``trainer run examples/rules/class_codes.toml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trainer.rules import RuleContext, UnitOptions, UnitRule


@dataclass
class ClassCodeOptions(UnitOptions):
    """granularity and units (``UnitOptions``); forward_only (false: every unit runs, then one joint
    backward; the same update); density: the share of bits on in each code."""

    forward_only: bool = True
    density: float = 0.5

    def validate(self) -> None:
        if not 0 < self.density < 1:
            raise ValueError(f"density: must be in (0, 1), got {self.density}")


class ClassCodes(UnitRule):
    """Each unit below the top learns alone, toward its binary code of the label."""

    name = "class_codes"
    Options = ClassCodeOptions
    preparable = "each unit steps right after its own forward, toward a target read from the labels"

    def __init__(self, model: nn.Module, options: ClassCodeOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        self.forward_only = options.forward_only
        gen = torch.Generator().manual_seed(ctx.seed)  # the same codes on every process
        for index, shape in enumerate(self.output_shapes[:-1]):
            codes = torch.rand(ctx.num_classes, math.prod(shape), generator=gen) < options.density
            self.register_buffer(f"codes{index}", codes.float().to(ctx.device))

    def unit_signal(self, index: int, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = getattr(self, f"codes{index}")[y].view(output.shape)
        return ((output.detach().float() - target) / len(y)).to(output.dtype)
