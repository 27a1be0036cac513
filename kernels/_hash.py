"""One counter-based hash, written twice: for Triton kernels and for PyTorch.

Seeded feedback signs and trace-estimation probes are regenerated from (key, row, col) instead
of being stored. Both implementations compute the same 32-bit value bit for bit, so a kernel and
its PyTorch reference (and CPU and GPU) agree exactly. The mixer is Chris Wellons' "lowbias32".
"""

from __future__ import annotations

import torch

from kernels._dispatch import tl, triton

_MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (host side: deriving keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def stream_key(seed: int, stream: int = 0) -> int:
    """A 32-bit key for one independent stream (e.g. one unit's feedback) of a seed (both Python ints)."""
    for name, value in (("seed", seed), ("stream", stream)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"stream_key: {name} must be an int, got {type(value).__name__} {value!r}")
    return mix32_int(mix32_int(seed ^ _GOLDEN) ^ (stream & _MASK32))


def mix32_torch(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor holding values in [0, 2**32); products fit in int64."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def hash2_torch(key: int | torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """hash(key, row, col) in [0, 2**32) as int64, broadcasting ``rows`` against ``cols`` (``key``
    may be a 0-d int64 tensor, so that ``torch.compile`` does not specialise on it)."""
    return mix32_torch(mix32_torch(rows.to(torch.int64) ^ key) ^ cols.to(torch.int64))


def sign_from_hash_torch(h: torch.Tensor) -> torch.Tensor:
    """+1 / -1 from the top bit of a hash (the best-mixed bit)."""
    return 1 - 2 * ((h >> 31) & 1)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 values (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def hash2(key, rows, cols):
    """hash(key, row, col) as uint32; ``rows`` and ``cols`` are non-negative ints below 2**32."""
    return mix32(mix32(rows.to(tl.uint32) ^ key) ^ cols.to(tl.uint32))
