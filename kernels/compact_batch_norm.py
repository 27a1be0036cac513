"""BatchNorm2d that keeps its normalized input in float16 for backward: half the bytes of fp32 BN.

Why. Trace-estimated convs (:mod:`kernels.trace_conv`) and :class:`~kernels.mask_relu.MaskReLU`
shrink what convs and ReLUs keep for backward, after which BatchNorm's saved inputs are most of a
ResNet's activation memory: every exact BatchNorm keeps one full fp32 tensor, so no rule that leaves
BN exact can save more than about 1.9x on a ResNet-18. An exact BN backward needs its normalized
input everywhere, so the only way to shrink it is to store it in fewer bits.

Math. Per channel c over the M = N*H*W positions, with batch mean mu and biased variance var::

    xhat = (x - mu) / sqrt(var + eps),      y = gamma * xhat + beta
    dbeta = sum dy,   dgamma = sum dy * xhat
    dx = gamma / sqrt(var + eps) * (dy - dbeta / M - xhat * dgamma / M)

Forward is computed in fp32 exactly as ``nn.BatchNorm2d``; only ``fp16(xhat)`` (2 bytes per element)
and the per-channel ``1/sqrt(var + eps)`` are saved. ``xhat`` is the right thing to round: it has
unit variance per channel and ``|xhat| <= sqrt(M)``, so fp16 never overflows and every element
keeps 11 significant bits (relative rounding error <= 2^-11). Backward then uses the rounded
``xhat`` in all three formulas, so dx, dgamma and dbeta carry an error of about 5e-4 relative and
are otherwise exact. Running statistics follow ``nn.BatchNorm2d`` (momentum, or the cumulative
average when momentum is None; unbiased variance). Evaluation, or a forward without autograd,
runs ``nn.BatchNorm2d`` unchanged.

Under bf16 autocast the input already has 2 bytes per element and saving fp16 gains nothing.
Pure PyTorch (an ``autograd.Function``): ``torch.compile`` traces it and inductor fuses the
elementwise work.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels._modules import check_module, swap_modules

__all__ = ["CompactBatchNorm2d", "convert_batch_norms"]

_CHANNEL_DIMS = (0, 2, 3)


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class _CompactBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over (N, H, W) that saves ``fp16(xhat)`` and ``invstd``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=_CHANNEL_DIMS, correction=0)
        invstd = torch.rsqrt(var + eps)
        xhat = (x32 - _per_channel(mean)) * _per_channel(invstd)
        y = xhat
        if weight is not None:
            y = y * _per_channel(weight.float()) + _per_channel(bias.float())
        ctx.save_for_backward(xhat.to(torch.float16), invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None, None]:
        xhat16, invstd, weight = ctx.saved_tensors
        xhat = xhat16.float()
        dy = grad_y.float()
        count = dy.numel() // dy.shape[1]
        dbeta = dy.sum(_CHANNEL_DIMS)
        dgamma = (dy * xhat).sum(_CHANNEL_DIMS)
        scale = invstd if weight is None else invstd * weight.float()
        dx = _per_channel(scale) * (dy - _per_channel(dbeta / count) - xhat * _per_channel(dgamma / count))
        if weight is None:
            return dx.to(grad_y.dtype), None, None, None
        return dx.to(grad_y.dtype), dgamma.to(weight.dtype), dbeta.to(weight.dtype), None


class CompactBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same Parameters, buffers, state_dict and eval behaviour) that saves
    ``fp16(xhat)`` for backward instead of its input: 2 bytes per element instead of 4 (fp32).

    Gradients differ from ``nn.BatchNorm2d``'s only by the fp16 rounding of ``xhat`` (about 5e-4
    relative); see the module docstring for the math.
    """

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> CompactBatchNorm2d:
        """A CompactBatchNorm2d sharing ``bn``'s Parameters and buffers (state_dict unchanged)."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"CompactBatchNorm2d.from_batch_norm: bn must be an nn.BatchNorm2d, "
                            f"got {type(bn).__name__}")
        compact = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                      track_running_stats=bn.track_running_stats, device="meta")
        for name, param in bn.named_parameters(recurse=False):
            setattr(compact, name, param)
        for name, buffer in bn.named_buffers(recurse=False):
            setattr(compact, name, buffer)
        return compact.train(bn.training)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"CompactBatchNorm2d: expected an input with {self.num_features} channels (dim 1), got "
                             f"{input.shape[1]} (input shape {tuple(input.shape)})")
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(input)
        count = input.numel() // input.shape[1]  # values per channel
        if count <= 1:
            raise ValueError(
                f"CompactBatchNorm2d: expected more than 1 value per channel when training, got input "
                f"of shape {tuple(input.shape)}; use a batch of at least 2 samples or call .eval()"
            )
        y, mean, var = _CompactBatchNormFunction.apply(input, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum  # None: cumulative
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), factor)


def convert_batch_norms(model: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` of ``model`` (in place) for a :class:`CompactBatchNorm2d`.

    The replacements share the Parameters and buffers, so state_dict keys and values are unchanged
    and checkpoints load into the plain model. Subclasses of BatchNorm2d (SyncBatchNorm is not one)
    are left alone. Returns the model, or the replacement when ``model`` is itself a BatchNorm2d.
    """
    check_module("convert_batch_norms", "model", model)
    replacements = {id(m): CompactBatchNorm2d.from_batch_norm(m) for m in model.modules() if type(m) is nn.BatchNorm2d}
    return swap_modules(model, replacements)
