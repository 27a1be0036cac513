"""The dispatch policy every op in this package follows, stated once here, and its input checks.

Where. CUDA tensors always run the Triton kernels. CPU tensors run the PyTorch path, except when
``TRITON_INTERPRET=1`` is set (before Triton is first imported): then the Triton kernels run
under Triton's interpreter, which is how the test suite checks them on a machine without a GPU.

Without Triton. Triton is installed on Linux only (pyproject.toml), so it is imported guarded:
where it cannot be imported (macOS, Windows) the package still imports and every op runs its
PyTorch path, CUDA tensors included (the same results, without the fused kernels); the first op
to run logs one line saying so. The Triton kernels are then stand-ins that refuse to launch
(:func:`require_triton`).

CPU paths may fuse their elementwise work with ``torch.compile`` (:func:`compiled_on_cpu`): only once
they have run :data:`COMPILE_AFTER_S` seconds eagerly, so that a short run never waits for a
compile; it falls back to eager PyTorch, with one warning, wherever compiling is unavailable or fails.

Tiles. Each tile side is ``tile(n, lo, hi)``: the next power of two of the dimension ``n`` it
covers, clamped to ``[lo, hi]`` (``lo`` = 16 where the side feeds ``tl.dot``; ``hi`` is the kernel's
register budget; sizes chosen against spills are commented at the call and checked by
``benchmarks/compile_kernels.py``).

Dot products. Operands go to ``tl.dot`` in their common 16-bit dtype when they share one (exact
products, float32 accumulation), else in float32 (:func:`dot_operands`); under the interpreter
bfloat16 operands are upcast to float32 first, because Triton's interpreter multiplies bfloat16 dot
operands as raw uint16. Float32 operands use the precision of the PyTorch op the kernel stands in
for (:func:`dot_precision`): ``"tf32"`` where torch allows TF32 for it, else ``"ieee"`` -- matmul
kernels follow ``torch.backends.cuda.matmul.allow_tf32``, convolution kernels
``torch.backends.cudnn.allow_tf32`` -- except kernels whose products must stay near float32
whatever torch allows (``"fp32"``: 3xTF32). On ROCm float32 dots are always ``"ieee"`` (Triton's
AMD backend has no 3xTF32, and TF32 only on gfx942).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from typing import Callable, Literal, TypeVar

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pyproject.toml installs triton on Linux only
    triton = tl = None  # triton becomes a _MissingTriton below
    TRITON_MISSING: str | None = f"{type(error).__name__}: {error}"
else:
    TRITON_MISSING = None
"""Why Triton cannot be imported, or None where it can."""

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
"""Floating dtypes the ops accept: float32, float16, bfloat16."""
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
COMPILE_AFTER_S = 3.0
"""Eager seconds a :func:`compiled_on_cpu` function runs before it is compiled: compiling costs
2-20 s (inductor's cache warm or cold, 2 CPU cores), so only a function that has cost about that
much already is compiled; afterwards it runs 5-20x faster."""

_Fn = TypeVar("_Fn", bound=Callable[..., torch.Tensor])

DotRule = Literal["matmul", "conv", "fp32"]
"""Which precision a kernel's float32 dots take: like torch's matmuls, like its convolutions, or near fp32."""

logger = logging.getLogger("kernels")


def triton_interpreting() -> bool:
    """True when Triton kernels execute under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return TRITON_MISSING is None and os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _notice_reference_paths() -> None:
    """Say once per process that the ops run their PyTorch paths because Triton is missing."""
    logger.warning("kernels: Triton cannot be imported (%s), so every op runs its PyTorch reference path "
                   "(CUDA tensors too): same results, without the fused kernels", TRITON_MISSING)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op given ``tensor`` should launch its Triton kernel rather than the PyTorch path
    (never without Triton; the first such call logs why)."""
    if TRITON_MISSING is not None:
        _notice_reference_paths()
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreting())


def _triton_missing(op: str) -> RuntimeError:
    return RuntimeError(f"{op} runs a Triton kernel, but Triton cannot be imported ({TRITON_MISSING}); "
                        "install triton (Linux only), or call the op's PyTorch path")


def require_triton(op: str) -> None:
    """Raise a RuntimeError naming ``op`` where Triton cannot be imported."""
    if TRITON_MISSING is not None:
        raise _triton_missing(op)


class _MissingKernel:
    """A Triton kernel's stand-in where Triton cannot be imported: launching it raises."""

    def __init__(self, fn: Callable) -> None:
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid: object) -> Callable:
        raise _triton_missing(self.__name__)


class _MissingTriton:
    """Stands in for the ``triton`` module where it cannot be imported: ``@triton.jit`` makes
    :class:`_MissingKernel` stand-ins, so the kernel modules import unchanged."""

    @staticmethod
    def jit(fn: Callable | None = None, **options: object) -> Callable:
        return _MissingKernel if fn is None else _MissingKernel(fn)


if triton is None:
    triton = _MissingTriton()


@functools.cache
def _quiet_cuda_probe() -> None:
    """Inductor's C++ backend imports ``torch.utils.cpp_extension``, which logs "No CUDA runtime is
    found" on a machine with a CUDA toolkit but no GPU: noise for a CPU compile, so that record is dropped."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.msg).startswith("No CUDA runtime is found"))


def compiled_on_cpu(fn: _Fn) -> _Fn:
    """``fn``, compiled by ``torch.compile`` (one fused C++ loop from inductor) once its calls with
    CPU tensors have taken :data:`COMPILE_AFTER_S` seconds eagerly; ``fn`` itself for other devices,
    under a TorchDispatchMode (dynamo skips the frame) and from the first failure to compile on (no
    C++ compiler, no dynamo), after a warning. Both give the same results; ``dynamic=True`` keeps it
    to one graph for all shapes."""
    compiled: list[Callable[..., torch.Tensor]] = []  # [the compiled fn] once made, [fn] after a failure
    eager_s = 0.0

    @functools.wraps(fn)
    def run(*args: torch.Tensor) -> torch.Tensor:
        nonlocal eager_s
        if (compiled and compiled[0] is fn) or any(a.device.type != "cpu" for a in args):
            return fn(*args)
        if not compiled and eager_s < COMPILE_AFTER_S:
            start = time.perf_counter()
            out = fn(*args)
            eager_s += time.perf_counter() - start
            return out
        try:
            if not compiled:
                _quiet_cuda_probe()
                compiled.append(torch.compile(fn, dynamic=True))
            return compiled[0](*args)
        except Exception as error:  # noqa: BLE001 -- whatever failed to compile, eager is correct
            compiled[:] = [fn]
            warnings.warn(f"{fn.__name__} runs eagerly: torch.compile failed ({type(error).__name__}: {error})",
                          RuntimeWarning, stacklevel=2)
            return fn(*args)

    return run  # type: ignore[return-value]


def define_op(qualname: str) -> Callable[[Callable[..., object]], torch._ops.OpOverload]:
    """Register the decorated function as the op ``qualname`` (a ``torch.library`` op: opaque to
    ``torch.compile``; its schema inferred from the type hints; it mutates nothing) and return its
    OpOverload, for ``torch.library.register_fake`` / ``register_autograd``. Like
    ``torch.library.custom_op``, without the import of ``torch._dynamo`` that custom_op's kernels
    make at their first call (1-2 s on 2 CPU cores): an op's first eager call stays cheap."""

    def register(fn: Callable[..., object]) -> torch._ops.OpOverload:
        torch.library.define(qualname, torch.library.infer_schema(fn, mutates_args=()))
        torch.library.impl(qualname, "CompositeExplicitAutograd", fn)
        namespace, name = qualname.split("::")
        return getattr(getattr(torch.ops, namespace), name).default

    return register


def tile(n: int, lo: int, hi: int) -> int:
    """The tile side for a dimension of size ``n``: its next power of two, clamped to ``[lo, hi]``."""
    return min(hi, max(lo, 1 << max(0, n - 1).bit_length()))


def dot_operands(*dtypes: torch.dtype) -> tl.dtype:
    """The dtype ``tl.dot`` takes for operands loaded as ``dtypes``: their common 16-bit dtype, else
    float32; bfloat16 is float32 under the interpreter (which gets bfloat16 dots wrong)."""
    common = dtypes[0] if dtypes[0] in HALF_DTYPES and all(d == dtypes[0] for d in dtypes) else torch.float32
    if common == torch.bfloat16 and triton_interpreting():
        common = torch.float32
    return getattr(tl, str(common).removeprefix("torch."))


def dot_precision(operands: tl.dtype, rule: DotRule) -> str | None:
    """``input_precision`` for a ``tl.dot`` of ``operands`` under ``rule`` (module docstring);
    None (Triton's default) for 16-bit operands, whose products are exact anyway."""
    if operands != tl.float32:
        return None
    if torch.version.hip:
        return "ieee"
    if rule == "fp32":
        return "tf32x3"
    allowed = torch.backends.cuda.matmul.allow_tf32 if rule == "matmul" else torch.backends.cudnn.allow_tf32
    return "tf32" if allowed else "ieee"


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
    if tensor.is_meta:
        raise ValueError(f"{op}: {name} is on the meta device (a shape without values); create it on cpu or cuda")
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


def check_number(op: str, name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float: a Python int or float (not a bool, not a string), finite, and > 0
    when ``positive``; otherwise a TypeError/ValueError naming the op and the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value!r}")
    return float(value)
