"""Shallow learning: only the top unit learns, every unit below stays at its initialisation.

The lower bound that tables of local rules report: what a trained readout (the top unit at
``granularity``) makes of fixed random features. The lower units run forward and get no signal,
so the optimizer never touches them (their BatchNorm statistics still follow the data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.rules.batch import UnitBatch
from trainer.rules.unit_rule import UnitOptions, UnitRule
from trainer.units import Granularity


@dataclass
class ShallowOptions(UnitOptions):
    """Options of ``shallow``: ``granularity`` sets what the top unit is (default block: a ResNet's
    pooling and classifier, an MLP's last layer)."""

    granularity: Granularity = "block"


class Shallow(UnitRule):
    """Only the top unit learns, from the output error ``e``."""

    name = "shallow"
    Options = ShallowOptions

    def signals(self, batch: UnitBatch) -> list[torch.Tensor | None]:
        return [batch.error if index == self.top else None for index in batch.indices()]

    def describe_unit(self, index: int) -> list[str]:
        return [] if index == self.top else ["no signal: stays at its initialisation"]
