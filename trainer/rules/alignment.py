"""Alignment diagnostics shared by the rules: how far a rule's update is from backprop's.

A rule that measures its alignment runs one extra full forward and backward on the same batch with
exact gradients (``bp_alignment``, shared by DFA and the weight-transport rules); these helpers keep
that pass from counting (BatchNorm statistics restored, ``.grad`` untouched) and turn the two
updates into an angle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from trainer.passes import uncounted_pass
from trainer.rules.base import RuleError


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


def bp_alignment(
    model: nn.Module, groups: Mapping[str, Sequence[nn.Parameter]], forward: Callable[[torch.Tensor], torch.Tensor],
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    mean_over: Collection[str] | None = None,
) -> dict[str, float]:
    """The angle between each group's update now in ``.grad`` and its true backprop gradient on
    (x, y), as ``angle/NAME``, and their mean over the groups named in ``mean_over`` (None: all) as
    ``angle``. ``forward`` runs the model's exact forward (autocast included); the pass trains
    nothing: BatchNorm statistics are restored and ``.grad`` is left as it is. A group with no
    ``.grad`` or no BP gradient at all (unused) has no angle."""
    params = [p for group in groups.values() for p in group]
    with uncounted_pass(model), torch.enable_grad():
        bp = iter(torch.autograd.grad(criterion(forward(x).float(), y), params, allow_unused=True))
    angles: dict[str, float] = {}
    for name, group in groups.items():
        updates, exact = [p.grad for p in group], [next(bp) for _ in group]
        if all(g is None for g in updates) or all(g is None for g in exact):
            continue
        angles[f"angle/{name}"] = angle_degrees(flat_gradient(group, updates), flat_gradient(group, exact))
    means = [v for k, v in angles.items() if mean_over is None or k[len("angle/"):] in mean_over]
    angles["angle"] = sum(means) / len(means) if means else 0.0
    return angles


def needs_labels(y: torch.Tensor | None, rule: str) -> torch.Tensor:
    """The labels an alignment pass measures on; a ``prepare()``'d forward must have been given them."""
    if y is None:
        raise RuleError(f"rule {rule!r}: align_every measures the angles on the batch's labels, which the "
                        "prepared forward was not given: call net(x, y), or set align_every = 0")
    return y
