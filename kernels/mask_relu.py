"""A ReLU whose backward keeps 1 bit per element instead of its output.

ReLU's backward is ``dx = dy * [y > 0]``: it needs only where the output is positive, so the mask
is saved bit-packed (8 elements a byte). Pure PyTorch (an ``autograd.Function``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskReLU"]


class _MaskReLUFunction(torch.autograd.Function):
    """ReLU that saves a bit-packed mask of its positive outputs (1 bit per element) for backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            x.relu_()
        y = x if inplace else torch.relu(x)
        positive = (y > 0).flatten()
        pad = -positive.numel() % 8
        if pad:
            positive = F.pad(positive, (0, pad))
        shifts = torch.arange(8, dtype=torch.uint8, device=x.device)
        ctx.save_for_backward((positive.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8))
        ctx.shape = y.shape
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple:
        (packed,) = ctx.saved_tensors
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        mask = ((packed.unsqueeze(1) >> shifts) & 1).flatten()[: grad_output.numel()]
        return grad_output * mask.view(ctx.shape).to(grad_output.dtype), None


class MaskReLU(nn.ReLU):
    """``nn.ReLU`` (same ``inplace`` semantics, exact gradient) that saves a 1-bit mask, not its output.

    Trace-estimated convs stop saving their inputs, but in conv-BN-ReLU networks that input is a
    ReLU's output, which ``nn.ReLU`` saves anyway; this module keeps 1/32 of it (fp32) instead.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return _MaskReLUFunction.apply(input, self.inplace)
