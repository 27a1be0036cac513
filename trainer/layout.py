"""How a run's units lie across processes: the one place where a pipeline run differs from a plain
one for the session, the loop and checkpoints.

``Layout`` is the default, one process holding every unit (data-parallel replicas included); it
plays the role for a run that ``trainer.rules.base.Transport`` plays for the step engine.
``trainer.pipeline.Pipeline`` is one stage of a pipeline. The session picks the class once, from
``train.pipeline_stages``, asks it how to size the loader and then builds it; the loop and the
checkpoint round trip only call the built object.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.distributed import DistEnv

if TYPE_CHECKING:
    from trainer.rules import Rule, StepResult


class Stepper(Protocol):
    """What turns a batch into updates on this process: a rule, or its stage of a pipeline."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult: ...


class Layout:
    """One process holds every unit: the rule steps the whole model, the optimizer state goes in
    ``checkpoint.pt``, and there is nothing to exchange at an epoch's end."""

    def __init__(self, stage: Stepper):
        self.stage = stage

    @staticmethod
    def collective_timeout(cfg: TrainConfig) -> float | None:
        """How long a collective may wait for another process (None: torch's default)."""
        return None

    @staticmethod
    def loader_batch_size(cfg: TrainConfig, forward_only: bool) -> int:
        """The batch the training loader gives ``stage.train_step``."""
        return cfg.batch_size

    @classmethod
    def build(cls, rule: Rule, model: nn.Module, env: DistEnv, cfg: TrainConfig, input_shape: tuple[int, ...],
              optimizer: torch.optim.Optimizer) -> Layout:
        """This process's part of the run, once rule, model and optimizer are built."""
        return cls(rule)

    @property
    def notes(self) -> list[str]:
        """What the run's header says about the layout."""
        return []

    def after_step(self, epoch_ends: bool) -> str | None:
        """After every training step (a batch boundary; ``epoch_ends`` on an epoch's last): a line
        to note, or None. A pipeline moves its cut here, once (``trainer.pipeline``)."""
        return None

    def synchronize(self) -> None:
        """At an epoch's end, before evaluation: every process then holds the whole trained model."""

    def checkpoint_fields(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What ``checkpoint.pt`` records of the optimizer and of the stages."""
        return {"optimizer": optimizer.state_dict(), "pipeline": None}

    def save_part(self, out_dir: Path, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """What this process keeps beside ``checkpoint.pt``, written before the checkpoint of ``epoch``."""

    def drop_older_parts(self, out_dir: Path, epoch: int) -> None:
        """Once the checkpoint of ``epoch`` is in place: remove this process's parts of other epochs."""

    def optimizer_state(self, payload: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """This process's optimizer state in the checkpoint ``payload`` of the run folder ``out_dir``."""
        return payload["optimizer"]
