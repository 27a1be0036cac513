"""Shared plumbing for the ops in this package: when to launch Triton, and input checks.

CUDA tensors always run the Triton kernels. CPU tensors run the PyTorch path, except when
``TRITON_INTERPRET=1`` is set (before Triton is first imported): then the Triton kernels run
under Triton's interpreter, which is how the test suite checks them on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch


def triton_interpreting() -> bool:
    """True when Triton kernels execute under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op given ``tensor`` should launch its Triton kernel rather than the PyTorch path."""
    return tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreting())


def check_tensor(
    op: str,
    name: str,
    tensor: torch.Tensor,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> None:
    """Raise a ValueError/TypeError naming the op, the argument and the fix when ``tensor`` is unfit."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; allowed: {allowed}")
    if device is not None and tensor.device != device:
        raise ValueError(
            f"{op}: {name} is on {tensor.device} but the other inputs are on {device}; "
            f"move it with .to({str(device)!r})"
        )
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() on it first")
