"""What a rule's step hands around: the step's result, one batch through the units as the rules'
hooks see it, and what a slice of units exchanges with the pipeline stages that hold the others.
Below both ``trainer.rules.base`` (the rules) and ``trainer.rules.prepared`` (``rule.prepare()``),
which import it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.units import State, primary


@dataclass
class StepResult:
    """What one training step reports: the batch loss and the logits (both detached)."""

    loss: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def unseen(cls, num_classes: int, device: torch.device, dtype: torch.dtype = torch.float32) -> StepResult:
        """What a pipeline stage below the last reports: a zero loss and no logits (it sees none)."""
        return cls(torch.zeros((), device=device), torch.empty((0, num_classes), device=device, dtype=dtype))



@dataclass
class UnitBatch:
    """One batch through the units, as a rule's hooks see it.

    On one process it holds every unit. A pipeline stage (``trainer.parallel``) holds a slice of
    the units (``first`` is the index of ``outputs[0]``) and one micro-batch of ``samples``: then
    ``error`` is the micro-batch's part of the whole batch's mean loss gradient, so that the
    local backwards of the micro-batches add up to the update of the whole batch.
    """

    x: State  # the input of unit ``first``: the batch (a tuple for a forward's several inputs), or h of the unit below
    y: torch.Tensor | None  # None: a prepare()'d forward given no labels
    outputs: list[State]  # each unit's output, with its graph
    error: torch.Tensor | None  # e = ∂loss/∂logits of the top unit (a mean: softmax − one-hot over N, or the positions); None in an end-to-end rule's after_backward
    first: int = 0  # the unit index of outputs[0]
    samples: int = 0  # N, the samples the update averages over (0: len(y); the whole batch for a micro-batch)
    error_units: dict[int, torch.Tensor] = field(default_factory=dict)  # LRA's error units by unit index: from above, then own
    actions: dict[int, torch.Tensor | None] = field(default_factory=dict)  # E_l's action d_l (LRA's signals, for its local_updates)

    def __post_init__(self) -> None:
        self.samples = self.samples or len(self.y)

    @property
    def errors(self) -> dict[int, torch.Tensor]:
        """``error_units``, its name until 0.2.0 (beside ``error``, e, a different thing)."""
        return self.error_units

    def indices(self) -> range:
        """The unit indices of ``outputs``."""
        return range(self.first, self.first + len(self.outputs))

    def output_of(self, index: int) -> State:
        return self.outputs[index - self.first]

    def input_of(self, index: int) -> torch.Tensor:
        """What unit ``index`` read: the batch, or the (detached) output of the unit below."""
        return self.x if index == self.first else primary(self.outputs[index - self.first - 1]).detach()



class Transport:
    """What a slice of units exchanges with the stages that hold the others, during ``run_units``.

    This default is one process holding every unit: one micro-batch, nothing to send or receive.
    A pipeline stage (``trainer.parallel``) sends and receives these between processes.
    """

    micro_batches: int = 1  # the batch goes through as this many micro-batches (error rules)
    window: int = 0  # micro-batches whose local backward may wait for their error (a stage: S − 1 − s)

    def receive_input(self, samples: int) -> State:
        """The input state of the slice's first unit (the output of the stage below)."""
        raise RuntimeError("one process holds the first unit: its input is the batch")

    def send_output(self, state: State) -> None:
        """The slice's top output, for the stage above."""

    def publish_error(self, error: torch.Tensor) -> None:
        """``e`` of the micro-batch just run, from the stage holding the top unit to the others."""

    def receive_error(self, samples: int) -> torch.Tensor:
        """``e`` of the oldest micro-batch still waiting, from the stage holding the top unit."""
        raise RuntimeError("one process holds the top unit: it forms e itself")

    def receive_error_units(self, batch: UnitBatch) -> None:
        """Into ``batch.error_units``: the error units of units above the slice that its signals need."""

    def send_error_units(self, batch: UnitBatch) -> None:
        """The slice's error units that stages below need (after ``signals`` formed them)."""


def saved_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the buffers a training forward moves (BatchNorm's running statistics and batch
    count), for ``restore_statistics`` after a diverged step."""
    return [(buffer, buffer.clone()) for name, buffer in model.named_buffers()
            if name.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")]


def restore_statistics(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)
