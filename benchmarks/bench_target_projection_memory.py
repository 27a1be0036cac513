"""Peak activation memory and step time of forward-only DRTP and tpSGD against BP.

Model: torchvision ResNet-18 with the CIFAR stem on 32x32 images, 10 classes, SGD + Nesterov,
random images (memory and time do not depend on the pixels). Each rule takes ``--warmup`` steps,
then ``--steps`` timed steps (median reported, the device synchronised around each).

Activation memory, by device:
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

    python benchmarks/bench_target_projection_memory.py [--batch 256] [--budget-gib 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import ModelConfig, OptimConfig, build_section  # noqa: E402
from trainer.loop import build_optimizer  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.rules import RULES, Rule, RuleContext, build_rule  # noqa: E402
from trainer.memory import SavedActivationMeter  # noqa: E402

CLASSES, SHAPE = 10, (3, 32, 32)


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


def build(variant: Variant, device: torch.device, amp: bool) -> tuple[Rule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", cifar_stem=True), SHAPE, CLASSES).to(device)
    options = build_section(RULES[variant.rule].Options, variant.options, variant.label)
    ctx = RuleContext(num_classes=CLASSES, input_shape=SHAPE, device=device, amp=amp)
    rule = build_rule(variant.rule, options, model, ctx)
    rule.train()
    return rule, build_optimizer(OptimConfig(), [model, rule])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_of(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(size, *SHAPE, device=device), torch.randint(0, CLASSES, (size,), device=device)


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median milliseconds of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def cuda_peaks(rule: Rule, optimizer: torch.optim.Optimizer, batch: int, device: torch.device) -> tuple[float, float]:
    """(activation MiB, whole peak MiB) of one step at ``batch`` (after one step that creates the
    optimizer state)."""
    x, y = batch_of(batch, device)
    rule.train_step(x, y, optimizer)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    rule.train_step(x, y, optimizer)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (peak - before) / 2**20, peak / 2**20


def fits(variant: Variant, batch: int, budget_mib: float, device: torch.device, amp: bool) -> bool:
    rule, optimizer = build(variant, device, amp)
    try:
        return cuda_peaks(rule, optimizer, batch, device)[1] <= budget_mib
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


def measure(variant: Variant, args: argparse.Namespace, device: torch.device) -> Measurement:
    rule, optimizer = build(variant, device, args.amp)
    x, y = batch_of(args.batch, device)
    step_ms = timed_steps(lambda: rule.train_step(x, y, optimizer), device, args.warmup, args.steps)
    if device.type == "cuda":
        activation, total = cuda_peaks(rule, optimizer, args.batch, device)
        return Measurement(variant.label, args.batch, activation, step_ms, total)
    excluded = [*rule.model.parameters(), *rule.model.buffers(), *rule.buffers()]
    with SavedActivationMeter(exclude=excluded) as meter:
        rule.train_step(x, y, optimizer)
    return Measurement(variant.label, args.batch, meter.peak / 2**20, step_ms)


def table(rows: list[Measurement], device: torch.device, budget_gib: float) -> Table:
    what = "peak activation MiB" if device.type == "cuda" else "peak saved-activation MiB"
    result = Table(title=f"ResNet-18 (CIFAR stem), 32x32, batch {rows[0].batch}, {device.type}")
    columns = ["rule", what, "x BP", "step ms"]
    if device.type == "cuda":
        columns += ["whole peak MiB", f"max batch in {budget_gib:g} GiB", "x BP batch"]
    for column in columns:
        result.add_column(column, justify="left" if column == "rule" else "right")
    bp = rows[0]
    for row in rows:
        cells = [row.label, f"{row.activation_mib:,.1f}", f"{row.ratio_to_bp:.3f}", f"{row.step_ms:,.0f}"]
        if device.type == "cuda":
            scale = f"{row.max_batch / bp.max_batch:.2f}" if bp.max_batch else "-"
            cells += [f"{row.total_peak_mib:,.0f}", str(row.max_batch), scale]
        result.add_row(*cells)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--granularity", default="layer,block", help="unit granularities of drtp/tpsgd, comma-separated")
    parser.add_argument("--budget-gib", type=float, default=8.0, help="CUDA: memory budget of the batch search")
    parser.add_argument("--max-batch", type=int, default=65536, help="CUDA: stop the batch search here")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, as in the trainer)")
    parser.add_argument("--out", type=Path, help="write the measurements here as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    console = Console()

    rows = [measure(v, args, device) for v in variants(args.granularity.split(","))]
    for row in rows:
        row.ratio_to_bp = row.activation_mib / rows[0].activation_mib
    if device.type == "cuda":
        for variant, row in zip(variants(args.granularity.split(",")), rows):
            row.max_batch = largest_batch(variant, args.batch, args.budget_gib * 1024, device, args.amp, args.max_batch)
    console.print(table(rows, device, args.budget_gib))
    if device.type == "cpu":
        console.print("CPU: saved-activation bytes via saved_tensors_hooks (no batch search without a GPU); "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads, amp={args.amp}")
    if args.out:
        meta = {"device": str(device), "torch": torch.__version__, "amp": args.amp, "budget_gib": args.budget_gib,
                "method": "cuda max_memory_allocated" if device.type == "cuda" else "saved_tensors_hooks"}
        args.out.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
