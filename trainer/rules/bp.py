"""Backprop: the baseline every other rule is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.rules.base import Rule, RuleContext, StepResult, UnitBatch
from trainer.units import call_model


@dataclass
class BackpropOptions:
    """Plain end-to-end backprop has no options of its own."""


class Backprop(Rule):
    """End-to-end backprop through the (compiled) model."""

    name = "bp"
    Options = BackpropOptions
    pipelining = "torch"  # GPipe or 1F1B through torch.distributed.pipelining (trainer.parallel.backprop)

    def __init__(self, model: nn.Module, options: BackpropOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        if ctx.compile:
            model.compile()  # in place: the state_dict keys stay those of the plain model

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        with self.autocast():
            logits = call_model(self.model, x)
        loss = self.criterion(logits.float(), y)
        loss.backward()
        self.after_backward(UnitBatch(x, y, [logits.detach()], None))
        self.step(optimizer)
        return StepResult(loss.detach(), logits.detach())
