"""Images/s of a BP training step: the trainer against a plain PyTorch loop of the same model.

Both train torchvision ResNet-18 (CIFAR stem) with SGD + Nesterov on the same real CIFAR images
kept on the device, with the same batch, precision and compile setting. The trainer's figure
includes its on-device augmentation and scheduler; the plain loop does neither, so any overhead
of the trainer shows up as a lower rate. Steps of the two loops alternate, so a change in the
machine's load hits both alike; each step is timed with a synchronised wall clock.

    python benchmarks/bench_bp_throughput.py --npz ../shared/data/cifar10-mini-train.npz --batch 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from trainer.config import ModelConfig, load_recipe
from trainer.data import NormStats, load_npz
from trainer.loop import build_session, resolve_device
from trainer.models import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cycle(make_epoch):
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def plain_loop(args, device: torch.device, amp: bool):
    """The reference: the textbook PyTorch loop, written out by hand."""
    images = load_npz(args.npz)
    stats = NormStats.of(images.x)
    mean = torch.tensor(stats.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats.std, device=device).view(1, -1, 1, 1)
    x_all = ((images.x.to(device).float() / 255) - mean) / std
    y_all = images.y.to(device)
    model = build_model(ModelConfig(name="resnet18", cifar_stem=True), tuple(x_all.shape[1:]), 10).to(device)
    if args.compile:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def epoch_batches(epoch):
        order = torch.randperm(len(y_all), device=device)
        for i in range(len(order) // args.batch):
            index = order[i * args.batch : (i + 1) * args.batch]
            yield x_all[index], y_all[index]

    model.train()
    return step, cycle(epoch_batches)


def trainer_loop(args, device: torch.device, amp: bool):
    """The trainer's own session (data loader, rule, optimizer, schedule) from the BP recipe."""
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "cifar10_resnet18_bp.toml", [
        "data.name=npz", f"data.path={json.dumps(str(args.npz))}", f"train.batch_size={args.batch}",
        f"train.device={json.dumps(str(device))}", f"train.compile={str(args.compile).lower()}",
        f"train.amp={str(amp).lower()}", "optim.lr=0.05",
    ])
    session = build_session(recipe)
    session.model.train()

    def step(x, y):
        session.rule.train_step(x, y, session.optimizer)
        session.scheduler.step()

    return step, cycle(session.data.train.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=Path("../shared/data/cifar10-mini-train.npz"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    amp = device.type == "cuda"
    torch.manual_seed(0)
    loops = {"plain PyTorch loop": plain_loop(args, device, amp), "trainer (rule bp)": trainer_loop(args, device, amp)}
    seconds = {name: 0.0 for name in loops}
    for i in range(args.warmup + args.steps):
        for name, (step, batches) in loops.items():
            x, y = next(batches)
            sync(device)
            start = time.perf_counter()
            step(x, y)
            sync(device)
            if i >= args.warmup:  # the first steps compile and warm the allocator
                seconds[name] += time.perf_counter() - start
    results = {name: args.steps * args.batch / t for name, t in seconds.items()}
    table = Table(title=f"BP ResNet-18 (CIFAR stem), batch {args.batch}, {device}, compile={args.compile}, amp={amp}")
    table.add_column("loop")
    table.add_column("images/s", justify="right")
    table.add_column("vs plain", justify="right")
    base = results["plain PyTorch loop"]
    for name, rate in results.items():
        table.add_row(name, f"{rate:,.1f}", f"{rate / base:.3f}x")
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "batch": args.batch, "compile": args.compile,
                                        "amp": amp, "steps": args.steps, "images_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
