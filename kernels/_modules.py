"""Swapping submodules in place: what the converters (trace convs, MaskReLU, compact BatchNorm) share."""

from __future__ import annotations

from torch import nn


def swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put ``replacements[id(m)]`` wherever submodule ``m`` sits in ``model``'s tree (in place; a
    module used in several places gets the same replacement everywhere). Returns ``model``, or its
    own replacement when ``model`` itself is one of the keys."""
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]
    return model
