"""Images/s of a BP training step: the trainer against a plain PyTorch loop of the same model.

Both train torchvision ResNet-18 (CIFAR stem) with SGD + Nesterov on the same CIFAR images kept on
the device, with the same batch, precision and compile setting. The trainer's figure includes its
on-device augmentation and scheduler; the plain loop does neither, so any overhead of the trainer
shows up as a lower rate. Steps of the two loops alternate (``benchmarks/_harness.time_interleaved``),
so a change in the machine's load hits both alike; each step (fetching its batch included) is timed
with a synchronised wall clock, and the median is reported.

Images: ``--npz``, else torchvision's CIFAR-10 under ``--cifar-root`` (default data/cifar10, the
recipes' root) when it is there, else synthetic CIFAR-shaped images (same speed); the output says which.

    python -m benchmarks.bench_bp_throughput --npz path/to/cifar10-train.npz --batch 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

if not __package__:  # run as a file (python benchmarks/bench_bp_throughput.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (cifar_data, cycle, environment, make_console, session_steps, table, time_interleaved,
                                 write_results)
from trainer.data import NormStats, load_images
from trainer.devices import resolve_device
from trainer.models import build_model
from trainer.recipes import load_recipe
from trainer.session import build_session

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cifar10_resnet18_bp.toml"


def plain_loop(recipe, args, device: torch.device, amp: bool):
    """The reference: the textbook PyTorch loop, written out by hand, on the recipe's images and model."""
    images = load_images(recipe.data)[0]
    stats = NormStats.of(images.x)
    mean = torch.tensor(stats.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats.std, device=device).view(1, -1, 1, 1)
    x_all = ((images.x.to(device).float() / 255) - mean) / std
    y_all = images.y.to(device)
    model = build_model(recipe.model, tuple(x_all.shape[1:]), 10).to(device)
    if args.compile:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()

    def epoch_batches(epoch):
        order = torch.randperm(len(y_all), device=device)
        for i in range(len(order) // args.batch):
            index = order[i * args.batch : (i + 1) * args.batch]
            yield x_all[index], y_all[index]

    batches = cycle(epoch_batches)

    def step():
        x, y = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    return step


def trainer_loop(recipe):
    """The trainer's own session (data loader, rule, optimizer, schedule) from the BP recipe, stepped
    by the loop's own step."""
    session = build_session(recipe)
    session.model.train()
    steps = session_steps(session)
    return lambda: next(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, help="an .npz of CIFAR images (x uint8 N x 32 x 32 x 3, y labels)")
    parser.add_argument("--cifar-root", type=Path, help="torchvision's CIFAR-10 folder (default data/cifar10 if there)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .csv)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    amp = device.type == "cuda"
    console = make_console(100)
    data = cifar_data(args.npz, args.cifar_root, Path(tempfile.gettempdir()) / "bpfree-bench" / "synthetic-cifar10.npz")
    console.print(f"data: {data.description}")
    recipe = load_recipe(RECIPE, [
        *data.overrides, f"train.batch_size={args.batch}", f"train.device={json.dumps(str(device))}",
        f"train.compile={str(args.compile).lower()}", f"train.amp={str(amp).lower()}", "optim.lr=0.05",
    ])
    torch.manual_seed(0)
    loops = {"plain PyTorch loop": plain_loop(recipe, args, device, amp), "trainer (rule bp)": trainer_loop(recipe)}
    times = time_interleaved(loops, device, warmup=args.warmup, repeats=args.steps)
    rates = {name: 1000 * args.batch / timing.median_ms for name, timing in times.items()}
    result = table(f"BP ResNet-18 (CIFAR stem), batch {args.batch}, {device}, compile={args.compile}, amp={amp}, "
                   f"median of {args.steps} interleaved steps", ["loop", "images/s", "vs plain"])
    base = rates["plain PyTorch loop"]
    for name, rate in rates.items():
        result.add_row(name, f"{rate:,.1f}", f"{rate / base:.3f}x")
    console.print(result)
    rows = [{"loop": name, **times[name].to_dict(), "images_per_s": rate} for name, rate in rates.items()]
    headline = {"plain_images_per_s": base, "trainer_images_per_s": rates["trainer (rule bp)"],
                "trainer_over_plain": rates["trainer (rule bp)"] / base}
    meta = {**environment(device), "data": data.description, "batch": args.batch, "compile": args.compile,
            "amp": amp, "steps": args.steps}
    write_results(args.out, meta, {"loops": rows}, headline, console)


if __name__ == "__main__":
    main()
