"""Benchmark trace-estimated convolutions (kernels/trace_conv.py) against exact backprop.

Three tables:

1. Activation memory of a whole training step, exact BP vs ``convert_to_trace_conv`` at several r:
   resnet18 with a CIFAR stem (conv1 3x3 stride 1, maxpool = Identity; 32x32) and resnet50 (224x224).
   "Saved" is the bytes of the distinct storages that autograd saves for backward (found with
   ``torch.autograd.graph.saved_tensors_hooks``; parameters and buffers excluded), attributed to the
   first module that saves each storage -- the activation memory a step holds at the end of forward.
   That count is exact and device-independent, so by default it runs on the meta device at the full
   batch sizes (no compute). With ``--memory-device cuda`` it also reports the measured peak
   (``torch.cuda.max_memory_allocated`` over forward+backward, minus what was allocated before).
   Rows: exact (also with fp16-saving BatchNorms, the fair baseline for the last column); trace as the
   converter does by default (convs + MaskReLU + fp16-saving BatchNorm) at each r; at r = 16 also
   trace with fp32 BatchNorm inputs, and trace of the convs alone.
2. Step time (forward + backward) of resnet18-cifar, exact vs trace at each r, on ``--device``.
3. Relative error ||g_est - g|| / ||g|| and cosine of the weight gradient of a few layers against
   the exact gradient, as r grows, for each probe kind (mean over ``--error-seeds`` draws).

    python -m benchmarks.bench_trace_conv [--device cpu|cuda] [--memory-device meta|cpu|cuda]
        [--r 4 16 64] [--cifar-batch 256] [--imagenet-batch 64] [--time-batch N] [--steps N]
        [--error-batch N] [--error-seeds N] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from torch import nn

if not __package__:  # run as a file (python benchmarks/bench_trace_conv.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (
    PeakMemory,
    cifar_batch,
    environment,
    make_console,
    table,
    time_interleaved,
    write_results,
)
from kernels._dispatch import use_triton
from kernels import PROBES, MaskReLU, TraceConv2d, convert_batch_norms, convert_to_trace_conv

ERROR_LAYERS = ("layer1.0.conv1", "layer2.0.conv2", "layer3.0.downsample.0", "layer4.1.conv2")
CATEGORIES = ("conv input", "trace Xbar", "batchnorm", "relu", "pool", "other")


def resnet18_cifar() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet50_imagenet() -> nn.Module:
    return torchvision.models.resnet50(num_classes=1000)


# variant -> how the model is converted, given r
VARIANTS: dict[str, Callable[[nn.Module, int], object]] = {
    "exact": lambda model, r: model,
    "exact, fp16 BN": lambda model, r: convert_batch_norms(model),
    "trace": lambda model, r: convert_to_trace_conv(model, probes=r),  # the converter's and the rule's default
    "trace, fp32 BN": lambda model, r: convert_to_trace_conv(model, probes=r, compact_bn=False),
    "trace convs only": lambda model, r: convert_to_trace_conv(model, probes=r, mask_relu=False, compact_bn=False),
}


def build(make: Callable[[], nn.Module], variant: str, probes: int, device: torch.device) -> nn.Module:
    """The model converted as ``VARIANTS[variant]`` says, in train mode."""
    torch.manual_seed(0)
    model = make().to(device).train()
    VARIANTS[variant](model, probes)
    return model


def _category(module: nn.Module) -> str:
    if isinstance(module, TraceConv2d):
        return "trace Xbar"
    if isinstance(module, nn.Conv2d):
        return "conv input"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(module, (nn.ReLU, MaskReLU)):
        return "relu"
    if isinstance(module, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        return "pool"
    return "other"


def saved_bytes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes of distinct saved storages after forward, by the category of the first module saving each."""
    skip = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    by_storage: dict[int, tuple[str, int]] = {}
    stack: list[str] = []
    hooks = []
    for module in model.modules():
        if not list(module.children()):
            cat = _category(module)
            hooks.append(module.register_forward_pre_hook(lambda *_, c=cat: stack.append(c) and None))
            hooks.append(module.register_forward_hook(lambda *_: stack.pop() and None))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip and storage._cdata not in by_storage:
            by_storage[storage._cdata] = (stack[-1] if stack else "other", storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    for hook in hooks:
        hook.remove()
    del out
    totals = dict.fromkeys(CATEGORIES, 0)
    for cat, nbytes in by_storage.values():
        totals[cat] += nbytes
    return totals


def cuda_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak memory allocated during forward+backward above what was allocated before it."""
    model.zero_grad(set_to_none=True)
    with PeakMemory(x.device) as peak:
        model(x).float().logsumexp(1).mean().backward()
    return peak.bytes


def memory_table(args: argparse.Namespace, console: Console) -> list[dict]:
    device = torch.device(args.memory_device)
    rows = []
    specs = [("resnet18-cifar", resnet18_cifar, (args.cifar_batch, 3, 32, 32)),
             ("resnet50-imagenet", resnet50_imagenet, (args.imagenet_batch, 3, args.imagenet_size, args.imagenet_size))]  # fmt: skip
    variants = [("exact", 0), ("exact, fp16 BN", 0)] + [("trace", r) for r in args.r]
    variants += [(v, r) for v in ("trace, fp32 BN", "trace convs only") for r in args.r if r == 16]
    columns = ["model", "batch", "variant", "r", *CATEGORIES, "total", "vs exact", "vs exact fp16 BN"]
    if device.type == "cuda":
        columns += ["peak fwd+bwd", "peak vs exact"]
    result = table(f"Saved activations per training step (MiB; storages deduplicated; device {device})",
                   columns, left={"variant"})
    captions = []
    for name, make, shape in specs:
        measured = []  # (variant, r, bytes by category, total, CUDA peak or None)
        for variant, probes in variants:
            model = build(make, variant, probes, device)
            x = torch.randn(shape, device=device) if device.type != "meta" else torch.empty(shape, device=device)
            parts = saved_bytes(model, x)
            peak = cuda_peak_bytes(model, x) if device.type == "cuda" else None
            measured.append((variant, probes, parts, sum(parts.values()), peak))
            del model, x
        baseline = {variant: (total, peak) for variant, probes, _, total, peak in measured if probes == 0}
        (exact, exact_peak), (fair, _) = baseline["exact"], baseline["exact, fp16 BN"]
        for variant, probes, parts, total, peak in measured:
            row = {"model": name, "batch": shape[0], "variant": variant, "r": probes or None, "saved_bytes": parts,
                   "total_bytes": total, "ratio_vs_exact": exact / total, "ratio_vs_exact_fp16_bn": fair / total}  # fmt: skip
            cells = [name, str(shape[0]), variant, str(probes or "-"),
                     *(f"{parts[c] / 2**20:.0f}" for c in CATEGORIES), f"{total / 2**20:.0f}",
                     f"{exact / total:.2f}x", f"{fair / total:.2f}x"]  # fmt: skip
            if peak is not None:
                row.update(peak_bytes=peak, peak_ratio_vs_exact=exact_peak / peak)
                cells += [f"{peak / 2**20:.0f}", f"{exact_peak / peak:.2f}x"]
            rows.append(row)
            result.add_row(*cells)
            if variant == "trace, fp32 BN":
                floor = total - parts["trace Xbar"] - parts["relu"]
                captions.append(f"{name}: with fp32 BatchNorm inputs, the rest without Xbar and ReLU masks is "
                                f"{floor / 2**20:.0f} MiB, so no r saves more than {exact / floor:.2f}x")  # fmt: skip
        result.add_section()
    result.caption = "\n".join(captions)
    console.print(result)
    return rows


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return step


def time_table(args: argparse.Namespace, console: Console) -> list[dict]:
    device = torch.device(args.device)
    x, y = cifar_batch(args.time_batch, device)
    path = "Triton" if use_triton(x) else "PyTorch"
    variants = [("exact", 0)] + [("trace", r) for r in args.r]
    steps = {(variant, probes): _step(build(resnet18_cifar, variant, probes, device), x, y)
             for variant, probes in variants}
    # one warm-up round (Triton compilation, allocator), then all variants in interleaved rounds
    times = time_interleaved(steps, device, warmup=1, repeats=args.steps)
    result = table(f"resnet18-cifar step time (fwd+bwd, batch {args.time_batch}, {device}, "
                   f"{path} path, median of {args.steps} interleaved)", ["variant", "r", "ms/step", "overhead vs exact"])
    rows = []
    exact_ms = times[("exact", 0)].median_ms
    for (variant, probes), timing in times.items():
        ms = timing.median_ms
        rows.append({"variant": variant, "r": probes or None, "ms_per_step": ms, "spread": timing.spread,
                     "overhead": ms / exact_ms - 1, "path": path, "batch": args.time_batch})  # fmt: skip
        result.add_row(variant, str(probes or "-"), f"{ms:.1f}", f"{100 * (ms / exact_ms - 1):+.0f}%")
    console.print(result)
    return rows


def error_table(args: argparse.Namespace, console: Console) -> list[dict]:
    device = torch.device(args.device)
    x, y = cifar_batch(args.error_batch, device)
    exact = build(resnet18_cifar, "exact", 0, device)
    F.cross_entropy(exact(x), y).backward()
    reference = {name: exact.get_submodule(name).weight.grad.clone() for name in ERROR_LAYERS}
    result = table(f"Weight-gradient error vs exact, resnet18-cifar, batch {args.error_batch} "
                   f"(mean over {args.error_seeds} draws; rel. error / cosine)", ["probe", "r", *ERROR_LAYERS])
    rows = []
    for probe in PROBES:
        for probes in args.r:
            model = copy.deepcopy(exact)
            convert_to_trace_conv(model, probes=probes, probe=probe)
            errs = {name: [] for name in ERROR_LAYERS}
            cosines = {name: [] for name in ERROR_LAYERS}
            for draw in range(args.error_seeds):
                torch.manual_seed(1000 + draw)
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                for name, g in reference.items():
                    est = model.get_submodule(name).weight.grad
                    errs[name].append(((est - g).norm() / g.norm()).item())
                    cosines[name].append(F.cosine_similarity(est.flatten(), g.flatten(), dim=0).item())
            row = {"probe": probe, "r": probes,
                   "rel_error": {n: statistics.mean(v) for n, v in errs.items()},
                   "cosine": {n: statistics.mean(v) for n, v in cosines.items()}}  # fmt: skip
            rows.append(row)
            result.add_row(probe, str(probes),
                           *(f"{row['rel_error'][n]:.2f} / {row['cosine'][n]:.2f}" for n in ERROR_LAYERS))  # fmt: skip
        result.add_section()
    console.print(result)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-device", default=None, help="meta (default on CPU), cpu or cuda")
    parser.add_argument("--r", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--cifar-batch", type=int, default=256)
    parser.add_argument("--imagenet-batch", type=int, default=64)
    parser.add_argument("--imagenet-size", type=int, default=224)
    parser.add_argument("--time-batch", type=int, default=None, help="default 256 on cuda, 16 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="default 20 on cuda, 3 on cpu")
    parser.add_argument("--error-batch", type=int, default=None, help="default 128 on cuda, 16 on cpu")
    parser.add_argument("--error-seeds", type=int, default=None, help="default 8 on cuda, 2 on cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "time", "error"])
    parser.add_argument("--out", type=Path, default=None, help="write all rows here (.json, or .csv)")
    args = parser.parse_args()
    on_cuda = torch.device(args.device).type == "cuda"
    args.memory_device = args.memory_device or ("cuda" if on_cuda else "meta")
    args.time_batch = args.time_batch or (256 if on_cuda else 16)
    args.steps = args.steps or (20 if on_cuda else 3)
    args.error_batch = args.error_batch or (128 if on_cuda else 16)
    args.error_seeds = args.error_seeds or (8 if on_cuda else 2)

    console = make_console(160)
    env = environment(args.device)
    console.print(f"[bold]bench_trace_conv[/bold] {env['device_name']}, torch {env['torch']}, "
                  f"{env['cpu_threads']} CPU threads, TRITON_INTERPRET={env['triton_interpret']}")
    tables = {}
    if "memory" not in args.skip:
        tables["memory"] = memory_table(args, console)
    if "time" not in args.skip:
        tables["time"] = time_table(args, console)
    if "error" not in args.skip:
        tables["error"] = error_table(args, console)
    headline = {f"step_overhead_r{row['r']}": row["overhead"] for row in tables.get("time", []) if row["r"]}
    for row in tables.get("memory", []):
        if row["model"] == "resnet18-cifar" and row["variant"] == "trace" and row["r"] == 16:
            headline["resnet18_exact_over_trace_saved_r16"] = row["ratio_vs_exact"]
    meta = {**env, "args": {k: str(v) for k, v in vars(args).items()}}
    write_results(args.out, meta, tables, headline, console)


if __name__ == "__main__":
    main()
