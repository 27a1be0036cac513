"""Alignment diagnostics shared by the rules: how far a rule's update is from backprop's.

A rule that measures its alignment runs one extra full forward and backward on the same batch with
exact gradients; these helpers keep that pass from counting (BatchNorm statistics restored,
``.grad`` untouched) and turn the two updates into an angle.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from trainer.rules.base import RuleError


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Run an extra training-mode pass without it counting: BatchNorm statistics are restored."""
    saved = [(buffer, buffer.clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def flat_gradient(params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> torch.Tensor:
    """One flat vector of a unit's gradients (zeros where a parameter got none)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for p, g in zip(params, grads)])


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two flat vectors, in degrees (90 when either is zero)."""
    a, b = a.double(), b.double()
    denominator = a.norm() * b.norm()
    if denominator == 0:
        return 90.0
    return math.degrees(math.acos((a @ b / denominator).clamp(-1, 1).item()))


def needs_labels(y: torch.Tensor | None, rule: str) -> torch.Tensor:
    """The labels an alignment pass measures on; a ``prepare()``'d forward must have been given them."""
    if y is None:
        raise RuleError(f"rule {rule!r}: align_every measures the angles on the batch's labels, which the "
                        "prepared forward was not given: call net(x, y), or set align_every = 0")
    return y
