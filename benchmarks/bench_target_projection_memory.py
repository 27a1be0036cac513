"""Peak activation memory and step time of forward-only DRTP and tpSGD against BP.

Model: torchvision ResNet-18 with the CIFAR stem on 32x32 images, 10 classes, SGD + Nesterov,
random images (memory and time do not depend on the pixels). The rules' steps are timed in
interleaved rounds (``benchmarks/_harness.time_interleaved``): ``--warmup`` untimed rounds, then
``--steps`` timed ones, the median reported, the device synchronised around each step.

Activation memory, by device (``benchmarks/_harness.PeakMemory``):
- CUDA: ``torch.cuda.max_memory_allocated`` over a step, minus what was allocated before it
  (parameters, optimizer state, the batch): everything the step itself needed at its peak.
  Then, for each rule, the largest batch whose whole peak (parameters and state included)
  stays within ``--budget-gib``: doubling from ``--batch``, then bisection (an out-of-memory
  error counts as not fitting).
- CPU: no allocator statistics, so the peak of live *saved-activation bytes*: every tensor that
  autograd saves for backward is counted, once per storage, from its save until its graph is
  freed (``torch.autograd.graph.saved_tensors_hooks``; ``SavedActivationMeter``); parameters and
  buffers are not counted. No batch search on the CPU.

The goal of the target-projection rules: at most 0.35x BP's peak activation memory at the same
batch, and at least a 2x larger batch within the budget where BP runs out.

    python -m benchmarks.bench_target_projection_memory [--batch 256] [--budget-gib 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not __package__:  # run as a file (python benchmarks/bench_target_projection_memory.py): the checkout first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (
    PeakMemory,
    cifar_batch,
    environment,
    make_console,
    cifar_rule,
    table,
    time_interleaved,
    write_results,
)
from trainer.devices import resolve_device
from trainer.rules import Rule


@dataclass
class Variant:
    """One rule configuration to measure."""

    label: str
    rule: str
    options: dict


@dataclass
class Measurement:
    label: str
    batch: int
    activation_mib: float
    step_ms: float
    total_peak_mib: float | None = None  # CUDA only: parameters and state included
    ratio_to_bp: float | None = None
    max_batch: int | None = None  # CUDA only: the largest batch within the budget


def variants(granularities: list[str]) -> list[Variant]:
    out = [Variant("bp", "bp", {})]
    for rule in ("drtp", "tpsgd"):
        out += [Variant(f"{rule} ({g})", rule, {"granularity": g}) for g in granularities]
    return out


def step_peak(rule: Rule, optimizer: torch.optim.Optimizer, batch: int, device: torch.device) -> PeakMemory:
    """The peak of one step at ``batch``, after one step that creates the optimizer state."""
    x, y = cifar_batch(batch, device)
    rule.train_step(x, y, optimizer)
    with PeakMemory(device, activations=True, exclude=[*rule.parameters(), *rule.buffers()]) as peak:
        rule.train_step(x, y, optimizer)
    return peak


def fits(variant: Variant, batch: int, budget_mib: float, device: torch.device, amp: bool) -> bool:
    rule, optimizer = cifar_rule(variant.rule, variant.options, device, amp=amp)
    try:
        return step_peak(rule, optimizer, batch, device).total_bytes / 2**20 <= budget_mib
    except torch.OutOfMemoryError:
        return False
    finally:
        del rule, optimizer
        torch.cuda.empty_cache()


def largest_batch(variant: Variant, start: int, budget_mib: float, device: torch.device, amp: bool,
                  limit: int) -> int:
    """The largest batch (to 1/16 of the last doubling) whose whole step peak fits the budget."""
    if not fits(variant, 1, budget_mib, device, amp):
        return 0
    low, high = 1, start
    while high <= limit and fits(variant, high, budget_mib, device, amp):
        low, high = high, 2 * high
    high = min(high, limit + 1)
    while high - low > max(1, low // 16):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(variant, middle, budget_mib, device, amp) else (low, middle)
    return low


def measure(chosen: list[Variant], args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    """Step times (interleaved over the rules) and each rule's activation peak at ``args.batch``."""
    built = {v.label: cifar_rule(v.rule, v.options, device, amp=args.amp) for v in chosen}
    x, y = cifar_batch(args.batch, device)
    times = time_interleaved({label: lambda rule=rule, opt=opt: rule.train_step(x, y, opt)
                              for label, (rule, opt) in built.items()}, device, warmup=args.warmup, repeats=args.steps)
    rows = []
    for label, (rule, optimizer) in built.items():
        peak = step_peak(rule, optimizer, args.batch, device)
        total = peak.total_bytes / 2**20 if device.type == "cuda" else None
        rows.append(Measurement(label, args.batch, peak.mib, times[label].median_ms, total))
    return rows


def print_table(rows: list[Measurement], device: torch.device, budget_gib: float) -> None:
    what = "peak activation MiB" if device.type == "cuda" else "peak saved-activation MiB"
    columns = ["rule", what, "x BP", "step ms"]
    if device.type == "cuda":
        columns += ["whole peak MiB", f"max batch in {budget_gib:g} GiB", "x BP batch"]
    result = table(f"ResNet-18 (CIFAR stem), 32x32, batch {rows[0].batch}, {device.type}", columns)
    bp = rows[0]
    for row in rows:
        cells = [row.label, f"{row.activation_mib:,.1f}", f"{row.ratio_to_bp:.3f}", f"{row.step_ms:,.0f}"]
        if device.type == "cuda":
            scale = f"{row.max_batch / bp.max_batch:.2f}" if bp.max_batch else "-"
            cells += [f"{row.total_peak_mib:,.0f}", str(row.max_batch), scale]
        result.add_row(*cells)
    make_console(100).print(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--granularity", default="layer,block", help="unit granularities of drtp/tpsgd, comma-separated")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--budget-gib", type=float, default=8.0, help="CUDA: memory budget of the batch search")
    parser.add_argument("--max-batch", type=int, default=65536, help="CUDA: stop the batch search here")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, as in the trainer)")
    parser.add_argument("--out", type=Path, help="write the measurements here (.json, or .csv)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.amp = device.type == "cuda" if args.amp is None else args.amp

    chosen = variants(args.granularity.split(","))
    rows = measure(chosen, args, device)
    for row in rows:
        row.ratio_to_bp = row.activation_mib / rows[0].activation_mib
    if device.type == "cuda":
        for variant, row in zip(chosen, rows):
            row.max_batch = largest_batch(variant, args.batch, args.budget_gib * 1024, device, args.amp, args.max_batch)
    print_table(rows, device, args.budget_gib)
    method = PeakMemory(device, activations=True).method
    if device.type == "cpu":
        print(f"CPU: {method} (no batch search without a GPU); {torch.get_num_threads()} threads, amp={args.amp}")
    headline = {f"{row.label} activation_vs_bp": row.ratio_to_bp for row in rows[1:]}
    if device.type == "cuda" and rows[0].max_batch:
        headline.update({f"{row.label} max_batch_vs_bp": row.max_batch / rows[0].max_batch for row in rows[1:]})
    meta = {**environment(device), "amp": args.amp, "budget_gib": args.budget_gib, "method": method}
    write_results(args.out, meta, {"rows": [asdict(r) for r in rows]}, headline)


if __name__ == "__main__":
    main()
