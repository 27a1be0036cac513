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

On CUDA the timings use ``triton.testing.do_bench``. Without a GPU only a tiny subset runs, on the
PyTorch (CPU) path of the op, and the output says so. Results also go to ``--out`` (.json or .csv).

    python benchmarks/bench_binary_feedback.py [--quick] [--dtype float32] [--no-mask] [--out results.json]
"""

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels._dispatch import triton_interpreting  # noqa: E402
from kernels.binary_feedback import PackedSigns, SeededSigns, binary_feedback_project, pack_signs  # noqa: E402

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


def timer(device: torch.device, quick: bool) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: triton's do_bench on CUDA, a median of wall-clock runs on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100)

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)

    return cpu_time


def copy_bandwidth(device: torch.device, measure: Callable[[Callable[[], object]], float]) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    numel = 2**28 if device.type == "cuda" else 2**24  # 1 GiB on GPU, 64 MiB on CPU
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
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


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float32."""
    got, want = got.float(), want.float()
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()


def run_kernel_table(args, device: torch.device, d_units: dict[int, list[str]], hbm: float) -> list[dict]:
    measure = timer(device, args.quick)
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
                times = {
                    "packed": measure(lambda: binary_feedback_project(e, packed, 0.5, mask)),
                    "seeded": measure(lambda: binary_feedback_project(e, seeded, 0.5, mask)),
                    "dense": measure(lambda: dense_matmul(e, dense, 0.5, mask)),
                    "unpack_mm": measure(lambda: unpack_then_matmul(e, packed, 0.5, mask)),
                }
                row = {"table": "kernel", "D": d, "units": ", ".join(d_units[d]), "N": n, "C": c,
                       "dtype": args.dtype, "mask": args.mask, "rel_err": error}
                for name, ms in times.items():
                    row[f"{name}_ms"] = ms
                for name, extra in (("packed", packed.nbytes), ("seeded", 0)):
                    row[f"{name}_GBps"] = (io_bytes + extra) / times[name] / 1e6
                    row[f"{name}_bw_share"] = row[f"{name}_GBps"] / hbm
                row["speedup_vs_dense"] = times["dense"] / min(times["packed"], times["seeded"])
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
        rows.append({"table": "memory", "model": model, "C": c, "num_units": len(dims), "sum_D": sum(dims),
                     "float32_bytes": float32, "packed_bytes": packed, "seeded_bytes": seeded,
                     "float32_over_packed": float32 / packed})
    return rows


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(3, int(math.log(n, 1024)))
    return f"{n / 1024**exponent:.2f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def write_out(path: Path, meta: dict, kernel_rows: list[dict], memory_rows: list[dict]) -> None:
    if path.suffix == ".csv":
        rows = kernel_rows + memory_rows
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps({**meta, "kernel": kernel_rows, "memory": memory_rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset (implied without a GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of e, mask and g")
    parser.add_argument("--no-mask", dest="mask", action="store_false", help="project without the elementwise mask")
    parser.add_argument("--out", type=Path, help="write results here (.json, or .csv)")
    args = parser.parse_args()
    console = Console(width=max(Console().width, 170))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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

    hbm = copy_bandwidth(device, timer(device, args.quick))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    console.print(f"device: {name}; measured copy bandwidth {hbm:.0f} GB/s; dtype {args.dtype}; "
                  f"mask {'on' if args.mask else 'off'}")

    kernel_rows = run_kernel_table(args, device, d_units, hbm)
    tolerance = 1e-4 if args.dtype == "float32" else 2e-2  # 16-bit outputs round at about 2^-8
    table = Table(title=f"binary_feedback_project on {name} ({'PyTorch path' if device.type == 'cpu' else 'Triton'})")
    for column in ("D", "units", "N", "C", "packed ms", "GB/s", "%BW", "seeded ms", "GB/s", "%BW",
                   "dense ms", "unpack+mm ms", "vs dense", "rel err"):
        table.add_column(column, justify="left" if column == "units" else "right")
    for r in kernel_rows:
        units = r["units"] if len(r["units"]) <= 40 else r["units"][:37] + "..."
        table.add_row(str(r["D"]), units, str(r["N"]), str(r["C"]),
                      f"{r['packed_ms']:.3f}", f"{r['packed_GBps']:.0f}", f"{100 * r['packed_bw_share']:.0f}%",
                      f"{r['seeded_ms']:.3f}", f"{r['seeded_GBps']:.0f}", f"{100 * r['seeded_bw_share']:.0f}%",
                      f"{r['dense_ms']:.3f}", f"{r['unpack_mm_ms']:.3f}", f"{r['speedup_vs_dense']:.2f}x",
                      f"[red]{r['rel_err']:.1e}[/red]" if r["rel_err"] > tolerance else f"{r['rel_err']:.1e}")
    console.print(table)

    memory_rows = memory_table(sizes)
    table = Table(title="Feedback memory per model (one C x D matrix per unit: stem + residual blocks)")
    for column in ("model", "C", "units", "sum D", "float32", "packed", "seeded", "float32 / packed"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in memory_rows:
        table.add_row(r["model"], str(r["C"]), str(r["num_units"]), str(r["sum_D"]), human_bytes(r["float32_bytes"]),
                      human_bytes(r["packed_bytes"]), human_bytes(r["seeded_bytes"]),
                      f"{r['float32_over_packed']:.1f}x")
    console.print(table)

    if args.out:
        meta = {"device": name, "copy_bandwidth_GBps": hbm, "dtype": args.dtype, "mask": args.mask,
                "path": "pytorch" if device.type == "cpu" else "triton", "unit_sizes": sizes}
        write_out(args.out, meta, kernel_rows, memory_rows)
        console.print(f"wrote {args.out}")
    if any(r["rel_err"] > tolerance for r in kernel_rows):
        sys.exit(f"binary_feedback_project differs from the float32 product by more than {tolerance:g} (rel err column)")


if __name__ == "__main__":
    main()
