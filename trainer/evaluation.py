"""Evaluation: a model's loss and accuracy on a split, and the model of a checkpoint rebuilt for it.

The loop evaluates the training session's rule on its held-out split; ``trainer eval`` rebuilds the
plain model from a checkpoint alone (no data, no rule) and evaluates it through the same ``evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kernels import FEEDBACK_STATE_KEYS
from trainer.config import ConfigError, Recipe
from trainer.data import Loader, NormStats
from trainer.devices import resolve_device
from trainer.models import build_model
from trainer.parallel.data_parallel import all_reduce_sum
from trainer.parallel.processes import DistEnv
from trainer.recipes import recipe_from_dict


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Loader, criterion: nn.Module,
             env: DistEnv = DistEnv()) -> dict[str, float]:
    """Loss and accuracy over a loader (summed over ranks' shards). A short last batch is padded
    so compiled shapes stay fixed."""
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader.batches(0):
        n = len(y)
        if n < loader.batch_size:
            x = torch.cat([x, x.new_zeros((loader.batch_size - n, *x.shape[1:]))])
        logits = forward(x)[:n].float()
        total_loss += criterion(logits, y).item() * n
        correct += (logits.argmax(1) == y).sum().item()
        count += n
    if env.enabled:
        total_loss, correct, count = all_reduce_sum([total_loss, correct, count])
    return {"loss": total_loss / count, "accuracy": correct / count}


@dataclass
class TrainedModel:
    """A checkpoint's model, ready for evaluation, with what is needed to feed it."""

    recipe: Recipe
    device: torch.device
    model: nn.Module
    stats: NormStats  # the training images' normalisation
    input_shape: tuple[int, ...]
    num_classes: int
    epoch: int  # epochs trained
    step: int


def trained_model(payload: dict[str, Any], source: str, device_flag: str | None = None) -> TrainedModel:
    """The plain model of a checkpoint in eval mode (every rule's checkpoint loads into it), on the
    device it trained on or on ``device_flag`` (``trainer eval --device``)."""
    recipe = recipe_from_dict(payload["recipe"], source=f"{source} (saved recipe)")
    try:
        device = resolve_device(device_flag or recipe.train.device)
    except ConfigError as err:  # a GPU this machine lacks
        where = f"--device {device_flag}:" if device_flag else f"{source}: it trained with"
        raise ConfigError(f"{where} {err} (trainer eval {source} --device cpu)") from None
    shape, num_classes = tuple(payload["data"]["input_shape"]), payload["data"]["num_classes"]
    model = build_model(recipe.model, shape, num_classes).to(device)
    try:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except RuntimeError as err:  # the same names with other shapes
        reason: str | None = " ".join(str(err).split())[:300]
    else:  # the feedback state of weight-transport layers is the rule's, not the model's
        unexpected = [key for key in unexpected if key.rsplit(".", 1)[-1] not in FEEDBACK_STATE_KEYS]
        reason = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else None
    if reason is not None:
        raise ConfigError(f"{source}: the checkpoint's model does not fit {recipe.model.name!r} built from the "
                          f"recipe saved in it ({reason}); the checkpoint was edited or mixed from two runs: evaluate "
                          "a checkpoint as training wrote it")
    model.eval()
    stats = NormStats.from_state(payload["data"])
    return TrainedModel(recipe, device, model, stats, shape, num_classes, payload["epoch"], payload["step"])
