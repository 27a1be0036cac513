"""LRA's error maps E_l: how the error units of one unit reach the unit below.

All maps are parameters of the rule (trained by the loop's optimizer, saved in checkpoints). From
a vector to a vector: a dense matrix. Between conv units (``error_map``): a 1x1 conv, a 3x3 conv or
a channel map (spatial mean, C_src x C_dst matrix, broadcast), each resampled (nearest) to the
target's size. From a vector (the output, a dense unit) to a conv unit (``vector_error_map``): a
dense matrix, or a channel map broadcast over positions (what BP through global average pooling
gives; the affordable one for ImageNet ResNets, where a dense matrix from 1000 classes to a 56x56
block would hold 800M entries). Every map has ``weight`` (the tensor E) and ``fan_in``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DenseErrorMap(nn.Module):
    """``d = flatten(e) @ weight``, weight D_src x D_dst (the kernel's ``P`` layout)."""

    def __init__(self, src_dim: int, dst_shape: tuple[int, ...]):
        super().__init__()
        self.dst_shape, self.fan_in = dst_shape, src_dim
        self.weight = nn.Parameter(torch.empty(src_dim, math.prod(dst_shape)))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return (e.flatten(1).to(self.weight.dtype) @ self.weight).view(-1, *self.dst_shape)


class ConvErrorMap(nn.Module):
    """``d = resample(conv_k(e))``: a k x k conv from C_src to C_dst channels, then nearest resampling
    to the target's size (computed at the source's resolution, the cheaper side going down)."""

    def __init__(self, src_channels: int, dst_shape: tuple[int, ...], kernel_size: int):
        super().__init__()
        self.dst_shape, self.fan_in = dst_shape, src_channels * kernel_size**2
        self.conv = nn.Conv2d(src_channels, dst_shape[0], kernel_size, padding=kernel_size // 2, bias=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        d = self.conv(e.to(self.weight.dtype))
        if tuple(d.shape[2:]) != tuple(self.dst_shape[1:]):
            d = F.interpolate(d, size=self.dst_shape[1:], mode="nearest")
        return d


class ChannelErrorMap(nn.Module):
    """``d[c, h, w] = Σ_c' mean_hw(e)[c'] · weight[c', c]``: the same per-channel signal at every position."""

    def __init__(self, src_channels: int, dst_shape: tuple[int, ...]):
        super().__init__()
        self.dst_shape, self.fan_in = dst_shape, src_channels
        self.weight = nn.Parameter(torch.empty(src_channels, dst_shape[0]))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        pooled = e.flatten(2).mean(2) if e.dim() > 2 else e
        d = pooled.to(self.weight.dtype) @ self.weight
        return d[:, :, None, None].expand(-1, -1, *self.dst_shape[1:])


def error_map_layout(emap: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A forward weight W_{l+1} (or its update) as the E_l that feeds its transpose back: dense and
    channel maps store E as D_src x D_dst, nn.Linear's layout; a conv map is W's transposed conv
    (in/out channels swapped, kernel flipped)."""
    return weight.transpose(0, 1).flip(2, 3) if isinstance(emap, ConvErrorMap) else weight


def build_error_map(src_shape: tuple[int, ...], dst_shape: tuple[int, ...], error_map: str,
                    vector_error_map: str) -> nn.Module:
    """E from a unit of output shape ``src_shape`` to one of ``dst_shape`` (per-sample shapes)."""
    if len(dst_shape) != 3:
        return DenseErrorMap(math.prod(src_shape), dst_shape)
    if len(src_shape) != 3:
        if vector_error_map == "channel":
            return ChannelErrorMap(math.prod(src_shape), dst_shape)
        return DenseErrorMap(math.prod(src_shape), dst_shape)
    if error_map == "channel":
        return ChannelErrorMap(src_shape[0], dst_shape)
    return ConvErrorMap(src_shape[0], dst_shape, 1 if error_map == "conv1x1" else 3)
