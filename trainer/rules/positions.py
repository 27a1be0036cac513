"""Output layouts: where a model's logits keep their classes and their positions.

``RuleContext.output_layout`` declares it once, so no rule guesses it from a shape:

    NC     (N, C)        one distribution per sample (classification; the default)
    NTC    (N, T, C)     one per position of a batch-first sequence (a language model's tokens)
    TNC    (T, N, C)     the same, sequence-first (pytorch/examples' word_language_model)
    NCHW   (N, C, H, W)  one per pixel of a dense map (segmentation)

The labels have the positions' shape ((N,), (N, T), (T, N), (N, H, W)), and the loss is the
cross-entropy averaged over every labelled position: a label of ``IGNORE_INDEX`` (padding) counts
for nothing and its position's error is zero. A unit's output ``h`` lays out its features as the
logits lay out their classes, and each position's error reaches ``h`` at that same position
(TinyDFA's ``batch_dims``): ``rows`` turns either into one row per position, (P, C) or (P, D_l),
and ``unrows`` puts rows of signals back into ``h``'s shape. With NC a row is a sample, and D_l
is the numel of ``h`` per sample; otherwise D_l is the width of ``h`` at one position, so DFA's
feedback matrices (C x D_l) do not grow with the sequence length or the map's size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from trainer.errors import RuleError

OutputLayout = Literal["NC", "NTC", "TNC", "NCHW"]
LAYOUTS: tuple[str, ...] = ("NC", "NTC", "TNC", "NCHW")
IGNORE_INDEX = -100  # nn.CrossEntropyLoss's: a position labelled so has no loss and a zero error


def class_dim(layout: str) -> int:
    """The dimension of the logits that holds the classes (of a unit's output: its features)."""
    return 2 if layout in ("NTC", "TNC") else 1


def label_shape(shape: torch.Size | tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The positions of a tensor of ``shape`` (the shape its labels have): ``shape`` less its class
    (feature) dimension, and for NC less everything after the samples."""
    if layout == "NC":
        return tuple(shape[:1])
    dim = class_dim(layout)
    return (*shape[:dim], *shape[dim + 1:]) if layout == "NCHW" else tuple(shape[:dim])


def feature_shape(shape: torch.Size | tuple[int, ...], layout: str) -> tuple[int, ...]:
    """What a unit's output of ``shape`` holds at one position (for NC: per sample)."""
    if layout == "NCHW":
        return tuple(shape[1:2])
    return tuple(shape[1:]) if layout == "NC" else tuple(shape[2:])


def rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (logits, errors or a unit's output) as one row per position: (P, C) or (P, D)."""
    if layout == "NCHW":
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    if layout == "NC":
        return t.flatten(1)
    return t.flatten(2).flatten(0, 1)


def unrows(values: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Rows of ``rows(like)``'s layout put back into ``like``'s shape."""
    if layout == "NCHW":
        return values.view(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return values.view(like.shape)


def check_positions(rule: str, unit: str, shape: tuple[int, ...], logits: tuple[int, ...], layout: str) -> None:
    """A unit whose output gets each position's error must have the logits' positions."""
    want = label_shape(logits, layout)
    if len(shape) < len(layout) - 1 or label_shape(shape, layout) != want:
        raise RuleError(
            f"rule {rule!r}: unit {unit!r} outputs a {tuple(shape)} tensor, but output_layout = {layout!r} sends each "
            f"position's error to the unit's output at that position, so it must hold the logits' positions {want} "
            f"({layout} with {_described(layout)} features): cut the model where its output has them, or merge the "
            "unit into the one above (bp_units)")


def _described(layout: str) -> str:
    return {"NC": "(N, D)", "NTC": "(N, T, D)", "TNC": "(T, N, D)", "NCHW": "(N, D, H, W)"}[layout]


def label_text(layout: str) -> str:
    """The labels' shape a layout means: "(N, T)"."""
    return {"NC": "(N,)", "NTC": "(N, T)", "TNC": "(T, N)", "NCHW": "(N, H, W)"}[layout]


def layout_text(layout: str, num_classes: int) -> str:
    """The logits' shape a layout means, with C written out: "(N, T, 10)"."""
    return _described(layout).replace("D", str(num_classes))


def labelled_positions(error: torch.Tensor, layout: str) -> torch.Tensor:
    """The number of positions whose error is not zero (those the loss's mean counts; padding has
    none), at least 1, as a 0-d tensor: no host sync."""
    return rows(error, layout).ne(0).any(1).sum().clamp_min(1)


class PositionCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy averaged over every labelled position of per-position logits (``IGNORE_INDEX``
    labels count for nothing), with label smoothing; for NC it is ``nn.CrossEntropyLoss`` itself."""

    def __init__(self, layout: str, label_smoothing: float = 0.0):
        super().__init__(label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)
        self.layout = layout

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        positions = label_shape(logits.shape, self.layout)
        if logits.dim() != len(self.layout) or tuple(y.shape) != positions:
            raise RuleError(
                f"the labels y have shape {tuple(y.shape)} but the logits {tuple(logits.shape)} (output_layout = "
                f"{self.layout!r}) have positions {positions}: pass one class index per position, "
                f"{IGNORE_INDEX} where a position has no label (padding)")
        return super().forward(rows(logits, self.layout), y.reshape(-1))


def criterion(layout: str, label_smoothing: float) -> nn.Module:
    """The task loss of a layout: the mean cross-entropy over its samples or labelled positions."""
    if layout == "NC":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return PositionCrossEntropy(layout, label_smoothing)
