"""Low-memory stochastic backprop for Conv2d by randomized trace estimation (Louboutin et al. 2021).

Math. For one sample n the conv input is ``X_n`` (C_in x P_in, P_in = H*W positions) and the output
gradient ``dY_n`` (C_out x P_out). For kernel tap k let ``S_k`` (P_out x P_in) select, for each output
position, the input position tap k reads (a zero row where that falls in the zero padding); stride,
padding and dilation live entirely in ``S_k``. The exact weight gradient is::

    dW[:, :, k] = sum_n dY_n S_k X_n^T                              (C_out x C_in, per group)

With probes ``Z`` (P_in x r) such that ``E[Z Z^T] = r I``, ``X_n ~= (1/r) X_n Z Z^T`` and::

    dW[:, :, k] ~= (1/r) sum_n (dY_n (S_k Z)) (X_n Z)^T             (unbiased)

* forward: the convolution is computed exactly; only ``Xbar_n = X_n Z`` (C_in x r per sample, fp32)
  and a probe seed (a 0-d int64 tensor) are kept for backward, not X;
* backward: ``Z`` is regenerated from the seed; ``S_k Z`` is the im2col ("unfold") of Z seen as an
  r-channel H x W image under the conv's own geometry, so stride/padding/dilation are exact (no
  circular shifts). Stage 1 contracts dY with the unfolded probes over P_out,
  ``A[o, k, n, j] = sum_q dY[n, o, q] (S_k Z)[q, j]``; stage 2 contracts A with Xbar over (n, j)
  per group: ``dW[o, c, k] = (1/r) sum_{n,j} A[o, k, n, j] Xbar[c, n, j]``;
* the input gradient (needs only W) and the bias gradient are exact.

One Z is drawn per call and shared by all samples and channels of the batch (as in the paper's code);
the estimate is unbiased for every sample, but samples' errors are correlated through the shared Z.
The probes (gaussian, rademacher, orthogonal; each entry a hash of (seed, position, column), so the
kernels make Z in registers and never store it) are in :mod:`kernels.probes`, the conv geometry
in :class:`~kernels.conv_geometry.ConvGeometry`.

Memory saved per converted conv: the saved activation falls from C_in*H*W to C_in*r numbers per sample
(fp32; e.g. 64x32x32 fp32 = 256 KiB -> 64x16 fp32 = 4 KiB per sample at r = 16). In networks where the
conv input is also saved by another op (a ReLU's output), see :class:`~kernels.mask_relu.MaskReLU`;
what a conv-BN-ReLU network keeps after that is BatchNorm's inputs, see :mod:`kernels.compact_batch_norm`.
:func:`~kernels.convert.convert_to_trace_conv` swaps all three into a model.

Supported: ``nn.Conv2d`` with any stride, integer padding (or 'valid', or 'same' when symmetric),
dilation, groups (depthwise included), bias or not, non-square kernels, padding_mode='zeros', dtypes
float32/float16/bfloat16. Transposed convs, other padding modes, 1-d/3-d convs and ``nn.Conv2d``
subclasses are refused with an error naming the layer.

Kernels: CUDA tensors run the Triton kernel, CPU tensors the PyTorch references, except under
``TRITON_INTERPRET=1`` where CPU tensors run the Triton kernel; without Triton every tensor runs the
references (``kernels._dispatch``). One
kernel does both products with Z: stage 1, and the forward's ``X Z``, which is stage 1 of a 1x1
stride-1 conv (``S_0 = I``). Its dots take float32 operands, in TF32 where torch allows it for
convolutions (``torch.backends.cudnn.allow_tf32``, True by default: the "conv" rule of
``kernels._dispatch``).
The ops are registered as ``torch.ops.bpfree.trace_compress`` and ``torch.ops.bpfree.trace_weight_grad``
(custom ops with fake implementations), so models with TraceConv2d go through ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels._dispatch import (
    FLOAT_DTYPES,
    check_tensor,
    define_op,
    dot_precision,
    require_triton,
    tile,
    tl,
    triton,
    use_triton,
)
from kernels._modules import int_padding, unsupported_conv2d
from kernels.conv_geometry import ConvGeometry
from kernels.probes import PROBE_CODE, check_probe_args, check_seed, probe_keys, probe_matrix, probe_tile

__all__ = [
    "TraceConv2d",
    "trace_compress_torch",
    "trace_compress_triton",
    "trace_weight_grad_torch",
    "trace_weight_grad_triton",
]

_SEED_HIGH = 2**31 - 1


def _launch_config(probes: int) -> dict[str, object]:
    """Tiles, dot precision and warps of the kernel: 64 rows, the probe columns in [16, 64]
    (``tl.dot`` needs >= 16; masked beyond r), and 64 positions over 4 warps for TF32 dots; IEEE
    dots (cudnn's TF32 off) keep their operands in registers, so 16 positions over 8 warps (64 or
    32 spilled on sm_90, ``benchmarks/compile_kernels.py``)."""
    precision = dot_precision(tl.float32, "conv")
    block_p, num_warps = (64, 4) if precision == "tf32" else (16, 8)
    return {"BLOCK_M": 64, "BLOCK_P": block_p, "BLOCK_R": tile(probes, 16, 64), "PREC": precision,
            "num_warps": num_warps}


# ---------------------------------------------------------------------------------------------
# Stage 1 of the weight gradient (and, for S_0 = I, the forward's Xbar = X Z): A = dY S_k Z
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["r", "key1", "key2"])
def _probe_matmul_kernel(
    dy_ptr, a_ptr, M, C_out, N, P_out, W_out, H, W, KW, K, n_rblocks,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, r, key1, key2, scale,
    PROBE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """a[o, k, n, j] = sum_q dy[n, o, q] Z[pos_k(q), j] (rows m = n*C_out + o), Z_k made per tile.

    pos_k(q) is the input position tap k = (ki, kj) reads for output position q = (ho, wo):
    (ho*stride_h - pad_h + ki*dil_h, wo*stride_w - pad_w + kj*dil_w); outside the image Z_k is 0.
    The tap is the fastest-varying program id so neighbouring programs reuse the same dy tile.
    """
    pid_kr = tl.program_id(0)
    pid_m = tl.program_id(1)
    k = pid_kr // n_rblocks
    ki = k // KW
    kj = k % KW
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid_kr % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    k1 = key1.to(tl.uint32)
    k2 = key2.to(tl.uint32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for q0 in range(0, P_out, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        q_ok = q < P_out
        hi = (q // W_out) * stride_h - pad_h + ki * dil_h
        wi = (q % W_out) * stride_w - pad_w + kj * dil_w
        inside = q_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        pos = tl.where(inside, hi * W + wi, 0)
        dy = tl.load(
            dy_ptr + rows[:, None].to(tl.int64) * P_out + q[None, :],
            mask=row_ok[:, None] & q_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        z = probe_tile(k1, k2, pos[:, None], cols[None, :], inside[:, None], r, scale, PROBE)
        acc = tl.dot(dy, z, acc, input_precision=PREC)
    n = rows // C_out
    o = rows % C_out
    out = a_ptr + (((o.to(tl.int64) * K + k) * N + n) * r)[:, None] + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (cols < r)[None, :])


def _probe_matmul(dy: Tensor, seed: int, probes: int, probe: str, geometry: ConvGeometry) -> Tensor:
    """``A[o, k, n, j] = sum_q dy[n, o, q] (S_k Z)[q, j]`` (C_out x taps x N x r, float32) for
    ``dy`` N x C_out x H_out x W_out, Z made in registers."""
    n, c_out, h_out, w_out = dy.shape
    a = torch.empty((c_out, geometry.taps, n, probes), dtype=torch.float32, device=dy.device)
    key1, key2 = probe_keys(seed)
    config = _launch_config(probes)
    n_rblocks = triton.cdiv(probes, config["BLOCK_R"])
    grid = (geometry.taps * n_rblocks, triton.cdiv(n * c_out, config["BLOCK_M"]))
    (h, w), (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = (
        geometry.input_hw, geometry.stride, geometry.padding, geometry.dilation)
    _probe_matmul_kernel[grid](
        dy, a, n * c_out, c_out, n, h_out * w_out, w_out, h, w, geometry.kernel_size[1],
        geometry.taps, n_rblocks, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, probes, key1, key2,
        math.sqrt(probes), PROBE=PROBE_CODE[probe], **config,
    )  # fmt: skip
    return a


# ---------------------------------------------------------------------------------------------
# Forward: probe compression Xbar = X Z
# ---------------------------------------------------------------------------------------------


def _check_compress_args(op: str, x: Tensor, seed: int, probes: int, probe: str) -> None:
    check_tensor(op, "x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_seed(op, seed)
    check_probe_args(op, probes, probe)


def trace_compress_torch(x: Tensor, seed: int, probes: int, probe: str) -> Tensor:
    """PyTorch reference: ``Xbar[c, n, :] = X[n, c].flatten() @ Z`` as a (C_in, N, r) float32 tensor."""
    _check_compress_args("trace_compress_torch", x, seed, probes, probe)
    n, c, h, w = x.shape
    z = probe_matrix(seed, h * w, probes, probe, device=x.device)
    xbar = x.reshape(n * c, h * w).to(torch.float32) @ z
    return xbar.view(n, c, probes).transpose(0, 1).contiguous()


def trace_compress_triton(x: Tensor, seed: int, probes: int, probe: str) -> Tensor:
    """Triton kernel for :func:`trace_compress_torch`; Z is generated in registers, never stored.

    ``X Z`` is stage 1 of the weight gradient for a 1x1 stride-1 conv (``S_0 = I``), so the same
    kernel computes it."""
    _check_compress_args("trace_compress_triton", x, seed, probes, probe)
    require_triton("trace_compress_triton")
    n, c, h, w = x.shape
    return _probe_matmul(x, seed, probes, probe, ConvGeometry((h, w), (1, 1))).view(c, n, probes)


@define_op("bpfree::trace_compress")
def trace_compress(x: Tensor, seed: Tensor, probes: int, probe: str) -> Tensor:
    """``Xbar = X Z`` as (C_in, N, probes) float32, Z drawn from the 0-d int64 ``seed``."""
    impl = trace_compress_triton if use_triton(x) else trace_compress_torch
    return impl(x, int(seed), probes, probe)


@torch.library.register_fake(trace_compress)
def _trace_compress_fake(x: Tensor, seed: Tensor, probes: int, probe: str) -> Tensor:
    return x.new_empty((x.shape[1], x.shape[0], probes), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Backward: dW ~= (1/r) sum_n (dY_n S_k Z) Xbar_n^T
# ---------------------------------------------------------------------------------------------


def _check_weight_grad_args(op: str, grad_output: Tensor, xbar: Tensor, seed: int, geometry: ConvGeometry,
                            probe: str) -> None:
    check_tensor(op, "grad_output", grad_output, ndim=4, dtypes=FLOAT_DTYPES)
    check_seed(op, seed)
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"{op}: geometry must be a ConvGeometry, got {type(geometry).__name__}")
    check_tensor(op, "xbar", xbar, ndim=3, dtypes=(torch.float32,), device=grad_output.device)
    n, c_out, h_out, w_out = grad_output.shape
    c_in, n_x, probes = xbar.shape
    check_probe_args(op, probes, probe)
    if n_x != n:
        raise ValueError(f"{op}: xbar holds {n_x} samples but grad_output {n}")
    if c_in % geometry.groups or c_out % geometry.groups:
        raise ValueError(f"{op}: groups={geometry.groups} must divide C_in={c_in} and C_out={c_out}")
    expect = geometry.output_hw()
    if (h_out, w_out) != expect:
        raise ValueError(
            f"{op}: grad_output is {h_out}x{w_out} but the conv geometry gives {expect[0]}x{expect[1]}"
        )


def _contract_xbar(a: Tensor, xbar: Tensor, geometry: ConvGeometry) -> Tensor:
    """Stage 2: ``dW[o, c, k] = (1/r) sum_{n,j} A[o, k, n, j] Xbar[c, n, j]`` per group (one bmm)."""
    c_out, taps, n, probes = a.shape
    c_in, groups = xbar.shape[0], geometry.groups
    a_g = a.view(groups, (c_out // groups) * taps, n * probes)
    x_g = xbar.view(groups, c_in // groups, n * probes)
    dw = torch.bmm(a_g, x_g.transpose(1, 2)).div_(probes)  # (G, C_out/G * K, C_in/G)
    dw = dw.view(c_out, taps, c_in // groups).transpose(1, 2).contiguous()
    return dw.view(c_out, c_in // groups, *geometry.kernel_size)


def trace_weight_grad_torch(grad_output: Tensor, xbar: Tensor, seed: int, geometry: ConvGeometry,
                            probe: str) -> Tensor:
    """PyTorch reference for the trace-estimated weight gradient (float32, the weight's shape).

    Stage 1 unfolds Z (viewed as a 1 x r x H x W image) with the conv's geometry, giving S_k Z for
    every tap, and contracts it with dY over P_out; stage 2 contracts with Xbar over (n, j).
    """
    _check_weight_grad_args("trace_weight_grad_torch", grad_output, xbar, seed, geometry, probe)
    n, c_out, h_out, w_out = grad_output.shape
    probes = xbar.shape[2]
    h, w = geometry.input_hw
    z = probe_matrix(seed, h * w, probes, probe, device=grad_output.device)
    z_img = z.t().reshape(1, probes, h, w)
    z_unf = F.unfold(z_img, geometry.kernel_size, dilation=geometry.dilation, padding=geometry.padding,
                     stride=geometry.stride)
    z_unf = z_unf.view(probes, geometry.taps, h_out * w_out).permute(2, 1, 0)
    a = grad_output.reshape(n * c_out, h_out * w_out).to(torch.float32) @ z_unf.reshape(h_out * w_out, -1)
    a = a.view(n, c_out, geometry.taps, probes).permute(1, 2, 0, 3).contiguous()
    return _contract_xbar(a, xbar, geometry)


def trace_weight_grad_triton(grad_output: Tensor, xbar: Tensor, seed: int, geometry: ConvGeometry,
                             probe: str) -> Tensor:
    """Triton version of :func:`trace_weight_grad_torch`: stage 1 generates S_k Z in registers."""
    _check_weight_grad_args("trace_weight_grad_triton", grad_output, xbar, seed, geometry, probe)
    require_triton("trace_weight_grad_triton")
    return _contract_xbar(_probe_matmul(grad_output, seed, xbar.shape[2], probe, geometry), xbar, geometry)


@define_op("bpfree::trace_weight_grad")
def trace_weight_grad(
    grad_output: Tensor,
    xbar: Tensor,
    seed: Tensor,
    input_hw: list[int],
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    probe: str,
) -> Tensor:
    """Trace-estimated conv weight gradient (float32, shape C_out x C_in/groups x kh x kw); the
    geometry as plain lists (the op schema), made a :class:`ConvGeometry` here."""
    geometry = ConvGeometry(input_hw, kernel_size, stride, padding, dilation, groups)
    impl = trace_weight_grad_triton if use_triton(grad_output) else trace_weight_grad_torch
    return impl(grad_output, xbar, int(seed), geometry, probe)


@torch.library.register_fake(trace_weight_grad)
def _trace_weight_grad_fake(grad_output, xbar, seed, input_hw, kernel_size, stride, padding, dilation, groups,
                            probe):
    shape = (grad_output.shape[1], xbar.shape[0] // groups, kernel_size[0], kernel_size[1])
    return grad_output.new_empty(shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Autograd and modules
# ---------------------------------------------------------------------------------------------


class _TraceConv2dFunction(torch.autograd.Function):
    """Exact conv forward; backward with exact dX and db and the trace-estimated dW."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None,
                seed: Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int, probes: int, probe: str) -> Tensor:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        xbar = torch.ops.bpfree.trace_compress(x.contiguous(), seed, probes, probe)
        ctx.save_for_backward(xbar, weight, seed)
        ctx.input_shape = x.shape
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.probe = probe
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple:
        xbar, weight, seed = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        grad_output = grad_output.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Under autocast grad_output can be half precision while the weight is fp32.
            grad_x = torch.nn.grad.conv2d_input(
                ctx.input_shape, weight.to(grad_output.dtype), grad_output, stride, padding,
                dilation, groups,
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.bpfree.trace_weight_grad(
                grad_output, xbar, seed, list(ctx.input_shape[2:]), list(weight.shape[2:]),
                list(stride), list(padding), list(dilation), groups, ctx.probe,
            ).to(weight.dtype)  # fmt: skip
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_output.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def unsupported_conv(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot become a TraceConv2d, or None when it can."""
    return unsupported_conv2d(conv, TraceConv2d)


class TraceConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose weight gradient is a randomized trace estimate.

    Same constructor as ``nn.Conv2d`` plus ``probes`` (r, the number of probe vectors) and ``probe``
    (one of :data:`~kernels.probes.PROBES`); same parameters and state_dict keys.

    Training mode (``train()``, grad enabled, a weight that requires grad): forward saves only
    ``Xbar = X Z`` (C_in x r per sample) and a per-call seed drawn from torch's default CPU
    generator (reproducible under torch.manual_seed), not X; backward returns the exact input and
    bias gradients and an unbiased estimate of the weight gradient, ``(1/r) sum_n (dY_n S_k Z)
    Xbar_n^T`` per tap k: it equals the true gradient in expectation, not call by call.

    Evaluation mode (``eval()``), or without grad, or a frozen weight: it is ``nn.Conv2d`` itself,
    which keeps X for backward (no memory saved) and gives the exact weight gradient. Compute exact
    gradients (a diagnostic, a reference) in eval mode; train in training mode.
    """

    def __init__(self, *args, probes: int = 16, probe: str = "gaussian", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_probe_args("TraceConv2d", probes, probe)
        reason = unsupported_conv(self)
        if reason is not None:
            raise ValueError(f"TraceConv2d: {reason}")
        self.probes = probes
        self.probe = probe

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, probes: int = 16, probe: str = "gaussian") -> TraceConv2d:
        """A TraceConv2d with ``conv``'s configuration that shares its weight and bias Parameters."""
        reason = unsupported_conv(conv)
        if reason is not None:
            raise ValueError(f"TraceConv2d.from_conv: {reason}")
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
            dtype=conv.weight.dtype, probes=probes, probe=probe,
        )  # fmt: skip
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, probes={self.probes}, probe={self.probe!r}"

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(input)
        if input.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(input.unsqueeze(0)).squeeze(0)
        seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device="cpu")
        return _TraceConv2dFunction.apply(
            input, self.weight, self.bias, seed, self.stride, int_padding(self.padding, self.kernel_size, self.dilation), self.dilation,
            self.groups, self.probes, self.probe,
        )  # fmt: skip

