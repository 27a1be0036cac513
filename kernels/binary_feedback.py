"""Binary-feedback projection: ``g = scale * (e @ S) [* mask]`` with S a fixed ±1 matrix.

This is the signal of Binary DFA (BDFA): unit l gets ``g_l = scale_l * (e · S_l) ⊙ φ'(a_l)``, where
``e`` is the N x C output error and ``S_l ∈ {-1, +1}^{C x D_l}``. S is stored in one of two forms:

* :class:`PackedSigns` -- 1 bit per entry, ``C x ceil(D/32)`` int32 words (32x less than float32);
  bit ``d % 32`` of word ``[c, d // 32]`` is 1 where ``S[c, d] = -1`` and 0 where it is +1.
* :class:`SeededSigns` -- no storage at all: ``S[c, d] = -1`` where the top bit of
  ``hash2(stream_key(seed, stream), c, d)`` (``kernels._hash``) is 1, else +1. The hash is
  evaluated inside the kernel, bit-identically on CPU and GPU.

One Triton kernel computes the projection, the scale and the mask. It tiles the N x D output in
``BLOCK_N x BLOCK_D`` tiles, loops over C in ``BLOCK_C`` chunks (reading each chunk of e once, and
the sign bits or hashes of the same chunk), accumulates ``e_chunk @ S_chunk`` with ``tl.dot`` in
float32, then multiplies by ``scale`` and the mask and writes the tile once, in rows of
contiguous D. Signs are exact in every float format, so the products are exact for float16 and
bfloat16 errors; float32 errors keep near-float32 accuracy (3xTF32, the ``"fp32"`` dot rule of
``kernels._dispatch``).
All offsets are int64, so ``N * D`` may exceed ``2**31``. For small C the kernel is bound by the
bytes of the output (+ mask); for C in the hundreds or more it becomes bound by tensor-core math.

:func:`project_labels` is the one-hot fast path used by target projection (DRTP, tpSGD):
``scale * onehot(labels) @ S``, i.e. a scaled row gather of S. It shares the kernel (no dot).

Dispatch (``kernels._dispatch``): CUDA tensors run Triton; CPU tensors (and every tensor where
Triton cannot be imported) run the PyTorch path below, except under ``TRITON_INTERPRET=1`` where
the Triton kernel runs on CPU. The PyTorch path makes S as float32 ±1 one block of columns at a
time (the words unpacked, or the hash evaluated) and ``addmm``-s each block into its columns of the
output, so it never holds S whole and writes the output once. Its sign makers run eagerly at first
and are fused by ``torch.compile`` once they have taken a few seconds
(``kernels._dispatch.compiled_on_cpu``): then the path costs less than the dense float32 projection
``(e @ B) * scale`` it replaces, while a short run never waits for the compile (2-3 s with
inductor's on-disk cache, 5-10 s without, on 2 CPU cores) and the first call costs milliseconds.
Both ops are registered with ``torch.library`` (namespace ``bpfree``), so
``torch.compile(fullgraph=True)`` treats them as single opaque ops with no graph break.
``binary_feedback_project`` is differentiable: ``d e = scale * (grad * mask) @ S^T`` and
``d mask = grad * scale * (e @ S)``, made in PyTorch a block of S at a time (a signal is usually
made without grad, so the backward has no Triton kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from kernels._dispatch import (
    FLOAT_DTYPES, check_number, check_tensor, compiled_on_cpu, define_op, dot_operands, dot_precision, tile, tl,
    triton, use_triton,
)
from kernels._hash import hash2, hash2_torch, sign_from_hash_torch, stream_key

MAX_CLASSES = 2**31 - 1
"""Largest C. Offsets in the kernel are int64; class and column indices must fit the hash's uint32."""
MAX_DIM = 2**31 - 1
"""Largest D (per-sample numel of a unit's output); N * D may exceed it."""
LABEL_DTYPES = (torch.int32, torch.int64)
"""Dtypes accepted for class labels."""

_BITS = 32
_CHUNK_ELEMENTS = 2**18  # PyTorch path: signs made per block (1 MiB of float32, about an L2)


def _check_shape(op: str, num_classes: int, dim: int) -> None:
    for name, value, top in (("num_classes", num_classes, MAX_CLASSES), ("dim", dim, MAX_DIM)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
        if not 1 <= value <= top:
            raise ValueError(f"{op}: {name} must be in [1, {top}], got {value}")


def _unpack_signs(words: torch.Tensor) -> torch.Tensor:
    """int32 words (R x W) -> float32 ±1 (R x 32 W): bit 1 is -1, bit 0 is +1."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift, then bit 0: exact for bit 31 too
    return (1 - 2 * bits).to(torch.float32).flatten(1)


def _seeded_signs(key: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float32 ±1 ``S[rows, cols]`` of the seeded signs of ``key`` (a 0-d int64 tensor)."""
    return sign_from_hash_torch(hash2_torch(key, rows[:, None], cols[None, :])).to(torch.float32)


# Each makes its block of signs in one fused pass on CPU, 4x (packed) to 20x (seeded) faster than eager.
_unpack_signs_fused = compiled_on_cpu(_unpack_signs)
_seeded_signs_fused = compiled_on_cpu(_seeded_signs)


@dataclass(frozen=True, eq=False)
class PackedSigns:
    """A C x D ±1 matrix stored at 1 bit per entry.

    ``words`` is int32, ``C x ceil(D/32)``, contiguous; bit ``d % 32`` of ``words[c, d // 32]`` is 1
    where the sign is -1. Bits past D in the last word are ignored. Build one with :func:`pack_signs`.
    """

    words: torch.Tensor
    num_classes: int
    dim: int

    def __post_init__(self) -> None:
        op = "PackedSigns"
        _check_shape(op, self.num_classes, self.dim)
        check_tensor(op, "words", self.words, ndim=2, dtypes=(torch.int32,))
        expected = (self.num_classes, math.ceil(self.dim / _BITS))
        if tuple(self.words.shape) != expected:
            raise ValueError(f"{op}: words must have shape {expected} for C={self.num_classes}, "
                             f"D={self.dim}, got {tuple(self.words.shape)}")

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: ``4 * C * ceil(D/32)``."""
        return self.words.numel() * self.words.element_size()

    def to(self, device: Union[torch.device, str]) -> "PackedSigns":
        """The same signs with their words on ``device``."""
        return PackedSigns(self.words.to(device), self.num_classes, self.dim)

    def sign_block(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """float32 ±1 ``S[rows, start:stop]`` on the words' device; ``start`` is a multiple of 32."""
        words = self.words[rows.to(self.words.device), start // _BITS:math.ceil(stop / _BITS)]
        return _unpack_signs_fused(words)[:, :stop - start]

    def sign_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """int8 ±1 rows ``S[rows]`` (len(rows) x D), on the words' device."""
        return self.sign_block(rows, 0, self.dim).to(torch.int8)

    def materialize(self) -> torch.Tensor:
        """The full C x D matrix as int8 ±1, on the words' device."""
        return _materialize(self, self.device)


@dataclass(frozen=True)
class SeededSigns:
    """A C x D ±1 matrix regenerated from a counter-based hash: no storage at all.

    ``S[c, d] = 1 - 2 * (hash2(stream_key(seed, stream), c, d) >> 31)``. The same (seed, stream)
    gives the same signs on every device; ``stream`` separates independent matrices (e.g. one per
    unit) under one seed. ``seed`` and ``stream`` are in ``[0, 2**32)``.
    """

    seed: int
    num_classes: int
    dim: int
    stream: int = 0

    def __post_init__(self) -> None:
        op = "SeededSigns"
        _check_shape(op, self.num_classes, self.dim)
        for name, value in (("seed", self.seed), ("stream", self.stream)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
                raise ValueError(f"{op}: {name} must be an int in [0, 2**32), got {value!r}")

    nbytes = 0
    """Bytes of storage: none."""

    @property
    def key(self) -> int:
        """The 32-bit hash key of this (seed, stream)."""
        return stream_key(self.seed, self.stream)

    def to(self, device: Union[torch.device, str]) -> "SeededSigns":
        """Itself: seeded signs live on no device."""
        return self

    def sign_block(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """float32 ±1 ``S[rows, start:stop]`` on ``rows``' device (the hash fused on CPU)."""
        key = torch.tensor(self.key, dtype=torch.int64, device=rows.device)
        cols = torch.arange(start, stop, device=rows.device)
        return _seeded_signs_fused(key, rows, cols)

    def sign_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """int8 ±1 rows ``S[rows]`` (len(rows) x D), on ``rows``' device."""
        return self.sign_block(rows, 0, self.dim).to(torch.int8)

    def materialize(self, device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
        """The full C x D matrix as int8 ±1 on ``device`` (default CPU)."""
        return _materialize(self, torch.device(device) if device is not None else torch.device("cpu"))


Feedback = Union[PackedSigns, SeededSigns]


def _row_chunk(dim: int) -> int:
    return max(1, _CHUNK_ELEMENTS // dim)


def _materialize(feedback: Feedback, device: torch.device) -> torch.Tensor:
    out = torch.empty((feedback.num_classes, feedback.dim), dtype=torch.int8, device=device)
    step = _row_chunk(feedback.dim)
    for start in range(0, feedback.num_classes, step):
        stop = min(start + step, feedback.num_classes)
        out[start:stop] = feedback.sign_rows(torch.arange(start, stop, device=device))
    return out


def pack_signs(signs: torch.Tensor) -> PackedSigns:
    """Pack a C x D matrix of ±1 (any integer or float dtype) into :class:`PackedSigns`.

    Raises ValueError if any entry is not exactly +1 or -1. The words stay on ``signs``' device.
    """
    op = "pack_signs"
    check_tensor(op, "signs", signs, ndim=2, contiguous=False)
    if signs.dtype == torch.bool or signs.is_complex():
        raise TypeError(f"{op}: signs must be a real integer or float tensor of ±1, got {signs.dtype}")
    num_classes, dim = signs.shape
    _check_shape(op, num_classes, dim)
    if not ((signs == 1) | (signs == -1)).all():
        raise ValueError(f"{op}: every entry of signs must be +1 or -1")
    num_words = math.ceil(dim / _BITS)
    words = torch.empty((num_classes, num_words), dtype=torch.int32, device=signs.device)
    weights = torch.ones((), dtype=torch.int64, device=signs.device) << torch.arange(_BITS, device=signs.device)
    step = _row_chunk(dim)
    for start in range(0, num_classes, step):
        bits = (signs[start:start + step] < 0).to(torch.int64)
        bits = torch.nn.functional.pad(bits, (0, num_words * _BITS - dim)).view(bits.shape[0], num_words, _BITS)
        value = (bits * weights).sum(-1)  # in [0, 2**32)
        words[start:start + step] = (value - ((value >> 31) << 32)).to(torch.int32)
    return PackedSigns(words, num_classes, dim)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _sign_bits(words_ptr, key, rows, cols, valid, num_words, SEEDED: tl.constexpr):
    """0/1 bits of S[rows, cols] as an int32 tile (1 means -1); ``rows``, ``cols`` int64."""
    if SEEDED:
        bits = (hash2(key, rows[:, None], cols[None, :]) >> 31).to(tl.int32)
    else:
        word = tl.load(words_ptr + rows[:, None] * num_words + (cols[None, :] >> 5), mask=valid, other=0)
        bits = (word >> (cols[None, :] & 31).to(tl.int32)) & 1
    return bits


@triton.jit(do_not_specialize=["key"])
def _binary_feedback_kernel(
    e_ptr, labels_ptr, words_ptr, mask_ptr, out_ptr,
    N, C, D, num_words, key, scale,
    SEEDED: tl.constexpr, LABELS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n, d] = scale * sum_c e[n, c] * S[c, d] * mask[n, d]  (LABELS: scale * S[labels[n], d]).

    1-D grid over ``cdiv(N, BLOCK_N) * cdiv(D, BLOCK_D)`` tiles, N-tile index fastest so programs
    running together share the same S columns in L2. All offsets are int64.
    """
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_tiles
    pid_d = pid // num_n_tiles
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    key = key.to(tl.uint32)

    if LABELS:
        rows = tl.load(labels_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
        bits = _sign_bits(words_ptr, key, rows, offs_d, n_ok[:, None] & d_ok[None, :], num_words, SEEDED)
        acc = (1 - 2 * bits).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            c_ok = offs_c < C
            e = tl.load(e_ptr + offs_n[:, None] * C + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            # Rows c >= C meet e == 0, so whatever sign they get adds nothing.
            bits = _sign_bits(words_ptr, key, offs_c, offs_d, c_ok[:, None] & d_ok[None, :], num_words, SEEDED)
            signs = (1 - 2 * bits).to(DOT_DTYPE)
            e = e.to(DOT_DTYPE)
            acc = tl.dot(e, signs, acc, input_precision=DOT_PRECISION)

    acc = acc * scale
    offs_out = offs_n[:, None] * D + offs_d[None, :]
    io_mask = n_ok[:, None] & d_ok[None, :]
    if HAS_MASK:
        acc = acc * tl.load(mask_ptr + offs_out, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_out, acc.to(out_ptr.dtype.element_ty), mask=io_mask)


def _launch(
    e: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    feedback: Feedback,
    mask: Optional[torch.Tensor],
    scale: float,
    out: torch.Tensor,
) -> None:
    """Fill ``out`` (N x D) with the projection of ``e`` (N x C) or the rows of S at ``labels`` (N,)."""
    source = e if e is not None else labels
    n, dim = out.shape
    if n == 0:
        return
    seeded = isinstance(feedback, SeededSigns)
    words = out if seeded else feedback.words  # a placeholder pointer when seeded: never read
    num_warps = 4
    if e is not None:
        block_n, block_c, block_d = tile(n, 16, 64), tile(feedback.num_classes, 16, 32), tile(dim, 16, 128)
        if seeded and n >= 128:  # taller tiles: each hashed sign serves twice the rows; a 128 x 128
            block_n, block_d, num_warps = 128, min(block_d, 64), 8  # tile spilled on sm_90
        dot_dtype = dot_operands(e.dtype)  # the signs are exact in e's dtype
        precision = dot_precision(dot_dtype, "fp32")
    else:
        block_n, block_c, block_d = tile(n, 1, 32), 16, tile(dim, 1, 256)
        dot_dtype, precision = tl.float32, None
    grid = (triton.cdiv(n, block_n) * triton.cdiv(dim, block_d),)
    _binary_feedback_kernel[grid](
        source, source, words, mask if mask is not None else out, out,
        n, feedback.num_classes, dim, math.ceil(dim / _BITS), feedback.key if seeded else 0, float(scale),
        SEEDED=seeded, LABELS=e is None, HAS_MASK=mask is not None, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps,
    )


# --------------------------------------------------------------------------------------------
# PyTorch path (CPU tensors without the interpreter)
# --------------------------------------------------------------------------------------------


def _blocks(num_rows: int, dim: int) -> tuple[int, int]:
    """(rows, columns) of the sign blocks the PyTorch path makes: about ``_CHUNK_ELEMENTS`` signs,
    as many whole rows as fit, columns in whole packed words."""
    num_rows = max(1, num_rows)  # no labels: one empty block
    width = min(dim, max(_BITS, _CHUNK_ELEMENTS // num_rows // _BITS * _BITS))
    return min(num_rows, max(1, _CHUNK_ELEMENTS // width)), width


def _torch_project(e: torch.Tensor, feedback: Feedback, mask: Optional[torch.Tensor], scale: float,
                   out: torch.Tensor) -> None:
    """``out = scale * (e.float() @ S) * mask``, one block of S's columns at a time: each block of
    signs is made once and ``addmm``-ed straight into its columns of ``out`` (or of a float32
    buffer for 16-bit outputs), so the output is written once and S is never held whole."""
    e32 = e.float()
    height, width = _blocks(feedback.num_classes, feedback.dim)
    for start in range(0, feedback.dim, width):
        stop = min(start + width, feedback.dim)
        acc = out[:, start:stop]
        if out.dtype != torch.float32:
            acc = torch.empty(acc.shape, dtype=torch.float32, device=out.device)
        for row in range(0, feedback.num_classes, height):
            rows = torch.arange(row, min(row + height, feedback.num_classes), device=e.device)
            signs = feedback.sign_block(rows, start, stop)
            acc.addmm_(e32[:, row:row + height], signs, beta=1 if row else 0, alpha=scale)
        if mask is not None:
            acc.mul_(mask[:, start:stop])
        if acc.dtype != out.dtype:
            out[:, start:stop] = acc


def _torch_labels(labels: torch.Tensor, feedback: Feedback, scale: float, out: torch.Tensor) -> None:
    """``out = scale * S[labels]``, a block at a time."""
    height, width = _blocks(labels.shape[0], feedback.dim)
    for start in range(0, feedback.dim, width):
        stop = min(start + width, feedback.dim)
        for row in range(0, labels.shape[0], height):
            out[row:row + height, start:stop] = feedback.sign_block(labels[row:row + height], start, stop) * scale


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------


def _feedback_from_args(words: Optional[torch.Tensor], seed: int, stream: int, num_classes: int,
                        dim: int) -> Feedback:
    if words is None:
        return SeededSigns(seed, num_classes, dim, stream)
    return PackedSigns(words, num_classes, dim)


@define_op("bpfree::binary_feedback_project")
def _project_op(e: torch.Tensor, words: Optional[torch.Tensor], mask: Optional[torch.Tensor], seed: int,
                stream: int, num_classes: int, dim: int, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    feedback = _feedback_from_args(words, seed, stream, num_classes, dim)
    out = torch.empty((e.shape[0], dim), dtype=out_dtype, device=e.device)
    if use_triton(e):
        _launch(e, None, feedback, mask, scale, out)
    else:
        _torch_project(e, feedback, mask, scale, out)
    return out


@torch.library.register_fake(_project_op)
def _(e, words, mask, seed, stream, num_classes, dim, scale, out_dtype):
    return e.new_empty((e.shape[0], dim), dtype=out_dtype)


@define_op("bpfree::binary_feedback_project_backward")
def _project_backward_op(grad: torch.Tensor, words: Optional[torch.Tensor], mask: Optional[torch.Tensor], seed: int,
                         stream: int, num_classes: int, dim: int, scale: float,
                         e_dtype: torch.dtype) -> torch.Tensor:
    """The projection's gradient w.r.t. e, ``scale * (grad * mask) @ S^T`` (N x C), in PyTorch on
    every device: a backward pass is rare (the op makes signals), so it has no Triton kernel."""
    feedback = _feedback_from_args(words, seed, stream, num_classes, dim)
    g = grad.float() if mask is None else grad.float() * mask.float()
    out = torch.empty((grad.shape[0], num_classes), dtype=torch.float32, device=grad.device)
    height, width = _blocks(num_classes, dim)
    for start in range(0, dim, width):
        stop = min(start + width, dim)
        for row in range(0, num_classes, height):
            rows = torch.arange(row, min(row + height, num_classes), device=grad.device)
            out[:, row:row + height].addmm_(g[:, start:stop], feedback.sign_block(rows, start, stop).t(),
                                            beta=1 if start else 0, alpha=scale)
    return out.to(e_dtype)


@torch.library.register_fake(_project_backward_op)
def _(grad, words, mask, seed, stream, num_classes, dim, scale, e_dtype):
    return grad.new_empty((grad.shape[0], num_classes), dtype=e_dtype)


def _project_setup_context(ctx, inputs, output) -> None:
    e, words, mask, *args, _ = inputs
    ctx.save_for_backward(e, words, mask)
    ctx.args, ctx.dtypes = args, (e.dtype, None if mask is None else mask.dtype)


def _project_backward(ctx, grad: torch.Tensor) -> tuple:
    """``d e = scale * (grad * mask) @ S^T``; ``d mask = grad * scale * (e @ S)``."""
    e, words, mask = ctx.saved_tensors
    grad_e = grad_mask = None
    if ctx.needs_input_grad[0]:
        grad_e = _project_backward_op(grad.contiguous(), words, mask, *ctx.args, ctx.dtypes[0])
    if ctx.needs_input_grad[2]:
        grad_mask = (grad.float() * _project_op(e, words, None, *ctx.args, torch.float32)).to(ctx.dtypes[1])
    return grad_e, None, grad_mask, None, None, None, None, None, None


torch.library.register_autograd(_project_op, _project_backward, setup_context=_project_setup_context)


@define_op("bpfree::project_labels")
def _labels_op(labels: torch.Tensor, words: Optional[torch.Tensor], seed: int, stream: int, num_classes: int,
               dim: int, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    if labels.numel():
        low, high = torch.aminmax(labels)
        if low < 0 or high >= num_classes:
            raise ValueError(f"project_labels: labels must be in [0, {num_classes}), "
                             f"got values in [{int(low)}, {int(high)}]")
    feedback = _feedback_from_args(words, seed, stream, num_classes, dim)
    out = torch.empty((labels.shape[0], dim), dtype=out_dtype, device=labels.device)
    if use_triton(labels):
        _launch(None, labels, feedback, None, scale, out)
    else:
        _torch_labels(labels, feedback, scale, out)
    return out


@torch.library.register_fake(_labels_op)
def _(labels, words, seed, stream, num_classes, dim, scale, out_dtype):
    return labels.new_empty((labels.shape[0], dim), dtype=out_dtype)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _unpack_feedback(op: str, feedback: Feedback,
                     device: torch.device) -> tuple[Optional[torch.Tensor], int, int]:
    if isinstance(feedback, PackedSigns):
        check_tensor(op, "feedback.words", feedback.words, device=device)
        return feedback.words, 0, 0
    if isinstance(feedback, SeededSigns):
        return None, feedback.seed, feedback.stream
    raise TypeError(f"{op}: feedback must be PackedSigns or SeededSigns, got {type(feedback).__name__}")


def binary_feedback_project(
    e: torch.Tensor,
    feedback: Feedback,
    scale: float = 1.0,
    grad_mask: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``g = scale * (e @ S) * grad_mask`` (mask optional) in one kernel.

    Args:
        e: N x C error, float32/float16/bfloat16, contiguous.
        feedback: the C x D sign matrix S, :class:`PackedSigns` (on e's device) or :class:`SeededSigns`.
        scale: a Python float multiplying the projection.
        grad_mask: optional N x D elementwise factor (e.g. φ'(a)), float32/float16/bfloat16 (any of them,
            independently of e's dtype), contiguous, on e's device. Read once, in float32.
        out_dtype: dtype of g (float32/float16/bfloat16); default e's dtype. Pass the activation dtype
            to write g where it is consumed without another cast.

    Returns:
        g, N x D in ``out_dtype``. Accumulation is in float32, then scale and mask, then one rounding.
    """
    op = "binary_feedback_project"
    check_tensor(op, "e", e, ndim=2, dtypes=FLOAT_DTYPES)
    words, seed, stream = _unpack_feedback(op, feedback, e.device)
    if e.shape[1] != feedback.num_classes:
        raise ValueError(f"{op}: e has {e.shape[1]} columns but feedback has num_classes={feedback.num_classes}")
    if grad_mask is not None:
        check_tensor(op, "grad_mask", grad_mask, ndim=2, dtypes=FLOAT_DTYPES, device=e.device)
        if tuple(grad_mask.shape) != (e.shape[0], feedback.dim):
            raise ValueError(f"{op}: grad_mask must have shape {(e.shape[0], feedback.dim)} (N x D), "
                             f"got {tuple(grad_mask.shape)}")
    out_dtype = e.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of float32, float16, bfloat16, got {out_dtype}")
    return _project_op(e, words, grad_mask, seed, stream, feedback.num_classes, feedback.dim,
                       check_number(op, "scale", scale), out_dtype)


def project_labels(
    labels: torch.Tensor,
    feedback: Feedback,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``t = scale * onehot(labels) @ S = scale * S[labels]``: the projected targets of DRTP/tpSGD.

    Args:
        labels: N class indices in ``[0, C)``, int32/int64, contiguous (checked; on CUDA the range
            check synchronises once).
        feedback: the C x D sign matrix S, :class:`PackedSigns` (on labels' device) or :class:`SeededSigns`.
        scale: a Python float multiplying the rows.
        dtype: dtype of t (float32/float16/bfloat16).

    Returns:
        t, N x D in ``dtype``; equal to ``binary_feedback_project(onehot(labels), feedback, scale)``.
    """
    op = "project_labels"
    check_tensor(op, "labels", labels, ndim=1, dtypes=LABEL_DTYPES)
    words, seed, stream = _unpack_feedback(op, feedback, labels.device)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be one of float32, float16, bfloat16, got {dtype}")
    return _labels_op(labels, words, seed, stream, feedback.num_classes, feedback.dim,
                      check_number(op, "scale", scale), dtype)
