"""Benchmark the binary-feedback projection ``g = scale * (e @ S) * mask`` (kernels/binary_feedback.py).

Two tables, in the style of the Triton tutorials:

1. Kernel throughput. For N in {128, 512}, C in {10, 100, 1000} and D the per-sample output sizes of
   the units (stem, each residual block) of resnet18 with a CIFAR stem (32x32 input) and resnet50 on
   ImageNet (224x224) -- found by forward hooks on torchvision models on the meta device -- it times
   the fused kernel with packed and with seeded signs, a dense float32 feedback matmul
   ``(e*scale) @ S_f32`` followed by ``* mask``, and PyTorch's unpack-then-matmul of the packed bits.
   GB/s counts the bytes the fused kernel must move: output + mask + e (+ packed bits); "%BW" is that
   over the bandwidth of a large device-to-device copy measured here. "rel err" compares the op's
   output (packed and seeded) with the float32 product by the unpacked signs; above tolerance the
   script exits with an error, so a kernel that compiles wrongly on a GPU is never timed silently.
2. Feedback memory per model (one C x D matrix per unit below the top): float32 vs packed vs seeded.

Timings are ``benchmarks/_harness.time_ops``: ``triton.testing.do_bench`` on CUDA (the median; the
p20/p80 spread goes to the results). Without a GPU only a tiny subset runs, on the PyTorch (CPU)
path of the op, and the output says so. Results also go to ``--out`` (.json or .csv).

    python -m benchmarks.bench_binary_feedback [--quick] [--device cuda] [--dtype float32] [--no-mask] [--out results.json]
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torchvision

if not __package__:  # run as a file (python benchmarks/bench_binary_feedback.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import environment, hardware_name, make_console, relative_error, table, time_ops, write_results
from kernels._dispatch import triton_interpreting
from kernels.binary_feedback import PackedSigns, SeededSigns, binary_feedback_project, pack_signs

MODELS = {"resnet18-cifar": 10, "resnet50-imagenet": 1000}  # model -> number of classes
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def unit_sizes(model_name: str) -> list[tuple[str, int]]:
    """(unit name, D = per-sample numel of its output) for the stem and every residual block."""
    with torch.device("meta"):
        if model_name == "resnet18-cifar":
            model = torchvision.models.resnet18(num_classes=MODELS[model_name])
            model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = torch.nn.Identity()
            x = torch.empty(1, 3, 32, 32)
        else:
            model = torchvision.models.resnet50(num_classes=MODELS[model_name])
            x = torch.empty(1, 3, 224, 224)
    units = [("stem", model.maxpool)]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        units += [(f"{stage}.{i}", block) for i, block in enumerate(getattr(model, stage))]
    sizes: dict[str, int] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, out[0].numel()))
             for name, module in units]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return [(name, sizes[name]) for name, _ in units]


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    numel = 2**28 if device.type == "cuda" else 2**24  # 1 GiB on GPU, 64 MiB on CPU
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ops({"copy": lambda: dst.copy_(src)}, device, quick=quick, cpu_repeats=3)["copy"].median_ms
    return 2 * src.nbytes / ms / 1e6


def unpack_then_matmul(e: torch.Tensor, packed: PackedSigns, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """The plain-PyTorch alternative: unpack the bits to a float matrix, then matmul (and mask)."""
    shifts = torch.arange(32, dtype=torch.int32, device=e.device)
    bits = ((packed.words.unsqueeze(-1) >> shifts) & 1).reshape(packed.num_classes, -1)[:, : packed.dim]
    out = torch.mm(e * scale, (1 - 2 * bits).to(e.dtype))
    return out.mul_(mask) if mask is not None else out


def dense_matmul(e: torch.Tensor, dense: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(e * scale, dense)
    return out.mul_(mask) if mask is not None else out


def run_kernel_table(args, device: torch.device, d_units: dict[int, list[str]], hbm: float) -> list[dict]:
    dtype = DTYPES[args.dtype]
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for d in sorted(d_units):
        for c in args.classes:
            signs = (torch.randint(0, 2, (c, d), generator=gen, device=device, dtype=torch.int8) * 2 - 1)
            packed, seeded = pack_signs(signs), SeededSigns(0, c, d)
            dense = signs.to(dtype)
            del signs
            for n in args.batch:
                e = torch.randn(n, c, generator=gen, device=device).to(dtype)
                mask = torch.rand(n, d, generator=gen, device=device).to(dtype) if args.mask else None
                io_bytes = n * d * dtype.itemsize * (2 if args.mask else 1) + e.nbytes
                # The op against the float32 product with the unpacked signs (on CUDA: the kernel).
                mask32 = mask.float() if mask is not None else None
                error = max(relative_error(binary_feedback_project(e, feedback, 0.5, mask),
                                           dense_matmul(e.float(), signs_of.float(), 0.5, mask32))
                            for feedback, signs_of in ((packed, dense), (seeded, seeded.materialize(device))))
                ops = {"packed": lambda e=e, m=mask, b=packed: binary_feedback_project(e, b, 0.5, m),
                       "seeded": lambda e=e, m=mask: binary_feedback_project(e, seeded, 0.5, m),
                       "dense": lambda e=e, m=mask, b=dense: dense_matmul(e, b, 0.5, m),
                       "unpack_mm": lambda e=e, m=mask, b=packed: unpack_then_matmul(e, b, 0.5, m)}
                times = time_ops(ops, device, quick=args.quick, cpu_repeats=3)
                del ops  # the lambdas hold e and mask: freed with them below
                row = {"D": d, "units": ", ".join(d_units[d]), "N": n, "C": c,
                       "dtype": args.dtype, "mask": args.mask, "rel_err": error}
                for name, timing in times.items():
                    row[f"{name}_ms"] = timing.median_ms
                    row[f"{name}_spread"] = timing.spread
                for name, extra in (("packed", packed.nbytes), ("seeded", 0)):
                    row[f"{name}_GBps"] = (io_bytes + extra) / row[f"{name}_ms"] / 1e6
                    row[f"{name}_bw_share"] = row[f"{name}_GBps"] / hbm
                row["speedup_vs_dense"] = row["dense_ms"] / min(row["packed_ms"], row["seeded_ms"])
                rows.append(row)
                del e, mask
            del packed, dense
    return rows


def memory_table(sizes: dict[str, list[tuple[str, int]]]) -> list[dict]:
    rows = []
    for model, units in sizes.items():
        c = MODELS[model]
        # every unit but the top one (the classifier gets e itself) has a C x D feedback matrix
        dims = [d for _, d in units]
        packed = sum(PackedSigns(torch.empty(c, math.ceil(d / 32), dtype=torch.int32, device="meta"), c, d).nbytes
                     for d in dims)
        seeded = sum(SeededSigns(0, c, d).nbytes for d in dims)
        float32 = sum(4 * c * d for d in dims)
        rows.append({"model": model, "C": c, "num_units": len(dims), "sum_D": sum(dims),
                     "float32_bytes": float32, "packed_bytes": packed, "seeded_bytes": seeded,
                     "float32_over_packed": float32 / packed})
    return rows


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(3, int(math.log(n, 1024)))
    return f"{n / 1024**exponent:.2f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset (implied without a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of e, mask and g")
    parser.add_argument("--no-mask", dest="mask", action="store_false", help="project without the elementwise mask")
    parser.add_argument("--out", type=Path, help="write results here (.json, or .csv)")
    args = parser.parse_args()
    console = make_console(170)

    device = torch.device(args.device)
    if device.type == "cpu":
        if triton_interpreting():
            sys.exit("TRITON_INTERPRET=1 is set: unset it, the interpreted kernel is far too slow to benchmark")
        args.quick = True
        console.print("[bold yellow]No GPU: timing a tiny subset on CPU with the op's PyTorch path "
                      "(not the Triton kernel); the figures say nothing about GPU performance.[/]")
    args.batch = [128] if args.quick else [128, 512]
    args.classes = [10, 100] if args.quick else [10, 100, 1000]

    sizes = {model: unit_sizes(model) for model in MODELS}
    d_units: dict[int, list[str]] = {}
    for model, units in sizes.items():
        for name, d in units:
            d_units.setdefault(d, []).append(f"{model.split('-')[0]}:{name}")
    if args.quick:
        d_units = {d: d_units[d] for d in sorted(d_units)[:2]}

    hbm = copy_bandwidth(device, args.quick)
    name = hardware_name(device)
    console.print(f"device: {name}; measured copy bandwidth {hbm:.0f} GB/s; dtype {args.dtype}; "
                  f"mask {'on' if args.mask else 'off'}")

    kernel_rows = run_kernel_table(args, device, d_units, hbm)
    tolerance = 1e-4 if args.dtype == "float32" else 2e-2  # 16-bit outputs round at about 2^-8
    path = "PyTorch path" if device.type == "cpu" else "Triton"
    kernels = table(f"binary_feedback_project on {name} ({path}; median ms)",
                    ["D", "units", "N", "C", "packed ms", "GB/s", "%BW", "seeded ms", "GB/s", "%BW",
                     "dense ms", "unpack+mm ms", "vs dense", "rel err"], left={"units"})
    for r in kernel_rows:
        units = r["units"] if len(r["units"]) <= 40 else r["units"][:37] + "..."
        kernels.add_row(str(r["D"]), units, str(r["N"]), str(r["C"]),
                        f"{r['packed_ms']:.3f}", f"{r['packed_GBps']:.0f}", f"{100 * r['packed_bw_share']:.0f}%",
                        f"{r['seeded_ms']:.3f}", f"{r['seeded_GBps']:.0f}", f"{100 * r['seeded_bw_share']:.0f}%",
                        f"{r['dense_ms']:.3f}", f"{r['unpack_mm_ms']:.3f}", f"{r['speedup_vs_dense']:.2f}x",
                        f"[red]{r['rel_err']:.1e}[/red]" if r["rel_err"] > tolerance else f"{r['rel_err']:.1e}")
    console.print(kernels)

    memory_rows = memory_table(sizes)
    memory = table("Feedback memory per model (one C x D matrix per unit: stem + residual blocks)",
                   ["model", "C", "units", "sum D", "float32", "packed", "seeded", "float32 / packed"])
    for r in memory_rows:
        memory.add_row(r["model"], str(r["C"]), str(r["num_units"]), str(r["sum_D"]), human_bytes(r["float32_bytes"]),
                       human_bytes(r["packed_bytes"]), human_bytes(r["seeded_bytes"]),
                       f"{r['float32_over_packed']:.1f}x")
    console.print(memory)

    headline = {"copy_GBps": hbm, "best_packed_bw_share": max(r["packed_bw_share"] for r in kernel_rows),
                "best_seeded_bw_share": max(r["seeded_bw_share"] for r in kernel_rows),
                "median_speedup_vs_dense": statistics.median(r["speedup_vs_dense"] for r in kernel_rows),
                "max_rel_err": max(r["rel_err"] for r in kernel_rows), "tolerance": tolerance}
    meta = {**environment(device), "copy_bandwidth_GBps": hbm, "dtype": args.dtype, "mask": args.mask,
            "path": "pytorch" if device.type == "cpu" else "triton", "unit_sizes": sizes}
    write_results(args.out, meta, {"kernel": kernel_rows, "memory": memory_rows}, headline, console)
    if any(r["rel_err"] > tolerance for r in kernel_rows):
        sys.exit(f"binary_feedback_project differs from the float32 product by more than {tolerance:g} (rel err column)")


if __name__ == "__main__":
    main()
