"""TinyDFA's MNIST setting, side by side: TinyDFA itself against this project's ``dfa`` at its
default options, trained by the user's own loop through ``rule.prepare()`` (issue 37).

The setting is TinyDFA's ``mnist_example.py``: a 784-256-256-10 ReLU MLP (PyTorch's default
initialisation), feedback at the output of each hidden ReLU, the true error at the top layer,
SGD lr 0.01 momentum 0.9, batch 128, cross-entropy. Both sides start from the same weights (drawn
with ``torch.manual_seed(seed)``), see the same batches in the same order and are evaluated on the
same held-out images after every epoch; they differ only in the rule: TinyDFA's feedback is one
U[-1, 1) matrix divided by √(feedback width), ours the ``dfa`` defaults (docs/rules.md §5). Step
time is measured apart from training, the two sides' steps alternating on one fixed batch
(``benchmarks/_harness.time_interleaved``), so a change in the machine's load hits both alike.

TinyDFA is not a dependency: ``--tinydfa PATH`` names a folder holding its ``tinydfa`` package,
e.g. the TinyDFA folder of its public source (https://github.com/lightonai/dfa-scales-to-modern-deep-learning)::

    git clone https://github.com/lightonai/dfa-scales-to-modern-deep-learning /tmp/dfa-scales
    OMP_NUM_THREADS=1 python -m benchmarks.tinydfa_side_by_side --tinydfa /tmp/dfa-scales/TinyDFA --epochs 5
    python -m benchmarks.tinydfa_side_by_side --quick      # our side alone, a smoke run in seconds
    python -m benchmarks.tinydfa_side_by_side --rule bdfa --feedback-scale 1.0 --hidden 1024 --epochs 10

Without ``--tinydfa`` our side runs alone, and says so. ``--rule`` (dfa, bdfa, sdfa),
``--feedback-scale`` and ``--hidden`` (TinyDFA's ``--hidden-size``) vary our side's rule, its
feedback scale and both sides' hidden width: how DFA's default scale was chosen (BENCHMARKS.md).
 Data: the embedded mnist5k with the
project's own split (4,500 training images, 500 held out: ``[data] val_fraction = 0.1``,
``split_seed = 0``), or torchvision's MNIST (60,000 / 10,000) under ``--mnist-root``; pixels
normalised by the training images' mean and standard deviation (TinyDFA's example: MNIST's own).
Results: a table, and ``--out`` (default ``benchmarks/results/tinydfa/``) gets a CSV and a JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

if not __package__:  # run as a file (python benchmarks/tinydfa_side_by_side.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import environment, make_console, table, time_interleaved, write_results
from trainer.config import ConfigError, DataConfig
from trainer.data import NormStats, load_images
from trainer.devices import resolve_device
from trainer.errors import TrainingDiverged
from trainer.rules import RuleContext, build_rule

RESULTS = Path("benchmarks/results/tinydfa")
CLASSES, SHAPE = 10, (1, 28, 28)
LR, MOMENTUM, BATCH = 0.01, 0.9, 128  # TinyDFA's mnist_example.py defaults
THEIRS = "TinyDFA"


@dataclass
class Data:
    """Normalised training and held-out images on the device, and where they came from."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str


@dataclass
class Run:
    """One side's training of one seed: the held-out figures after every epoch."""

    side: str
    seed: int
    epochs: list[dict[str, float]] = field(default_factory=list)
    status: str = "finished"


def load_data(mnist_root: Path | None, device: torch.device, quick: bool) -> Data:
    """mnist5k with the project's split, or torchvision's MNIST under ``mnist_root``; ``quick``
    keeps the first 512 training and 200 held-out images."""
    config = DataConfig(name="mnist", root=str(mnist_root)) if mnist_root else DataConfig(name="mnist5k")
    try:
        train, test, _ = load_images(config, can_download=False)
    except ConfigError as err:
        raise SystemExit(f"--mnist-root: {err}") from None
    if quick:
        train, test = train.subset(torch.arange(512)), test.subset(torch.arange(200))
    norm = NormStats.of(train.x)
    name = f"MNIST (torchvision) under {mnist_root}" if mnist_root else "mnist5k (embedded; 4,500 / 500 split)"
    return Data(norm.apply(train.x).to(device), train.y.to(device), norm.apply(test.x).to(device),
                test.y.to(device), f"{name}{', quick slice 512 / 200' if quick else ''}")


def import_tinydfa(folder: Path) -> ModuleType:
    """TinyDFA's ``tinydfa`` package from ``folder`` (which holds it), without installing it."""
    if not (folder / "tinydfa" / "__init__.py").is_file():
        raise SystemExit(f"--tinydfa: {folder} holds no tinydfa/ package; pass the TinyDFA folder of "
                         "https://github.com/lightonai/dfa-scales-to-modern-deep-learning")
    sys.path.insert(0, str(folder.resolve()))
    try:
        return importlib.import_module("tinydfa")
    except ImportError as err:
        raise SystemExit(f"--tinydfa: importing tinydfa from {folder} failed ({err})") from None


def mlp_layers(seed: int, hidden: int, device: torch.device) -> list[nn.Linear]:
    """The MLP's three layers with PyTorch's default initialisation, the same for both sides."""
    torch.manual_seed(seed)
    return [nn.Linear(784, hidden).to(device), nn.Linear(hidden, hidden).to(device),
            nn.Linear(hidden, CLASSES).to(device)]


def our_net(layers: list[nn.Linear], rule_name: str, options: dict, seed: int, device: torch.device,
            check_divergence: bool = True) -> nn.Module:
    """Our rule (default options but those given), prepared for a plain loop: one unit per hidden
    layer (the signal enters after its ReLU, as at TinyDFA's DFALayer) and the output layer on top."""
    fc1, fc2, fc3 = copy.deepcopy(layers)
    model = nn.Sequential(nn.Sequential(nn.Flatten(), fc1, nn.ReLU()), nn.Sequential(fc2, nn.ReLU()), fc3)
    rule = build_rule(rule_name, options, model,
                      RuleContext(num_classes=CLASSES, input_shape=SHAPE, device=device, seed=seed))
    rule.check_divergence = check_divergence
    return rule.prepare()


def feedback_scale(text: str) -> float | str:
    """``--feedback-scale``: "auto" or a number."""
    return text if text == "auto" else float(text)


class TinyDFANet(nn.Module):
    """TinyDFA's MNIST network: a DFALayer after each hidden ReLU, DFA on the logits."""

    def __init__(self, tinydfa: ModuleType, layers: list[nn.Linear]):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = copy.deepcopy(layers)
        self.dfa1, self.dfa2 = tinydfa.DFALayer(), tinydfa.DFALayer()
        self.dfa = tinydfa.DFA([self.dfa1, self.dfa2], feedback_points_handling=tinydfa.FeedbackPointsHandling.LAST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dfa1(torch.relu(self.fc1(x.flatten(1))))
        x = self.dfa2(torch.relu(self.fc2(x)))
        quiet = contextlib.nullcontext() if self.dfa.initialized else contextlib.redirect_stdout(io.StringIO())
        with quiet:  # its first forward prints each feedback point's shape
            return self.dfa(self.fc3(x))


def evaluate(net: nn.Module, data: Data) -> tuple[float, float]:
    """(held-out mean cross-entropy, accuracy in %)."""
    net.eval()
    with torch.no_grad():
        logits = net(data.x_test)
    net.train()
    return F.cross_entropy(logits, data.y_test).item(), 100 * (logits.argmax(1) == data.y_test).float().mean().item()


def train(side: str, net: nn.Module, data: Data, seed: int, epochs: int) -> Run:
    """TinyDFA's loop: SGD, batches in an order fixed by ``seed`` (the same for both sides)."""
    run = Run(side, seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    order_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # TinyDFA draws its feedback matrix from the global generator
    net.train()
    for epoch in range(1, epochs + 1):
        order, losses = torch.randperm(len(data.y), generator=order_gen).to(data.x.device), []
        try:
            for start in range(0, len(order), BATCH):
                index = order[start:start + BATCH]
                optimizer.zero_grad()
                loss = F.cross_entropy(net(data.x[index]), data.y[index])
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        except TrainingDiverged as err:  # our prepared route stops a diverging step, loudly
            run.status = f"diverged in epoch {epoch}: {err}"
            break
        test_loss, accuracy = evaluate(net, data)
        run.epochs.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "test_loss": test_loss,
                           "test_accuracy": accuracy})
    return run


def step_call(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """One training step of ``net`` on a fixed batch, for the interleaved timer. The learning rate
    is 0 (the same work, the weights kept): hundreds of steps on one batch would otherwise diverge
    at the settings that diverge in training, and stop the timing."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0, momentum=MOMENTUM)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    return step


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tinydfa", type=Path,
                        help="a folder holding TinyDFA's tinydfa package (without it: ours alone)")
    parser.add_argument("--rule", choices=("dfa", "bdfa", "sdfa"), default="dfa", help="our side's rule")
    parser.add_argument("--feedback-scale", type=feedback_scale,
                        help="our side's feedback_scale, a number or auto (default: the rule's default)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width of both sides' MLP")
    parser.add_argument("--no-divergence-check", action="store_true",
                        help="our side without its divergence check (rule.check_divergence = False), which "
                             "costs a few host syncs a step")
    parser.add_argument("--mnist-root", type=Path, help="torchvision's MNIST here instead of the embedded mnist5k")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per side (interleaved)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per side")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 512 / 200 images, 1 epoch, seed 0, 3 timed steps")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.steps, args.warmup = 1, [0], 3, 1
    device = resolve_device(args.device)
    console = make_console()
    data = load_data(args.mnist_root, device, args.quick)
    tinydfa = import_tinydfa(args.tinydfa) if args.tinydfa else None
    if tinydfa is None:
        console.print("TinyDFA not given (--tinydfa PATH): our side alone")
    options = {} if args.feedback_scale is None else {"feedback_scale": args.feedback_scale}
    settings = [f"feedback_scale={args.feedback_scale}"] * bool(options) + ["no check"] * args.no_divergence_check
    ours = f"{args.rule} (ours, {', '.join(settings) or 'defaults'})"

    def nets(seed: int) -> dict[str, nn.Module]:
        layers = mlp_layers(seed, args.hidden, device)
        built = {THEIRS: TinyDFANet(tinydfa, layers).to(device)} if tinydfa else {}
        return {**built, ours: our_net(layers, args.rule, options, seed, device, not args.no_divergence_check)}

    runs = [train(side, net, data, seed, args.epochs) for seed in args.seeds for side, net in nets(seed).items()]
    x, y = data.x[:BATCH], data.y[:BATCH]
    timings = time_interleaved({side: step_call(net, x, y) for side, net in nets(args.seeds[0]).items()}, device,
                               warmup=args.warmup, repeats=args.steps)

    summary = []
    for side, timing in timings.items():
        finished = [run.epochs[-1] for run in runs if run.side == side and len(run.epochs) == args.epochs]
        accuracy, accuracy_sd = mean_sd([row["test_accuracy"] for row in finished])
        loss, loss_sd = mean_sd([row["test_loss"] for row in finished])
        summary.append({"side": side, "seeds": len(finished), "test_accuracy": accuracy,
                        "test_accuracy_sd": accuracy_sd, "test_loss": loss, "test_loss_sd": loss_sd,
                        "step_ms": timing.median_ms,
                        "step_p20_ms": timing.p20_ms, "step_p80_ms": timing.p80_ms})
    by_side = {row["side"]: row for row in summary}
    headline = {}
    if THEIRS in by_side:
        mine, theirs = by_side[ours], by_side[THEIRS]
        headline = {"accuracy_goal_met": mine["test_accuracy"] >= theirs["test_accuracy"],
                    "step_time_ratio": mine["step_ms"] / theirs["step_ms"],
                    "step_time_goal_met": mine["step_ms"] <= theirs["step_ms"]}

    width = args.hidden
    shown = table(f"TinyDFA's MNIST setting ({data.name}): 784-{width}-{width}-10 ReLU MLP, SGD {LR} momentum "
                  f"{MOMENTUM}, batch {BATCH}, {args.epochs} epoch(s), seeds {args.seeds}, {device}; step time: "
                  f"median of {args.steps} interleaved steps", ["side", "seeds", "held-out accuracy %", "held-out loss",
                                                      "ms/step", "p20-p80 ms", "vs TinyDFA step"])
    for row in summary:
        ratio = f"{row['step_ms'] / by_side[THEIRS]['step_ms']:.3f}x" if THEIRS in by_side else "-"
        shown.add_row(row["side"], str(row["seeds"]), f"{row['test_accuracy']:.2f} ± {row['test_accuracy_sd']:.2f}",
                      f"{row['test_loss']:.4f} ± {row['test_loss_sd']:.4f}", f"{row['step_ms']:.2f}",
                      f"{row['step_p20_ms']:.2f}-{row['step_p80_ms']:.2f}", ratio)
    console.print(shown)
    for run in runs:
        if run.status != "finished":
            console.print(f"{run.side}, seed {run.seed}: {run.status}")

    per_seed = [{"side": run.side, "seed": run.seed, "status": run.status, **(run.epochs[-1] if run.epochs else {})}
                for run in runs]
    variant = "" if not options and args.rule == "dfa" and width == 256 else \
        f"_{args.rule}_s{args.feedback_scale or 'default'}_h{width}"
    variant += "_nocheck" * args.no_divergence_check
    stem = f"{'mnist' if args.mnist_root else 'mnist5k'}_e{args.epochs}{variant}{'_quick' if args.quick else ''}"
    meta = {**environment(device), "data": data.name, "epochs": args.epochs, "seeds": args.seeds,
            "tinydfa": str(args.tinydfa) if args.tinydfa else None, "rule": args.rule, "options": options,
            "divergence_check": not args.no_divergence_check,
            "hidden": width, "lr": LR, "momentum": MOMENTUM, "batch": BATCH}
    write_results(args.out / f"{stem}.csv", meta, {"summary": summary, "per_seed": per_seed}, console=console)
    result = {"summary": summary, "per_seed": per_seed, "epochs": [run.__dict__ for run in runs]}
    write_results(args.out / f"{stem}.json", meta, result, headline, console=console)
    return {"meta": meta, "headline": headline, **result}


if __name__ == "__main__":
    main()
