"""Step time of DFA (layer granularity) against BP: ResNet-18 (CIFAR stem), CIFAR-10 shapes.

Each rule trains its own copy of the model with SGD on the same random batch (step time does not
depend on the pixel values). Steps of the rules alternate, so a change in the machine's load hits
all of them alike; each step is timed with a synchronised wall clock after a few warm-up steps
(which also compile, when compiling), and the median step is reported (robust to load spikes).
BDFA (packed ±1 feedback through the binary-projection kernel) is timed too. The issue's goal on
GPU: DFA at most 0.8x BP's step time. On CPU, packed feedback is unpacked by the kernel's PyTorch
path every step, so BDFA is slower there than dense DFA.

    python benchmarks/bench_dfa_step.py                                  # CUDA: batch 256, compile, bf16
    python benchmarks/bench_dfa_step.py --device cpu --batch 16 --steps 3 --out bench_out/dfa_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from trainer.config import ModelConfig
from trainer.loop import resolve_device
from trainer.models import build_model
from trainer.rules import RuleContext, build_rule
from trainer.rules.bp import BackpropOptions
from trainer.rules.dfa import BinaryDFAOptions, DFAOptions

INPUT_SHAPE, NUM_CLASSES = (3, 32, 32), 10
RULES = {
    "bp": ("bp", BackpropOptions()),
    "dfa (layer)": ("dfa", DFAOptions(granularity="layer")),
    "bdfa (layer, packed)": ("bdfa", BinaryDFAOptions(granularity="layer")),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(rule_name: str, options: object, ctx: RuleContext):
    """A training step of ``rule_name`` on a fresh ResNet-18."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", cifar_stem=True), INPUT_SHAPE, NUM_CLASSES).to(ctx.device)
    rule = build_rule(rule_name, options, model, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    return lambda x, y: rule.train_step(x, y, optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per rule")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per rule (compilation, allocator)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the units / model (default: on for CUDA)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    compile_ = on_cuda if args.compile is None else args.compile
    amp = on_cuda if args.amp is None else args.amp
    ctx = RuleContext(num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, device=device, compile=compile_, amp=amp)
    steps = {label: make_step(name, options, ctx) for label, (name, options) in RULES.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *INPUT_SHAPE, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(device)

    times: dict[str, list[float]] = {label: [] for label in steps}
    for i in range(args.warmup + args.steps):
        for label, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step(x, y)
            sync(device)
            if i >= args.warmup:
                times[label].append(time.perf_counter() - start)

    ms = {label: 1000 * statistics.median(t) for label, t in times.items()}
    table = Table(title=f"ResNet-18 (CIFAR stem) training step, batch {args.batch}, {device}, "
                        f"compile={compile_}, amp={amp}, median of {args.steps} steps")
    for column in ("rule", "ms/step", "images/s", "vs BP step time"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for label, value in ms.items():
        table.add_row(label, f"{value:,.1f}", f"{1000 * args.batch / value:,.1f}", f"{value / ms['bp']:.3f}x")
    Console().print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": str(device), "batch": args.batch, "steps": args.steps, "compile": compile_, "amp": amp,
            "ms_per_step": ms, "images_per_s": {k: 1000 * args.batch / v for k, v in ms.items()},
            "ratio_to_bp": {k: v / ms["bp"] for k, v in ms.items()},
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
