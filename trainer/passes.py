"""Passes over a model that do not count: a dry forward that checks a shape, a probe that measures
memory, the DFA-vs-BP angle's backprop pass, the evaluation forward inside training. Each must leave
the model as it found it, or it would change the training it only looks at: every module's
train/eval flag, the buffers (BatchNorm's running statistics, which a training-mode pass updates)
and the random streams that dropout draws from."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def uncounted_pass(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Inside, ``model`` in ``training`` mode (None: as it is); after, every module's flag, every
    buffer and the CPU's (and the model's GPU's) random state as they were before."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    device = next(model.parameters(), torch.empty(0)).device
    if training is not None:
        model.train(training)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for module, mode in modes:
            module.train(mode)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (BatchNorm statistics untouched, no dropout), then every module's
    own training flag back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)
