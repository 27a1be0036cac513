"""Probe matrices for randomized trace estimation, regenerated from a seed instead of stored.

Each entry of ``Z`` (positions x r) is a pure function of (seed, position, column) through
``kernels._hash``, so that the Triton kernels of :mod:`kernels.trace_conv` generate Z in registers
(Z is never stored) and the PyTorch reference builds the same Z:

* ``gaussian``: Box-Muller from two independent hashes, ``E[Z Z^T] = r I``;
* ``rademacher``: the top bit of one hash as a sign, ``E[Z Z^T] = r I``;
* ``orthogonal``: every position p goes to one random column b(p) (a hash mod r) with a random sign
  s(p) and magnitude sqrt(r): ``Z[p, j] = sqrt(r) s(p) [b(p) = j]``. The columns have disjoint
  supports, so they are exactly orthogonal, each with squared norm r * |{p : b(p) = j}| ~= P;
  ``(Z Z^T)[p, p] = r`` exactly and off-diagonal entries have mean 0, so ``E[Z Z^T] = r I``. Its
  trace-estimation variance equals Rademacher's, while each row has a single nonzero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._dispatch import tl, triton
from kernels._hash import hash2, hash2_torch, stream_key

__all__ = ["PROBES", "probe_matrix"]

PROBES: tuple[str, ...] = ("gaussian", "rademacher", "orthogonal")
PROBE_CODE = {name: code for code, name in enumerate(PROBES)}
"""The ``PROBE`` constexpr of the kernels for each probe name."""
_TWO_POW_M24 = 2.0**-24  # spacing of the 24-bit uniforms drawn from the top bits of a hash


def probe_keys(seed: int) -> tuple[int, int]:
    """Two independent 32-bit hash keys (streams 0 and 1) of a probe seed."""
    return stream_key(seed, 0), stream_key(seed, 1)


def check_seed(op: str, seed: int) -> None:
    """Raise a TypeError naming ``op`` unless ``seed`` is a Python int (any int: it is hashed)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int, got {type(seed).__name__} {seed!r}")


MAX_INDEX = 2**31 - 1
"""The most probes (columns of Z) or positions (rows): the kernels take both as 32-bit ints, and the
hash that draws Z's entries is defined for indices below 2**32."""


def check_probe_args(op: str, probes: int, probe: str) -> None:
    """Raise a ValueError naming ``op`` unless ``probes`` is an int in [1, MAX_INDEX] and ``probe`` a
    known kind."""
    if isinstance(probes, bool) or not isinstance(probes, int) or not 1 <= probes <= MAX_INDEX:
        raise ValueError(f"{op}: probes must be a positive int, at most 2**31 - 1 (16 to 64 are usual), got {probes!r}")
    if not isinstance(probe, str) or probe not in PROBE_CODE:
        raise ValueError(f"{op}: probe must be one of {', '.join(PROBES)}; got {probe!r}")


def probe_matrix(
    seed: int, positions: int, probes: int, probe: str, device: torch.device | str | None = None
) -> Tensor:
    """The probe matrix Z (positions x probes, float32) of ``seed``, with ``E[Z Z^T] = probes * I``.

    This is the PyTorch reference; the Triton kernels compute the same entries in registers.
    Entry (p, j) depends only on (seed, p, j): rademacher and orthogonal entries are bit-identical
    to the kernels', gaussian ones agree to float32 rounding of log/cos/sqrt.
    """
    op = "probe_matrix"
    check_seed(op, seed)
    if isinstance(positions, bool) or not isinstance(positions, int) or not 0 <= positions <= MAX_INDEX:
        raise ValueError(f"{op}: positions must be an int >= 0, at most 2**31 - 1 (the rows of Z: H * W of the "
                         f"conv input), got {positions!r}")
    check_probe_args(op, probes, probe)
    key1, key2 = probe_keys(seed)
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
def probe_tile(key1, key2, pos, col, valid, r, scale, PROBE: tl.constexpr):
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
