"""What the converters (trace convs, MaskReLU, compact BatchNorm, feedback layers) share: swapping
submodules in place, which convolutions a drop-in replacement can stand in for, their padding as
ints, and whether a module's qualified name lies under another's (the trainer uses it too)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd


def check_module(op: str, name: str, value: object) -> None:
    """Raise a TypeError naming ``op`` and the argument unless ``value`` is an ``nn.Module``."""
    if not isinstance(value, nn.Module):
        hint = "; wrap the layers in nn.Sequential(*layers)" if isinstance(value, (list, tuple)) else ""
        raise TypeError(f"{op}: {name} must be an nn.Module, got {type(value).__name__}{hint}")


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


def unsupported_conv2d(conv: nn.Module, replacement: type[nn.Conv2d]) -> str | None:
    """Why ``conv`` cannot be swapped for a ``replacement`` (a drop-in nn.Conv2d subclass), or None:
    only plain 2-d convolutions (or replacements already) with zero padding that is symmetric."""
    if not isinstance(conv, _ConvNd):
        return f"{type(conv).__name__} is not a convolution"
    if conv.transposed:
        return f"transposed convolution ({type(conv).__name__}) is not supported"
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not supported (only 2-d convolutions are)"
    if type(conv) not in (nn.Conv2d, replacement):
        return f"nn.Conv2d subclass {type(conv).__name__} is not supported (its forward may differ)"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "uninitialized lazy parameters are not supported; run a forward pass first"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
    if conv.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
        return "padding='same' with an even effective kernel pads asymmetrically; not supported"
    return None


def int_padding(padding: str | tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """A conv's symmetric zero padding as ints: 'valid' -> 0, 'same' -> dilation·(k−1)/2 (what the
    backward's conv2d_input/conv2d_weight take; ``unsupported_conv2d`` has refused an asymmetric one)."""
    if padding == "valid":
        return (0,) * len(kernel_size)
    if padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel_size))
    return tuple(padding)


def name_under(name: str, prefix: str) -> bool:
    """Whether the module named ``name`` is ``prefix`` or inside it ("layer1.0.conv1" is under
    "layer1", "layer10" is not)."""
    return name == prefix or name.startswith(prefix + ".")
