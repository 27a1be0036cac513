"""Fused local-alignment update: LRA's error units and the dense weight update built on them.

Notation (see ``docs/rules.md``): a unit has pre-activation ``a`` (N x D) and output ``z = phi(a)``;
its input is ``z_prev`` (N x D_prev). The upstream error units ``u`` (N x C_up) reach it through
LRA's dense error matrix ``P = E`` (C_up x D). With E's action ``d = scale * (u @ P)`` (N x D), the
target is ``y = phi(a - beta * d)`` and the error units are
``e = alpha * (z - y) + (1 - alpha) * sign(z - y)`` (``sign(0) = 0``), the unit's signal.

For a dense unit the weight update is the Hebbian ``dW = e^T @ z_prev`` (D x D_prev), its Frobenius
norm ``||dW||`` and the norm-ball projection ``dW <- c * dW / ||dW|| if ||dW|| >= c``.

Kernels (Triton; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):

* ``_signal_kernel``: one program per (BLOCK_M x BLOCK_D) tile of the signal. It runs the projection
  GEMM over C_up in BLOCK_C chunks into an fp32 accumulator and applies the elementwise rule as the
  GEMM's epilogue, so ``d`` is never written unless the diagnostics are asked for.
* ``_weight_update_kernel``: one program per (BLOCK_D x BLOCK_DP) tile of ``dW``, reducing over the
  batch in BLOCK_N chunks. Its PROLOGUE produces the (BLOCK_N x BLOCK_D) tile of ``e`` on the fly
  (the projection GEMM over C_up plus the rule above), so ``e`` is never written to memory; the tile
  is recomputed once per column of dW tiles, i.e. ``ceil(D_prev / BLOCK_DP)`` times. That costs
  about ``C_up / BLOCK_DP`` times the main GEMM's FLOPs, so the prologue is fused when
  ``C_up <= BLOCK_DP`` (or there is a single column of tiles); above that the launcher writes ``e``
  once with ``_signal_kernel`` and the same GEMM kernel loads it instead (``fuse_signal_default``).
  Every program also writes the sum of squares of its tile to a small buffer that one torch sum on
  the device reduces to ``||dW||`` (a fixed order: deterministic, no atomics). The EPILOGUE stores
  ``dW``.

Norm-ball ordering: the projection factor ``f = min(1, c / ||dW||)`` needs the norm of the whole
update before any tile may be written. Without ``max_norm`` one pass does everything (f = 1). With
``max_norm`` the update runs as two launches of the same kernel: pass 1 computes only the per-tile
sums of squares (nothing of size D x D_prev is written); ``f`` is formed on the device (no host
sync); pass 2 recomputes the tiles and writes ``f * dW``. The batch dimension N is the GEMM's
reduction, and it is small (a minibatch), so the update is memory-bound on the D x D_prev tensors:
recomputing the tile FLOPs is cheaper than writing ``dW`` and reading it back for scaling.

Dots take the inputs' common 16-bit dtype, else float32; float32 dots use TF32 only where torch
allows it for matmuls (``torch.backends.cuda.matmul.allow_tf32``; the "matmul" rule of
``kernels._dispatch``), like the PyTorch path. CPU tensors without the interpreter run the
pure-PyTorch references (``local_signal_reference``, ``local_weight_update_reference``), which
compute in float32 and cast like the kernels do.
The ops are registered as ``torch.ops.bpfree.local_signal`` and ``torch.ops.bpfree.local_weight_update``
with fake implementations, so they trace inside ``torch.compile(fullgraph=True)`` without a graph
break. They compute updates, not differentiable functions: the public wrappers detach their inputs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from kernels._dispatch import (
    FLOAT_DTYPES, check_number, check_tensor, define_op, dot_operands, dot_precision, tile, tl, triton, use_triton,
)

__all__ = [
    "LOCAL_KINDS",
    "LOCAL_ACTIVATIONS",
    "LRASignal",
    "WeightUpdate",
    "local_signal",
    "local_signal_reference",
    "local_weight_update",
    "local_weight_update_reference",
    "fuse_signal_default",
    "lra_error_units",
    "norm_ball_factor",
    "phi",
]

LOCAL_KINDS: tuple[str, ...] = ("lra",)
"""The rules whose signal the kernels compute: LRA's, the one a rule trains with (``kind`` names it)."""
LOCAL_ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "identity")

_ACT_CODE = {name: code for code, name in enumerate(LOCAL_ACTIVATIONS)}

# Tile sizes of the weight-update GEMM; BLOCK_DP also sets when the signal prologue is fused.
_BLOCK_D = 64
_BLOCK_DP = 64
_BLOCK_N = 32
_GROUP_D = 8


class LRASignal(NamedTuple):
    """What ``local_signal`` returns: the error units ``e``, and with
    ``diagnostics=True`` also ``E``'s action ``d`` and the target ``y`` (otherwise None)."""

    e: torch.Tensor
    d: torch.Tensor | None
    y: torch.Tensor | None


class WeightUpdate(NamedTuple):
    """What ``local_weight_update`` returns.

    ``dw``: the (projected) update ``f * e^T z_prev`` in the activation dtype; ``norm``:
    ``||e^T z_prev||_F`` before projection (0-d float32); ``factor``: the norm-ball factor ``f = min(1, max_norm / norm)`` (0-d float32, 1 when
    ``max_norm`` is None).
    """

    dw: torch.Tensor
    norm: torch.Tensor
    factor: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _act(x, ACT: tl.constexpr):
    """phi(x) for ACT = 0 relu, 1 tanh, 2 sigmoid, 3 identity (fp32)."""
    if ACT == 0:
        out = tl.maximum(x, 0.0)
    elif ACT == 1:
        t = tl.exp(-2.0 * tl.abs(x))
        out = tl.where(x >= 0, 1.0, -1.0) * (1.0 - t) / (1.0 + t)
    elif ACT == 2:
        out = tl.sigmoid(x)
    else:
        out = x
    return out


@triton.jit
def _project_tile(
    u_ptr, p_ptr, rows, cols, row_mask, col_mask, C, D, scale,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    """scale * (u[rows, :] @ P[:, cols]) as an fp32 (BLOCK_R x BLOCK_K) tile; u is N x C, P is C x D."""
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        u = tl.load(u_ptr + rows64[:, None] * C + offs_c[None, :],
                    mask=row_mask[:, None] & c_mask[None, :], other=0.0)
        p = tl.load(p_ptr + offs_c.to(tl.int64)[:, None] * D + cols[None, :],
                    mask=c_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(u.to(DOT_DTYPE), p.to(DOT_DTYPE), acc, input_precision=PREC)
    return acc * scale


@triton.jit
def _tile_signal(proj, a_ptr, z_ptr, offs, mask, beta, alpha, ACT: tl.constexpr, HAS_Z: tl.constexpr):
    """(error units, target) of a tile from the projected tile, a and z (phi(a) when not given)."""
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        z = _act(a, ACT)
    y = _act(a - beta * proj, ACT)
    diff = z - y
    sgn = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    return alpha * diff + (1.0 - alpha) * sgn, y


@triton.jit
def _signal_kernel(
    u_ptr, p_ptr, a_ptr, z_ptr, g_ptr, d_ptr, y_ptr,
    N, C, D, scale, beta, alpha,
    ACT: tl.constexpr, HAS_Z: tl.constexpr, DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_D) tile of the signal: projection GEMM with the rule as its epilogue."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    proj = _project_tile(u_ptr, p_ptr, rows, cols, row_mask, col_mask, C, D, scale,
                         BLOCK_M, BLOCK_D, BLOCK_C, DOT_DTYPE, PREC)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    g, y = _tile_signal(proj, a_ptr, z_ptr, offs, mask, beta, alpha, ACT, HAS_Z)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    if DIAG:
        tl.store(d_ptr + offs, proj.to(d_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_update_kernel(
    u_ptr, p_ptr, a_ptr, z_ptr, g_ptr, zp_ptr, dw_ptr, partial_ptr, factor_ptr,
    N, C, D, DP, scale, beta, alpha,
    ACT: tl.constexpr, HAS_Z: tl.constexpr, FUSED_SIGNAL: tl.constexpr,
    WRITE_DW: tl.constexpr, HAS_FACTOR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DP: tl.constexpr,
    GROUP_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, MM_DTYPE: tl.constexpr,
    MM_PREC: tl.constexpr,
):
    """One (BLOCK_D x BLOCK_DP) tile of dW = e^T z_prev; e's tile is made in the prologue (or loaded)."""
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BLOCK_D)
    num_dp = tl.cdiv(DP, BLOCK_DP)
    per_group = GROUP_D * num_dp
    first_d = (pid // per_group) * GROUP_D
    group_rows = tl.minimum(num_d - first_d, GROUP_D)
    pid_d = first_d + (pid % per_group) % group_rows
    pid_dp = (pid % per_group) // group_rows

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_p = pid_dp * BLOCK_DP + tl.arange(0, BLOCK_DP)
    col_mask = cols < D
    colp_mask = cols_p < DP
    acc = tl.zeros((BLOCK_D, BLOCK_DP), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        if FUSED_SIGNAL:
            proj = _project_tile(u_ptr, p_ptr, rows, cols, row_mask, col_mask, C, D, scale,
                                 BLOCK_N, BLOCK_D, BLOCK_C, DOT_DTYPE, DOT_PREC)
            g, _ = _tile_signal(proj, a_ptr, z_ptr, offs, mask, beta, alpha, ACT, HAS_Z)
            g = tl.where(mask, g, 0.0)  # padded columns would otherwise leak into the norm
        else:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        zp = tl.load(zp_ptr + rows64[:, None] * DP + cols_p[None, :],
                     mask=row_mask[:, None] & colp_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(g.to(MM_DTYPE)), zp.to(MM_DTYPE), acc, input_precision=MM_PREC)

    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if HAS_FACTOR:
        acc = acc * tl.load(factor_ptr)
    out_offs = cols.to(tl.int64)[:, None] * DP + cols_p[None, :]
    out_mask = col_mask[:, None] & colp_mask[None, :]
    if WRITE_DW:
        tl.store(dw_ptr + out_offs, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------------
# Launchers (write into given buffers)
# --------------------------------------------------------------------------------------------------

def _launch_signal(
    upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None,
    g: torch.Tensor, d: torch.Tensor | None, y: torch.Tensor | None,
    *, beta: float, alpha: float, activation: str, scale: float,
) -> None:
    """Run ``_signal_kernel``, writing the signal into ``g`` (and ``d``, ``y`` when both are given)."""
    N, C = upstream.shape
    D = P.shape[1]
    # 64 x 64 tiles over 8 warps: the epilogue's fp32 tiles (a, z, target, signal, d) then fit in
    # registers; 64 x 128 over 4 warps spilled on sm_90 (benchmarks/compile_kernels.py).
    block_m, block_d, block_c = tile(N, 16, 64), tile(D, 16, 64), tile(C, 16, 32)
    diag = d is not None and y is not None
    grid = (triton.cdiv(N, block_m), triton.cdiv(D, block_d))
    dot_dtype = dot_operands(upstream.dtype, P.dtype)
    _signal_kernel[grid](
        upstream, P, a, a if z is None else z, g, d if diag else g, y if diag else g,
        N, C, D, scale, beta, alpha,
        ACT=_ACT_CODE[activation], HAS_Z=z is not None, DIAG=diag,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=block_c,
        DOT_DTYPE=dot_dtype, PREC=dot_precision(dot_dtype, "matmul"), num_warps=8,
    )


def fuse_signal_default(c_up: int, d_prev: int) -> bool:
    """Whether the weight update recomputes the signal in its prologue (True) or writes it once.

    The prologue recomputes each signal tile once per column of dW tiles, ``ceil(D_prev / 64)``
    times, i.e. about ``C_up / 64`` times the main GEMM's FLOPs: fused when that is at most 1.
    """
    return c_up <= _BLOCK_DP or d_prev <= _BLOCK_DP


def _launch_weight_update(
    upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None,
    z_prev: torch.Tensor, dw: torch.Tensor, *, beta: float, alpha: float, activation: str, scale: float,
    max_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the weight-update GEMM, storing ``f * dW`` into ``dw``.

    Returns ``(norm, factor)``. One launch without ``max_norm``; with it, a norm-only launch, the
    factor on the device, then a second launch that writes the scaled update.
    """
    N, C = upstream.shape
    D, DP = a.shape[1], z_prev.shape[1]
    fused = fuse_signal_default(C, DP)
    if fused:
        g = a  # placeholder pointer, never read
    else:
        g = torch.empty_like(a)
        _launch_signal(upstream, P, a, z, g, None, None,
                       beta=beta, alpha=alpha, activation=activation, scale=scale)
    block_d, block_dp = tile(D, 16, _BLOCK_D), tile(DP, 16, _BLOCK_DP)
    dot_dtype, mm_dtype = dot_operands(upstream.dtype, P.dtype), dot_operands(a.dtype, z_prev.dtype)
    n_programs = triton.cdiv(D, block_d) * triton.cdiv(DP, block_dp)
    partials = torch.empty(n_programs, device=a.device, dtype=torch.float32)

    def launch(write_dw: bool, factor: torch.Tensor | None) -> None:
        _weight_update_kernel[(n_programs,)](
            upstream, P, a, a if z is None else z, g, z_prev,
            dw if write_dw else partials, partials, partials if factor is None else factor,
            N, C, D, DP, scale, beta, alpha,
            ACT=_ACT_CODE[activation], HAS_Z=z is not None, FUSED_SIGNAL=fused,
            WRITE_DW=write_dw, HAS_FACTOR=factor is not None,
            BLOCK_N=tile(N, 16, _BLOCK_N), BLOCK_C=tile(C, 16, 32),
            BLOCK_D=block_d, BLOCK_DP=block_dp, GROUP_D=_GROUP_D,
            DOT_DTYPE=dot_dtype, DOT_PREC=dot_precision(dot_dtype, "matmul"),
            MM_DTYPE=mm_dtype, MM_PREC=dot_precision(mm_dtype, "matmul"),
            num_warps=8 if fused else 4,  # the prologue's signal tiles spill over 4 warps on sm_90
        )

    if max_norm is None:
        launch(True, None)
        norm = partials.sum().sqrt()
        return norm, norm_ball_factor(norm, None)
    launch(False, None)
    norm = partials.sum().sqrt()
    factor = norm_ball_factor(norm, max_norm)
    launch(True, factor)
    return norm, factor


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch references (also the CPU path)
# --------------------------------------------------------------------------------------------------


def phi(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The unit activation ``phi`` by name (relu, tanh, sigmoid, identity), as the kernels apply it."""
    if activation == "relu":
        return x.clamp_min(0)
    if activation == "tanh":
        return torch.tanh(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "identity":
        return x
    raise ValueError(f"phi: unknown activation {activation!r}; expected one of {', '.join(LOCAL_ACTIVATIONS)}")


def lra_error_units(
    d: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None, *, beta: float, alpha: float, activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LRA's error units and target in float32, from E's action ``d`` (any shape, like ``a``)::

        y = phi(a - beta * d),   e = alpha * (z - y) + (1 - alpha) * sign(z - y)   (z = phi(a) if None)

    The kernels' LRA epilogue; the trainer's LRA rule calls it for the E maps the kernel does not
    take (convolutions, channel maps), so the tested equation is the one that trains.
    """
    op = "lra_error_units"
    if activation not in LOCAL_ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {', '.join(LOCAL_ACTIVATIONS)}")
    check_tensor(op, "a", a, contiguous=False)
    for name, tensor in (("a", a), ("d", d)) + ((("z", z),) if z is not None else ()):
        check_tensor(op, name, tensor, device=a.device, contiguous=False)
        if not tensor.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.dim() > a.dim() or any(s not in (1, t) for s, t in zip(tensor.shape[::-1], a.shape[::-1])):
            raise ValueError(f"{op}: {name} of shape {tuple(tensor.shape)} does not broadcast to a's "
                             f"{tuple(a.shape)}")
    beta, alpha = check_number(op, "beta", beta), check_number(op, "alpha", alpha)
    a = a.float()
    y = phi(a - beta * d.float(), activation)
    diff = (phi(a, activation) if z is None else z.float()) - y
    return alpha * diff + (1 - alpha) * torch.sign(diff), y


def norm_ball_factor(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """The norm-ball factor ``f = c / ||dW|| if ||dW|| >= c else 1`` (c = max_norm; None: f = 1), on
    the device (no host sync). The projected update is ``f * dW``."""
    check_tensor("norm_ball_factor", "norm", norm, contiguous=False)
    if not norm.is_floating_point():
        raise TypeError(f"norm_ball_factor: norm must be a floating-point tensor (a norm), got {norm.dtype}")
    if max_norm is None:
        return torch.ones_like(norm)
    check_number("norm_ball_factor", "max_norm", max_norm, positive=True)
    return torch.where(norm >= max_norm, max_norm / norm.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.ones_like(norm))


def _signal_math(
    upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None,
    beta: float, alpha: float, activation: str, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(error units, E's action d, target) in float32."""
    proj = scale * (upstream.float() @ P.float())
    e, y = lra_error_units(proj, a.float(), z, beta=beta, alpha=alpha, activation=activation)
    return e, proj, y


def local_signal_reference(
    kind: str, upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None = None,
    *, beta: float = 0.1, alpha: float = 1.0, activation: str = "relu", scale: float = 1.0,
    diagnostics: bool = False,
) -> LRASignal:
    """Pure-PyTorch ``local_signal`` (same arguments, checks and results; float32 math)."""
    op = "local_signal_reference"
    _check_signal_args(op, kind, upstream, P, a, z, activation, diagnostics)
    beta, alpha, scale = _rule_numbers(op, beta, alpha, scale)
    g, proj, y = _signal_math(upstream, P, a, z, beta, alpha, activation, scale)
    if diagnostics:
        return LRASignal(g.to(a.dtype), proj.to(a.dtype), y.to(a.dtype))
    return LRASignal(g.to(a.dtype), None, None)


def local_weight_update_reference(
    kind: str, upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None,
    z_prev: torch.Tensor, *, beta: float = 0.1, alpha: float = 1.0, activation: str = "relu",
    scale: float = 1.0, max_norm: float | None = None,
) -> WeightUpdate:
    """Pure-PyTorch ``local_weight_update`` (same arguments, checks and results; float32 math)."""
    op = "local_weight_update_reference"
    beta, alpha, scale = _rule_numbers(op, beta, alpha, scale)
    max_norm = None if max_norm is None else check_number(op, "max_norm", max_norm)
    _check_update_args(op, kind, upstream, P, a, z, z_prev, activation, max_norm)
    return WeightUpdate(*_update_math(upstream, P, a, z, z_prev, beta, alpha, activation, scale, max_norm))


def _update_math(
    upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None, z_prev: torch.Tensor,
    beta: float, alpha: float, activation: str, scale: float, max_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f * dW in a's dtype, ||dW||, f), in float32."""
    e, _, _ = _signal_math(upstream, P, a, z, beta, alpha, activation, scale)
    dw = e.t() @ z_prev.float()
    norm = torch.linalg.vector_norm(dw)
    factor = norm_ball_factor(norm, max_norm)
    return (dw * factor).to(a.dtype), norm, factor


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


@define_op("bpfree::local_signal")
def _local_signal_op(
    upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: Optional[torch.Tensor],
    beta: float, alpha: float, activation: str, scale: float, diagnostics: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(a):
        g = torch.empty_like(a)
        d = torch.empty_like(a) if diagnostics else a.new_empty(0)
        y = torch.empty_like(a) if diagnostics else a.new_empty(0)
        _launch_signal(upstream, P, a, z, g, d if diagnostics else None, y if diagnostics else None,
                       beta=beta, alpha=alpha, activation=activation, scale=scale)
        return g, d, y
    g, proj, y = _signal_math(upstream, P, a, z, beta, alpha, activation, scale)
    if diagnostics:
        return g.to(a.dtype), proj.to(a.dtype), y.to(a.dtype)
    return g.to(a.dtype), a.new_empty(0), a.new_empty(0)


@torch.library.register_fake(_local_signal_op)
def _(upstream, P, a, z, beta, alpha, activation, scale, diagnostics):
    extra = a.shape if diagnostics else (0,)
    return torch.empty_like(a), a.new_empty(extra), a.new_empty(extra)


@define_op("bpfree::local_weight_update")
def _local_weight_update_op(
    upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: Optional[torch.Tensor],
    z_prev: torch.Tensor, beta: float, alpha: float, activation: str, scale: float,
    max_norm: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(a):
        dw = a.new_empty(a.shape[1], z_prev.shape[1])
        norm, factor = _launch_weight_update(upstream, P, a, z, z_prev, dw, beta=beta, alpha=alpha,
                                             activation=activation, scale=scale, max_norm=max_norm)
        return dw, norm, factor
    return _update_math(upstream, P, a, z, z_prev, beta, alpha, activation, scale, max_norm)


@torch.library.register_fake(_local_weight_update_op)
def _(upstream, P, a, z, z_prev, beta, alpha, activation, scale, max_norm):
    scalar = a.new_empty((), dtype=torch.float32)
    return a.new_empty(a.shape[1], z_prev.shape[1]), scalar, torch.empty_like(scalar)


# --------------------------------------------------------------------------------------------------
# Input checks and public API
# --------------------------------------------------------------------------------------------------


def _check_signal_args(
    op: str, kind: str, upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor,
    z: torch.Tensor | None, activation: str, diagnostics: bool = False,
) -> None:
    if kind not in LOCAL_KINDS:
        raise ValueError(f"{op}: unknown kind {kind!r}; expected one of {', '.join(LOCAL_KINDS)}")
    if activation not in LOCAL_ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown activation {activation!r}; expected one of {', '.join(LOCAL_ACTIVATIONS)}")
    check_tensor(op, "upstream", upstream, ndim=2, dtypes=FLOAT_DTYPES)
    device = upstream.device
    check_tensor(op, "P", P, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor(op, "a", a, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    n, c_up = upstream.shape
    if P.shape[0] != c_up:
        raise ValueError(f"{op}: P must be C_up x D with C_up = {c_up} (upstream is {tuple(upstream.shape)}), "
                         f"got {tuple(P.shape)}")
    if tuple(a.shape) != (n, P.shape[1]):
        raise ValueError(f"{op}: a must be N x D = {(n, P.shape[1])} (from upstream and P), got {tuple(a.shape)}")
    if a.numel() == 0 or c_up == 0:
        raise ValueError(f"{op}: empty inputs (N={n}, C_up={c_up}, D={P.shape[1]}); every size must be >= 1")
    if z is not None:
        check_tensor(op, "z", z, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        if z.shape != a.shape:
            raise ValueError(f"{op}: z must have a's shape {tuple(a.shape)}, got {tuple(z.shape)}")
    if not isinstance(diagnostics, bool):
        raise TypeError(f"{op}: diagnostics must be True or False, got {type(diagnostics).__name__} {diagnostics!r}")


def _rule_numbers(op: str, beta: float, alpha: float, scale: float) -> tuple[float, float, float]:
    return check_number(op, "beta", beta), check_number(op, "alpha", alpha), check_number(op, "scale", scale)


def _check_update_args(
    op: str, kind: str, upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor,
    z: torch.Tensor | None, z_prev: torch.Tensor, activation: str, max_norm: float | None,
) -> None:
    _check_signal_args(op, kind, upstream, P, a, z, activation)
    check_tensor(op, "z_prev", z_prev, ndim=2, dtypes=FLOAT_DTYPES, device=a.device)
    if z_prev.shape[0] != a.shape[0] or z_prev.shape[1] == 0:
        raise ValueError(f"{op}: z_prev must be N x D_prev with N = {a.shape[0]} and D_prev >= 1, "
                         f"got {tuple(z_prev.shape)}")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"{op}: max_norm must be > 0 (or None for no projection), got {max_norm}")


def local_signal(
    kind: str, upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None = None,
    *, beta: float = 0.1, alpha: float = 1.0, activation: str = "relu", scale: float = 1.0,
    diagnostics: bool = False,
) -> LRASignal:
    """A unit's LRA error units from the upstream ones, in one fused kernel.

    ``kind`` is one of :data:`LOCAL_KINDS` ("lra"). With ``upstream`` (N x C_up), ``P`` (C_up x D,
    E) and ``a`` (N x D): ``d = scale * (upstream @ P)`` (E's action), ``y = phi(a - beta * d)``
    (target), ``e = alpha * (z - y) + (1 - alpha) * sign(z - y)``; returns ``LRASignal(e, d, y)``
    with ``d`` and ``y`` only when ``diagnostics=True`` (else None; then ``d`` is never written to
    memory). ``z`` is the unit's output; when None it is recomputed as ``phi(a)`` in the kernel.

    ``phi`` is ``activation`` (relu, tanh, sigmoid or identity). Inputs are 2-D, contiguous,
    float32/float16/bfloat16 on one device; math is float32, outputs have ``a``'s dtype.
    Non-differentiable (inputs are detached). Raises ValueError/TypeError on bad arguments.
    """
    op = "local_signal"
    _check_signal_args(op, kind, upstream, P, a, z, activation, diagnostics)
    beta, alpha, scale = _rule_numbers(op, beta, alpha, scale)
    g, d, y = torch.ops.bpfree.local_signal(
        upstream.detach(), P.detach(), a.detach(), None if z is None else z.detach(),
        beta, alpha, activation, scale, diagnostics)
    return LRASignal(g, d, y) if diagnostics else LRASignal(g, None, None)


def local_weight_update(
    kind: str, upstream: torch.Tensor, P: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None,
    z_prev: torch.Tensor, *, beta: float = 0.1, alpha: float = 1.0, activation: str = "relu",
    scale: float = 1.0, max_norm: float | None = None,
) -> WeightUpdate:
    """A dense unit's Hebbian update ``dW = e^T @ z_prev`` (D x D_prev) with the error units made in
    the GEMM prologue.

    ``e`` is ``local_signal(kind, upstream, P, a, z, ...).e``; ``z_prev`` (N x D_prev) is the unit's
    input. Also returns ``norm = ||e^T z_prev||_F`` and, with ``max_norm = c``, applies the norm-ball
    projection ``dW <- f * dW`` with ``f = c / norm`` if ``norm >= c`` else 1 (``f`` is returned):
    a norm pass and a recomputing pass, no host sync. Whether ``e`` is recomputed in the prologue
    or written once is ``fuse_signal_default(C_up, D_prev)``. Results match
    ``local_weight_update_reference``.
    """
    op = "local_weight_update"
    beta, alpha, scale = _rule_numbers(op, beta, alpha, scale)
    max_norm = None if max_norm is None else check_number(op, "max_norm", max_norm)
    _check_update_args(op, kind, upstream, P, a, z, z_prev, activation, max_norm)
    dw, norm, factor = torch.ops.bpfree.local_weight_update(
        upstream.detach(), P.detach(), a.detach(), None if z is None else z.detach(), z_prev.detach(),
        beta, alpha, activation, scale, max_norm)
    return WeightUpdate(dw, norm, factor)
