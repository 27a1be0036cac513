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

Probes, each entry a pure function of (seed, position, column) through ``kernels._hash`` so that the
Triton kernels generate Z on the fly (Z is never stored) and the PyTorch reference builds the same Z:

* ``gaussian``: Box-Muller from two independent hashes, ``E[Z Z^T] = r I``;
* ``rademacher``: the top bit of one hash as a sign, ``E[Z Z^T] = r I``;
* ``orthogonal``: every position p goes to one random column b(p) (a hash mod r) with a random sign
  s(p) and magnitude sqrt(r): ``Z[p, j] = sqrt(r) s(p) [b(p) = j]``. The columns have disjoint
  supports, so they are exactly orthogonal, each with squared norm r * |{p : b(p) = j}| ~= P;
  ``(Z Z^T)[p, p] = r`` exactly and off-diagonal entries have mean 0, so ``E[Z Z^T] = r I``. Its
  trace-estimation variance equals Rademacher's, while each row has a single nonzero.

Memory saved per converted conv: the saved activation falls from C_in*H*W to C_in*r numbers per sample
(fp32; e.g. 64x32x32 fp32 = 256 KiB -> 64x16 fp32 = 4 KiB per sample at r = 16). In networks where the
conv input is also saved by another op (a ReLU's output), see :class:`MaskReLU`; what a conv-BN-ReLU
network keeps after that is BatchNorm's inputs, see :mod:`kernels.compact_batch_norm`.

Supported: ``nn.Conv2d`` with any stride, integer padding (or 'valid', or 'same' when symmetric),
dilation, groups (depthwise included), bias or not, non-square kernels, padding_mode='zeros', dtypes
float32/float16/bfloat16. Transposed convs, other padding modes, 1-d/3-d convs and ``nn.Conv2d``
subclasses are refused with an error naming the layer.

Kernels: CUDA tensors run the Triton kernels, CPU tensors the PyTorch references, except under
``TRITON_INTERPRET=1`` where CPU tensors run the Triton kernels (``kernels._dispatch.use_triton``).
On GPU, ``tl.dot`` on fp32 tiles uses TF32 (Triton's default); the interpreter computes in fp32.
The ops are registered as ``torch.ops.bpfree.trace_compress`` and ``torch.ops.bpfree.trace_weight_grad``
(custom ops with fake implementations), so models with TraceConv2d go through ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from kernels._dispatch import check_tensor, use_triton
from kernels._hash import hash2, hash2_torch, stream_key
from kernels._modules import swap_modules
from kernels.compact_batch_norm import convert_batch_norms

__all__ = [
    "PROBES",
    "MaskReLU",
    "TraceConv2d",
    "convert_to_trace_conv",
    "probe_matrix",
    "trace_compress_torch",
    "trace_compress_triton",
    "trace_weight_grad_torch",
    "trace_weight_grad_triton",
]

PROBES: tuple[str, ...] = ("gaussian", "rademacher", "orthogonal")
_PROBE_CODE = {name: code for code, name in enumerate(PROBES)}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TWO_POW_M24 = 2.0**-24  # spacing of the 24-bit uniforms drawn from the top bits of a hash
_SEED_HIGH = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------


def _probe_keys(seed: int) -> tuple[int, int]:
    """Two independent 32-bit hash keys (streams 0 and 1) of a probe seed."""
    return stream_key(seed, 0), stream_key(seed, 1)


def _check_probe_args(op: str, probes: int, probe: str) -> None:
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"{op}: probes must be a positive int, got {probes!r}")
    if probe not in _PROBE_CODE:
        raise ValueError(f"{op}: probe must be one of {', '.join(PROBES)}; got {probe!r}")


def probe_matrix(
    seed: int, positions: int, probes: int, probe: str, device: torch.device | str | None = None
) -> Tensor:
    """The probe matrix Z (positions x probes, float32) of ``seed``, with ``E[Z Z^T] = probes * I``.

    This is the PyTorch reference; the Triton kernels compute the same entries in registers.
    Entry (p, j) depends only on (seed, p, j): rademacher and orthogonal entries are bit-identical
    to the kernels', gaussian ones agree to float32 rounding of log/cos/sqrt.
    """
    _check_probe_args("probe_matrix", probes, probe)
    key1, key2 = _probe_keys(seed)
    pos = torch.arange(positions, device=device).unsqueeze(1)
    col = torch.arange(probes, device=device).unsqueeze(0)
    if probe == "gaussian":
        u1 = ((hash2_torch(key1, pos, col) >> 8) + 1).to(torch.float32) * _TWO_POW_M24  # (0, 1]
        u2 = (hash2_torch(key2, pos, col) >> 8).to(torch.float32) * _TWO_POW_M24  # [0, 1)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(u2 * (2.0 * math.pi))
    if probe == "rademacher":
        return (1 - 2 * (hash2_torch(key1, pos, col) >> 31)).to(torch.float32)
    zero = torch.zeros_like(col)
    sign = (1 - 2 * (hash2_torch(key1, pos, zero) >> 31)).to(torch.float32)
    bucket = hash2_torch(key2, pos, zero) % probes
    return torch.where(bucket == col, sign * math.sqrt(probes), 0.0)


@triton.jit
def _probe_tile(key1, key2, pos, col, valid, r, scale, PROBE: tl.constexpr):
    """Z[pos, col] for a [BLOCK_P, 1] x [1, BLOCK_R] tile, zero where ``valid`` is false or col >= r."""
    if PROBE == 0:
        u1 = ((hash2(key1, pos, col) >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
        u2 = (hash2(key2, pos, col) >> 8).to(tl.float32) * 5.9604644775390625e-08
        z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(u2 * 6.283185307179586)
    elif PROBE == 1:
        z = 1.0 - 2.0 * (hash2(key1, pos, col) >> 31).to(tl.float32)
    else:
        zero = col * 0
        sign = 1.0 - 2.0 * (hash2(key1, pos, zero) >> 31).to(tl.float32)
        bucket = hash2(key2, pos, zero) % r.to(tl.uint32)
        z = tl.where(bucket == col.to(tl.uint32), sign * scale, 0.0)
    return tl.where(valid & (col < r), z, 0.0)


def _block_r(probes: int) -> int:
    """Probe-column tile: a power of two in [16, 64] (tl.dot needs >= 16; masked beyond r)."""
    return min(64, max(16, triton.next_power_of_2(probes)))


# ---------------------------------------------------------------------------------------------
# Forward: probe compression Xbar = X Z
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["r", "key1", "key2"])
def _compress_kernel(
    x_ptr, out_ptr, M, P, C, N, r, key1, key2, scale,
    PROBE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out[c, n, j] = sum_p x[n, c, p] Z[p, j] for rows m = n*C + c; Z is generated per tile."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    k1 = key1.to(tl.uint32)
    k2 = key2.to(tl.uint32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pos = p0 + tl.arange(0, BLOCK_P)
        pos_ok = pos < P
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * P + pos[None, :],
            mask=row_ok[:, None] & pos_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        z = _probe_tile(k1, k2, pos[:, None], cols[None, :], pos_ok[:, None], r, scale, PROBE)
        acc += tl.dot(x, z)
    n = rows // C
    c = rows % C
    out = out_ptr + ((c.to(tl.int64) * N + n) * r)[:, None] + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (cols < r)[None, :])


def _check_compress_args(op: str, x: Tensor, probes: int, probe: str) -> None:
    check_tensor(op, "x", x, ndim=4, dtypes=_DTYPES)
    _check_probe_args(op, probes, probe)


def trace_compress_torch(x: Tensor, seed: int, probes: int, probe: str) -> Tensor:
    """PyTorch reference: ``Xbar[c, n, :] = X[n, c].flatten() @ Z`` as a (C_in, N, r) float32 tensor."""
    _check_compress_args("trace_compress_torch", x, probes, probe)
    n, c, h, w = x.shape
    z = probe_matrix(seed, h * w, probes, probe, device=x.device)
    xbar = x.reshape(n * c, h * w).to(torch.float32) @ z
    return xbar.view(n, c, probes).transpose(0, 1).contiguous()


def trace_compress_triton(x: Tensor, seed: int, probes: int, probe: str) -> Tensor:
    """Triton kernel for :func:`trace_compress_torch`; Z is generated in registers, never stored."""
    _check_compress_args("trace_compress_triton", x, probes, probe)
    n, c, h, w = x.shape
    out = torch.empty((c, n, probes), dtype=torch.float32, device=x.device)
    key1, key2 = _probe_keys(seed)
    block_m, block_p, block_r = 64, 64, _block_r(probes)
    grid = (triton.cdiv(n * c, block_m), triton.cdiv(probes, block_r))
    _compress_kernel[grid](
        x, out, n * c, h * w, c, n, probes, key1, key2, math.sqrt(probes),
        PROBE=_PROBE_CODE[probe], BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r,
    )  # fmt: skip
    return out


@torch.library.custom_op("bpfree::trace_compress", mutates_args=())
def trace_compress(x: Tensor, seed: Tensor, probes: int, probe: str) -> Tensor:
    """``Xbar = X Z`` as (C_in, N, probes) float32, Z drawn from the 0-d int64 ``seed``."""
    impl = trace_compress_triton if use_triton(x) else trace_compress_torch
    return impl(x, int(seed), probes, probe)


@trace_compress.register_fake
def _trace_compress_fake(x: Tensor, seed: Tensor, probes: int, probe: str) -> Tensor:
    return x.new_empty((x.shape[1], x.shape[0], probes), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Backward: dW ~= (1/r) sum_n (dY_n S_k Z) Xbar_n^T
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["r", "key1", "key2"])
def _probe_grad_kernel(
    dy_ptr, a_ptr, M, C_out, N, P_out, W_out, H, W, KW, K, n_rblocks,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, r, key1, key2, scale,
    PROBE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
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
        z = _probe_tile(k1, k2, pos[:, None], cols[None, :], inside[:, None], r, scale, PROBE)
        acc += tl.dot(dy, z)
    n = rows // C_out
    o = rows % C_out
    out = a_ptr + (((o.to(tl.int64) * K + k) * N + n) * r)[:, None] + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (cols < r)[None, :])


def _check_weight_grad_args(
    op: str,
    grad_output: Tensor,
    xbar: Tensor,
    input_hw: list[int],
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    probe: str,
) -> None:
    check_tensor(op, "grad_output", grad_output, ndim=4, dtypes=_DTYPES)
    check_tensor(op, "xbar", xbar, ndim=3, dtypes=(torch.float32,), device=grad_output.device)
    for name, pair in (("input_hw", input_hw), ("kernel_size", kernel_size), ("stride", stride),
                       ("padding", padding), ("dilation", dilation)):  # fmt: skip
        if len(pair) != 2:
            raise ValueError(f"{op}: {name} must have 2 entries, got {list(pair)}")
    n, c_out, h_out, w_out = grad_output.shape
    c_in, n_x, probes = xbar.shape
    _check_probe_args(op, probes, probe)
    if n_x != n:
        raise ValueError(f"{op}: xbar holds {n_x} samples but grad_output {n}")
    if c_in % groups or c_out % groups:
        raise ValueError(f"{op}: groups={groups} must divide C_in={c_in} and C_out={c_out}")
    expect = [
        (input_hw[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]
    if [h_out, w_out] != expect:
        raise ValueError(
            f"{op}: grad_output is {h_out}x{w_out} but the conv geometry gives {expect[0]}x{expect[1]}"
        )


def _contract_xbar(a: Tensor, xbar: Tensor, groups: int, kernel_size: list[int]) -> Tensor:
    """Stage 2: ``dW[o, c, k] = (1/r) sum_{n,j} A[o, k, n, j] Xbar[c, n, j]`` per group (one bmm)."""
    c_out, taps, n, probes = a.shape
    c_in = xbar.shape[0]
    a_g = a.view(groups, (c_out // groups) * taps, n * probes)
    x_g = xbar.view(groups, c_in // groups, n * probes)
    dw = torch.bmm(a_g, x_g.transpose(1, 2)).div_(probes)  # (G, C_out/G * K, C_in/G)
    dw = dw.view(c_out, taps, c_in // groups).transpose(1, 2).contiguous()
    return dw.view(c_out, c_in // groups, kernel_size[0], kernel_size[1])


def trace_weight_grad_torch(
    grad_output: Tensor,
    xbar: Tensor,
    seed: int,
    input_hw: list[int],
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    probe: str,
) -> Tensor:
    """PyTorch reference for the trace-estimated weight gradient (float32, the weight's shape).

    Stage 1 unfolds Z (viewed as a 1 x r x H x W image) with the conv's geometry, giving S_k Z for
    every tap, and contracts it with dY over P_out; stage 2 contracts with Xbar over (n, j).
    """
    _check_weight_grad_args("trace_weight_grad_torch", grad_output, xbar, input_hw, kernel_size,
                            stride, padding, dilation, groups, probe)  # fmt: skip
    n, c_out, h_out, w_out = grad_output.shape
    probes = xbar.shape[2]
    h, w = input_hw
    taps = kernel_size[0] * kernel_size[1]
    z = probe_matrix(seed, h * w, probes, probe, device=grad_output.device)
    z_img = z.t().reshape(1, probes, h, w)
    z_unf = F.unfold(z_img, kernel_size, dilation=dilation, padding=padding, stride=stride)
    z_unf = z_unf.view(probes, taps, h_out * w_out).permute(2, 1, 0).reshape(h_out * w_out, taps * probes)
    a = grad_output.reshape(n * c_out, h_out * w_out).to(torch.float32) @ z_unf
    a = a.view(n, c_out, taps, probes).permute(1, 2, 0, 3).contiguous()
    return _contract_xbar(a, xbar, groups, kernel_size)


def trace_weight_grad_triton(
    grad_output: Tensor,
    xbar: Tensor,
    seed: int,
    input_hw: list[int],
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    probe: str,
) -> Tensor:
    """Triton version of :func:`trace_weight_grad_torch`: stage 1 generates S_k Z in registers."""
    _check_weight_grad_args("trace_weight_grad_triton", grad_output, xbar, input_hw, kernel_size,
                            stride, padding, dilation, groups, probe)  # fmt: skip
    n, c_out, h_out, w_out = grad_output.shape
    probes = xbar.shape[2]
    taps = kernel_size[0] * kernel_size[1]
    a = torch.empty((c_out, taps, n, probes), dtype=torch.float32, device=grad_output.device)
    key1, key2 = _probe_keys(seed)
    block_m, block_p, block_r = 64, 64, _block_r(probes)
    n_rblocks = triton.cdiv(probes, block_r)
    grid = (taps * n_rblocks, triton.cdiv(n * c_out, block_m))
    _probe_grad_kernel[grid](
        grad_output, a, n * c_out, c_out, n, h_out * w_out, w_out, input_hw[0], input_hw[1],
        kernel_size[1], taps, n_rblocks, stride[0], stride[1], padding[0], padding[1],
        dilation[0], dilation[1], probes, key1, key2, math.sqrt(probes),
        PROBE=_PROBE_CODE[probe], BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r,
    )  # fmt: skip
    return _contract_xbar(a, xbar, groups, kernel_size)


@torch.library.custom_op("bpfree::trace_weight_grad", mutates_args=())
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
    """Trace-estimated conv weight gradient (float32, shape C_out x C_in/groups x kh x kw)."""
    impl = trace_weight_grad_triton if use_triton(grad_output) else trace_weight_grad_torch
    return impl(grad_output, xbar, int(seed), input_hw, kernel_size, stride, padding, dilation,
                groups, probe)  # fmt: skip


@trace_weight_grad.register_fake
def _trace_weight_grad_fake(
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
    shape = (grad_output.shape[1], xbar.shape[0] // groups, kernel_size[0], kernel_size[1])
    return grad_output.new_empty(shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Autograd and modules
# ---------------------------------------------------------------------------------------------


class _TraceConv2dFunction(torch.autograd.Function):
    """Exact conv forward; backward with exact dX and db and the trace-estimated dW."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        seed: Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        probes: int,
        probe: str,
    ) -> Tensor:
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


def _unsupported(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot become a TraceConv2d, or None when it can."""
    if not isinstance(conv, _ConvNd):
        return f"{type(conv).__name__} is not a convolution"
    if conv.transposed:
        return f"transposed convolution ({type(conv).__name__}) is not supported"
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not supported (only 2-d convolutions are)"
    if type(conv) not in (nn.Conv2d, TraceConv2d):
        return f"nn.Conv2d subclass {type(conv).__name__} is not supported (its forward may differ)"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "uninitialized lazy parameters are not supported; run a forward pass first"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
    if isinstance(conv.padding, str) and conv.padding == "same":
        if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
            return "padding='same' with an even effective kernel pads asymmetrically; not supported"
    return None


def _int_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's symmetric zero padding as two ints ('valid' -> 0, 'same' -> dilation*(k-1)/2)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


class TraceConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose weight gradient is a randomized trace estimate.

    Same constructor as ``nn.Conv2d`` plus ``probes`` (r, the number of probe vectors) and ``probe``
    (one of :data:`PROBES`); same parameters and state_dict keys. In training mode, with grad enabled
    and a weight that requires grad, forward saves only ``Xbar = X Z`` (C_in x r per sample) and a
    per-call seed drawn from torch's default CPU generator (reproducible under torch.manual_seed);
    backward returns the exact input and bias gradients and an unbiased estimate of the weight
    gradient, ``(1/r) sum_n (dY_n S_k Z) Xbar_n^T`` per tap k. Otherwise it is the exact conv.
    """

    def __init__(self, *args, probes: int = 16, probe: str = "gaussian", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_probe_args("TraceConv2d", probes, probe)
        reason = _unsupported(self)
        if reason is not None:
            raise ValueError(f"TraceConv2d: {reason}")
        self.probes = probes
        self.probe = probe

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, probes: int = 16, probe: str = "gaussian") -> TraceConv2d:
        """A TraceConv2d with ``conv``'s configuration that shares its weight and bias Parameters."""
        reason = _unsupported(conv)
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
        seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device="cpu")
        return _TraceConv2dFunction.apply(
            input, self.weight, self.bias, seed, self.stride, _int_padding(self), self.dilation,
            self.groups, self.probes, self.probe,
        )  # fmt: skip


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


def convert_to_trace_conv(
    model: nn.Module,
    probes: int = 16,
    probe: str = "gaussian",
    keep_first_exact: bool = True,
    mask_relu: bool = True,
    compact_bn: bool = True,
) -> nn.Module:
    """Swap every ``nn.Conv2d`` of ``model`` for a :class:`TraceConv2d` sharing its Parameters.

    Works in place on any module tree (torchvision ResNets included) and returns the model (the
    replacement itself when ``model`` is a conv). ``keep_first_exact`` leaves the first conv in
    module order exact, as in the paper. ``mask_relu`` also swaps every ``nn.ReLU`` for a
    :class:`MaskReLU` (exact gradient, 1-bit saved mask); without it, a conv-BN-ReLU network keeps
    each ReLU output, which is the next conv's input, and saves little memory. ``compact_bn`` also
    swaps every ``nn.BatchNorm2d`` for a :class:`~kernels.compact_batch_norm.CompactBatchNorm2d`
    (saves its normalized input in fp16: BN inputs are then most of what is left). Convs that are
    already TraceConv2d are left as they are; hooks registered on replaced modules are not carried
    over. Every conv to convert is checked before any is
    swapped; an unsupported one raises ValueError naming the layer, e.g.
    ``"layer1.0.conv2: padding_mode='reflect' is not supported (only 'zeros')"``.
    """
    _check_probe_args("convert_to_trace_conv", probes, probe)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, _ConvNd)]
    if keep_first_exact:
        convs = convs[1:]
    replacements: dict[int, nn.Module] = {}
    for name, conv in convs:
        if isinstance(conv, TraceConv2d):
            continue
        reason = _unsupported(conv)
        if reason is not None:
            raise ValueError(f"{name or type(conv).__name__}: {reason}")
        replacements[id(conv)] = TraceConv2d.from_conv(conv, probes=probes, probe=probe)
    if mask_relu:
        for module in model.modules():
            if type(module) is nn.ReLU:
                replacements[id(module)] = MaskReLU(inplace=module.inplace).train(module.training)
    model = swap_modules(model, replacements)
    return convert_batch_norms(model) if compact_bn else model
