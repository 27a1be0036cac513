"""Compile every Triton kernel for an NVIDIA GPU on a machine without one, and report its resources.

The test suite checks the kernels' math under Triton's CPU interpreter, which never lowers them:
errors only the compiler finds (a ``tl.dot`` tile under 16, a dtype the target's MMA cannot take,
a tile needing more shared memory than an SM has) would first show on a GPU. Here Triton's driver
is replaced by one that reports a CUDA target (default sm_90: H100/H200), the public ops run their
Triton launchers on small CPU tensors, and every launch becomes a compile-only warm-up, through
Triton's whole pipeline down to ``ptxas``. For each kernel variant (one per set of constexprs the
launchers pick) it prints the shared memory, and the registers and spill stores from the ``ptxas -v``
log of Triton's own compile (its flags, its binary).

Exits non-zero when a variant fails to compile or needs more shared memory than the target has.
Run it without ``TRITON_INTERPRET``; nothing is launched and no GPU is needed.

    python -m benchmarks.compile_kernels [--arch 90] [--out bench_out/compile_kernels.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles the kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

if not __package__:  # run as a file (python benchmarks/compile_kernels.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels.binary_feedback as binary_feedback  # noqa: E402
import kernels.local_alignment as local_alignment  # noqa: E402
import kernels.trace_conv as trace_conv  # noqa: E402
from kernels.conv_geometry import ConvGeometry  # noqa: E402

# Shared memory an sm_XX block may use (bytes), from the CUDA programming guide's table.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class Variant:
    case: str
    kernel: str
    constexprs: str
    num_warps: int
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores per thread


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports a target, owns no device."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def _ptxas_resources(log: str) -> tuple[int, int]:
    """(registers, spill-store bytes per thread) from the ``ptxas -v`` log of Triton's own compile."""
    registers, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    if registers is None or spills is None:
        raise RuntimeError(f"no register or spill figures in the ptxas log:\n{log}")
    return int(registers.group(1)), int(spills.group(1))


def _cases() -> dict[str, Callable[[], object]]:
    """One call per launcher variant: the dtypes, epilogues and tile choices the ops can pick."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    packed = binary_feedback.pack_signs(torch.where(randn(10, 301) > 0, 1, -1).to(torch.int8))
    seeded = binary_feedback.SeededSigns(seed=3, num_classes=10, dim=301)
    bf16, f16 = torch.bfloat16, torch.float16
    la = local_alignment
    n, c, d, dp = 37, 10, 77, 45
    x = randn(5, 3, 9, 11)

    def weight_grad(stride: int, probe: str, probes: int, dtype: torch.dtype) -> torch.Tensor:
        geometry = ConvGeometry((9, 11), (3, 3), (stride, stride), (1, 1))
        xbar = trace_conv.trace_compress_torch(x, 1, probes, probe)
        return trace_conv.trace_weight_grad_triton(randn(5, 4, *geometry.output_hw(), dtype=dtype), xbar, 1, geometry,
                                                   probe)

    def tf32(backend: object, allowed: bool, call: Callable[[], object]) -> Callable[[], object]:
        """``call`` with ``backend.allow_tf32`` (torch's matmul or cudnn switch) set to ``allowed``:
        the fp32 dots that follow it then use PREC=tf32 or PREC=ieee (kernels._dispatch)."""
        def run() -> object:
            previous = backend.allow_tf32
            backend.allow_tf32 = allowed
            try:
                return call()
            finally:
                backend.allow_tf32 = previous
        return run

    def with_tf32(call: Callable[[], object]) -> Callable[[], object]:
        return tf32(torch.backends.cuda.matmul, True, call)

    def without_conv_tf32(call: Callable[[], object]) -> Callable[[], object]:
        return tf32(torch.backends.cudnn, False, call)

    return {
        "project fp32, packed": lambda: binary_feedback.binary_feedback_project(randn(37, 10), packed),
        "project bf16, seeded, fp16 mask, N>=128": lambda: binary_feedback.binary_feedback_project(
            randn(150, 10, dtype=bf16), seeded, grad_mask=randn(150, 301, dtype=f16)),
        "project fp16, packed, fp32 mask": lambda: binary_feedback.binary_feedback_project(
            randn(37, 10, dtype=f16), packed, grad_mask=randn(37, 301)),
        "labels, packed": lambda: binary_feedback.project_labels(torch.arange(37) % 10, packed),
        "labels, seeded, bf16": lambda: binary_feedback.project_labels(torch.arange(37) % 10, seeded, dtype=bf16),
        "signal lra tanh": lambda: la.local_signal("lra", randn(n, c), randn(c, d), randn(n, d), activation="tanh"),
        "signal lra relu bf16": lambda: la.local_signal(
            "lra", randn(n, c, dtype=bf16), randn(c, d, dtype=bf16), randn(n, d, dtype=bf16)),
        "signal lra sigmoid, z, diagnostics": lambda: la.local_signal(
            "lra", randn(n, 90), randn(90, d), randn(n, d), randn(n, d), alpha=0.5, activation="sigmoid",
            diagnostics=True),
        "signal lra identity fp16": lambda: la.local_signal(
            "lra", randn(n, 90, dtype=f16), randn(90, d, dtype=f16), randn(n, d, dtype=f16), activation="identity"),
        "signal lra relu, TF32": with_tf32(lambda: la.local_signal("lra", randn(n, 90), randn(90, d), randn(n, d))),
        "update lra, fused signal, TF32": with_tf32(lambda: la.local_weight_update(
            "lra", randn(n, c), randn(c, d), randn(n, d), None, randn(n, dp))),
        "update lra, fused signal, norm-ball": lambda: la.local_weight_update(
            "lra", randn(n, c), randn(c, d), randn(n, d), None, randn(n, dp), max_norm=1.0),
        "update lra bf16, unfused signal (C_up, D_prev > 64), z": lambda: la.local_weight_update(
            "lra", randn(n, 90, dtype=bf16), randn(90, d, dtype=bf16), randn(n, d, dtype=bf16),
            randn(n, d, dtype=bf16), randn(n, 130, dtype=bf16)),
        **{f"trace compress {probe}, r={r}": (lambda probe=probe, r=r: trace_conv.trace_compress_triton(x, 1, r, probe))
           for probe, r in (("gaussian", 4), ("rademacher", 16), ("orthogonal", 64))},
        "trace compress bf16": lambda: trace_conv.trace_compress_triton(x.to(bf16), 1, 8, "rademacher"),
        "trace weight grad stride 1": lambda: weight_grad(1, "rademacher", 16, torch.float32),
        "trace weight grad stride 2, bf16": lambda: weight_grad(2, "gaussian", 4, bf16),
        "trace weight grad orthogonal": lambda: weight_grad(1, "orthogonal", 64, torch.float32),
        "trace compress orthogonal, r=64, IEEE": without_conv_tf32(
            lambda: trace_conv.trace_compress_triton(x, 1, 64, "orthogonal")),
        "trace weight grad orthogonal, IEEE": without_conv_tf32(lambda: weight_grad(1, "orthogonal", 64, torch.float32)),
        "trace weight grad gaussian, IEEE": without_conv_tf32(lambda: weight_grad(2, "gaussian", 16, torch.float32)),
    }


def compile_all(arch: int) -> list[Variant]:
    """Compile every case's kernels for ``sm_<arch>``; raises on the first compile error.

    Replaces Triton's driver and ``JITFunction.run`` for the rest of the process: a script's job.
    """
    variants: list[Variant] = []
    current_case = [""]
    launch = JITFunction.run

    resources: dict[int, tuple[int, int]] = {}  # per compiled kernel: a repeated variant is not recompiled

    def compile_only(self: JITFunction, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints ptxas' log of each compile here
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if id(kernel) not in resources:
            resources[id(kernel)] = _ptxas_resources(log.getvalue())
        registers, spills = resources[id(kernel)]
        constexprs = ", ".join(f"{self.arg_names[i]}={v}" for (i,), v in kernel.src.constants.items()
                               if self.arg_names[i].isupper())
        variants.append(Variant(current_case[0], self.fn.__name__, constexprs, kernel.metadata.num_warps,
                                kernel.metadata.shared, registers, spills))
        return kernel

    for module in (binary_feedback, local_alignment):
        module.use_triton = lambda tensor: True
    knobs.nvidia.dump_ptxas_log = True  # ptxas runs with -v; print its log
    knobs.compilation.always_compile = True  # even for kernels in Triton's on-disk cache
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = compile_only
    for name, call in _cases().items():
        current_case[0] = name
        call()
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    limit = SHARED_MEMORY_LIMIT.get(args.arch)
    variants = compile_all(args.arch)

    table = Table(title=f"Triton kernels compiled for sm_{args.arch} (triton {triton.__version__})")
    for column in ("case", "kernel", "constexprs", "warps", "shared KiB", "registers", "spill bytes"):
        table.add_column(column, justify="right" if column in ("warps", "shared KiB", "registers", "spill bytes")
                         else "left")
    for v in variants:
        table.add_row(v.case, v.kernel, v.constexprs, str(v.num_warps), f"{v.shared_bytes / 1024:.1f}",
                      str(v.registers), str(v.spill_bytes))
    Console(width=200).print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__,
                                        "variants": [asdict(v) for v in variants]}, indent=1))
    too_big = [v for v in variants if limit is not None and v.shared_bytes > limit]
    for v in too_big:
        print(f"{v.case}: {v.kernel} needs {v.shared_bytes} B of shared memory; sm_{args.arch} has {limit}")
    sys.exit(1 if too_big else 0)


if __name__ == "__main__":
    main()
