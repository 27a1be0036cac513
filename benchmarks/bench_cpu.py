"""Training speed on the CPU: a plain eager PyTorch loop (BP) against the trainer, eager and compiled,
in either memory layout, for BP and each rule, on the models people train on a CPU.

For each model (the quickstart CNN on mnist5k, CIFAR ResNet-20, ResNet-18 with the CIFAR stem, the
mnist5k ViT) and each rule, the script builds the trainer's own session from the model's recipe
(``--set rule.name=...``) four times: ``train.compile`` false and true, each with
``train.channels_last`` false and true (NHWC weights and activations); beside them, the textbook
PyTorch loop of the same model (BP, eager: the reference). The loops' steps alternate
(``benchmarks._harness.time_interleaved``), so the machine's load hits them alike; a compiled loop's
first steps and first evaluation batch are timed on their own and, less the steady times, give its
compile time (training and evaluation graphs). The table: images/s of each, the ratios to the plain
loop, the compile times, and which loop ``auto`` would choose from the row for 10 epochs of the
recipe's data, with its speed, compile time counted. ``--write-defaults`` writes the rows into
``trainer/cpu_speed.json`` (``trainer.speed_choice.MEASURED_FILE``), with this machine and the date:
what ``train.compile`` and ``train.channels_last`` left unset choose on the CPU. Time it with a fresh
inductor cache (``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``), or the compile times read as none.

    python -m benchmarks.bench_cpu --npz cifar10-mini-train.npz --out benchmarks/results/cpu.json --write-defaults
    python -m benchmarks.bench_cpu --models cnn resnet20 --rules bp dfa drtp tpsgd --quick
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

if not __package__:  # run as a file (python benchmarks/bench_cpu.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (cifar_data, cycle, environment, make_console, session_steps, sync, table,
                                 time_interleaved, write_results)
from trainer.data import NormStats, load_images
from trainer.models import build_model
from trainer.recipes import load_recipe
from trainer.session import build_session, planned_images
from trainer.speed_choice import MEASURED_FILE, Measured, choose_channels_last, choose_compile

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MODELS = {  # model -> (recipe, its batch, whether it reads CIFAR images)
    "cnn": ("quickstart.toml", 128, False),
    "resnet20": ("cifar10_resnet20_bp.toml", 128, True),
    "resnet18": ("cifar10_resnet18_bp.toml", 128, True),
    "vit": ("mnist5k_vit_bp.toml", 256, False),
}
RULES = ["bp", "dfa", "bdfa", "drtp", "tpsgd", "rec_lra", "trace_bp"]
LOOP_NAMES = {"eager": "eager", "nhwc": "channels_last", "compiled": "compiled", "nhwc_compiled": "both"}
AUTO_EPOCHS = 10  # the run length the "auto" column is priced at (compile time included)
RULE_SETTINGS = {"drtp": ["rule.granularity=\"block\""], "tpsgd": ["rule.granularity=\"block\""]}


def plain_loop(recipe: Any, batch: int) -> Callable[[], None]:
    """The reference: the textbook eager PyTorch BP loop on the recipe's images and model."""
    images = load_images(recipe.data)[0]
    stats = NormStats.of(images.x)
    x_all = images.x.float() / 255
    if x_all.dim() == 3:
        x_all = x_all[:, None]
    mean = torch.tensor(stats.mean).view(1, -1, 1, 1)
    std = torch.tensor(stats.std).view(1, -1, 1, 1)
    x_all, y_all = (x_all - mean) / std, images.y
    model = build_model(recipe.model, tuple(x_all.shape[1:]), int(y_all.max()) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss()

    def epoch_batches(epoch: int):
        order = torch.randperm(len(y_all))
        for i in range(len(order) // batch):
            index = order[i * batch : (i + 1) * batch]
            yield x_all[index], y_all[index]

    batches = cycle(epoch_batches)
    model.train()

    def step() -> None:
        x, y = next(batches)
        criterion(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_loop(recipe: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    """The trainer's session: a training step (its loader with on-device augmentation, rule,
    optimizer and schedule), and one evaluation batch (a compiled model compiles again for it)."""
    session = build_session(recipe)
    session.rule.train()
    steps = session_steps(session)
    x_eval = next(iter(session.data.train.batches(0)))[0]

    def step() -> None:
        next(steps)

    def evaluate() -> None:
        session.rule.eval()
        with torch.no_grad():
            session.rule(x_eval)
        session.rule.train()

    return step, evaluate


def seconds(call: Callable[[], None], count: int = 1) -> float:
    """The wall time of ``count`` calls (a compiled loop compiles in its first ones)."""
    sync("cpu")
    start = time.perf_counter()
    for _ in range(count):
        call()
    return time.perf_counter() - start


def auto_choice(model: str, rule: str, rate: dict[str, float], compile_s: float, images: int) -> dict[str, Any]:
    """What unset ``train.channels_last`` and ``train.compile`` would choose from this row alone for a
    run of ``images`` training images, and that run's images/s with the compile time counted."""
    table = {(model, rule): Measured(rate["eager"], rate["nhwc"], rate["compiled"], rate["nhwc_compiled"], compile_s)}
    layout = choose_channels_last(None, "cpu", model, rule, table=table)[0]
    compiled = choose_compile(None, "cpu", model, rule, images, layout, table)[0]
    loop = {(False, False): "eager", (True, False): "nhwc", (False, True): "compiled", (True, True): "nhwc_compiled"}
    name = loop[(layout, compiled)]
    seconds = images / rate[name] + (compile_s if compiled else 0.0)
    return {"auto_loop": name, "auto_images_per_s": images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, help="CIFAR images (x uint8 N x 32 x 32 x 3, y labels) for the ResNets")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rules", nargs="+", default=RULES)
    parser.add_argument("--bp-only", nargs="*", default=["resnet18", "vit"],
                        help="models measured for bp alone (the rules' table is for the others)")
    parser.add_argument("--steps", type=int, default=6, help="timed interleaved steps of each loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the compile")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="2 timed steps, batch 16: a smoke run")
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .csv)")
    parser.add_argument("--write-defaults", action="store_true",
                        help="write the rows into trainer/cpu_speed.json, what unset compile and channels_last choose from")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 2 if args.quick else args.steps
    console = make_console(180)
    data = cifar_data(args.npz, None, Path(tempfile.gettempdir()) / "bpfree-bench" / "synthetic-cifar10.npz")
    rows: list[dict[str, Any]] = []
    for model in args.models:
        recipe_file, batch, cifar = MODELS[model]
        batch = 16 if args.quick else batch
        rules = ["bp"] if model in args.bp_only else args.rules
        base = [*(data.overrides if cifar else []), f"train.batch_size={batch}", 'train.device="cpu"', "train.amp=false"]
        plain = plain_loop(load_recipe(RECIPES / recipe_file, base), batch)
        for rule in rules:
            overrides = [*base, f"rule.name={json.dumps(rule)}", *RULE_SETTINGS.get(rule, [])]
            try:
                eager, eager_eval = trainer_loop(load_recipe(RECIPES / recipe_file, [*overrides, "train.compile=false"]))
                nhwc, _ = trainer_loop(load_recipe(RECIPES / recipe_file,
                                                   [*overrides, "train.compile=false", "train.channels_last=true"]))
                compiled, compiled_eval = trainer_loop(load_recipe(RECIPES / recipe_file,
                                                                   [*overrides, "train.compile=true",
                                                                    "train.channels_last=false"]))
                nhwc_compiled, nhwc_compiled_eval = trainer_loop(load_recipe(
                    RECIPES / recipe_file, [*overrides, "train.compile=true", "train.channels_last=true"]))
            except Exception as err:  # noqa: BLE001 -- a rule this model cannot take is a row, not a crash
                rows.append({"model": model, "rule": rule, "batch": batch, "error": f"{type(err).__name__}: {err}"})
                console.print(f"[yellow]{model} {rule}: {err}[/]")
                continue
            eager_eval_s = min(seconds(eager_eval) for _ in range(2))
            first = {name: (seconds(loop, 2), seconds(evaluate) - eager_eval_s)
                     for name, loop, evaluate in [("compiled", compiled, compiled_eval),
                                                  ("nhwc_compiled", nhwc_compiled, nhwc_compiled_eval)]}
            loops = {"plain": plain, "eager": eager, "nhwc": nhwc, "compiled": compiled,
                     "nhwc_compiled": nhwc_compiled}
            times = time_interleaved(loops, "cpu", warmup=args.warmup, repeats=steps)
            rate = {name: 1000 * batch / t.median_ms for name, t in times.items()}
            step_s = {name: t.median_ms / 1000 for name, t in times.items()}
            compile_s, nhwc_compile_s = (max(train - 2 * step_s[name], 0.0) + max(evaluate, 0.0)  # both graphs
                                         for name, (train, evaluate) in first.items())
            saved = step_s["eager"] - step_s["compiled"]
            row = {"model": model, "rule": rule, "batch": batch,
                   **{f"images_per_s_{name}": r for name, r in rate.items()},
                   **{f"spread_{name}": t.spread for name, t in times.items()},
                   "eager_over_plain": rate["eager"] / rate["plain"], "nhwc_over_plain": rate["nhwc"] / rate["plain"],
                   "compiled_over_plain": rate["compiled"] / rate["plain"],
                   "nhwc_compiled_over_plain": rate["nhwc_compiled"] / rate["plain"],
                   "compiled_over_eager": rate["compiled"] / rate["eager"], "compile_s": compile_s,
                   "nhwc_compile_s": nhwc_compile_s,
                   "break_even_steps": compile_s / saved if saved > 0 else math.inf}
            recipe = load_recipe(RECIPES / recipe_file, overrides)
            images = AUTO_EPOCHS * planned_images(recipe) // recipe.train.epochs  # 10 epochs of its training split
            row.update(auto_choice(model, rule, rate, max(compile_s, nhwc_compile_s), images))
            row["auto_over_plain"] = row["auto_images_per_s"] / rate["plain"]
            rows.append(row)
            console.print(f"{model} {rule}: plain {rate['plain']:.0f}, eager {rate['eager']:.0f}, channels_last "
                          f"{rate['nhwc']:.0f}, compiled {rate['compiled']:.0f}, both {rate['nhwc_compiled']:.0f} img/s, "
                          f"compile {compile_s:.0f} / {nhwc_compile_s:.0f} s")
    result = table(f"training images/s on the CPU ({args.threads} threads), median of {steps} interleaved steps",
                   ["model", "rule", "batch", "plain BP", "trainer eager", "trainer channels_last",
                    "trainer compiled", "compiled channels_last", "eager / plain", "channels_last / plain",
                    "compiled / plain", "both / plain", "compile s", f"auto ({AUTO_EPOCHS} epochs) / plain"],
                   left={"model", "rule"})
    for r in rows:
        if "error" in r:
            result.add_row(r["model"], r["rule"], str(r["batch"]), *["—"] * 10, r["error"][:40])
            continue
        result.add_row(r["model"], r["rule"], str(r["batch"]), f"{r['images_per_s_plain']:.0f}",
                       f"{r['images_per_s_eager']:.0f}", f"{r['images_per_s_nhwc']:.0f}",
                       f"{r['images_per_s_compiled']:.0f}", f"{r['images_per_s_nhwc_compiled']:.0f}",
                       f"{r['eager_over_plain']:.2f}x", f"{r['nhwc_over_plain']:.2f}x",
                       f"{r['compiled_over_plain']:.2f}x", f"{r['nhwc_compiled_over_plain']:.2f}x",
                       f"{r['compile_s']:.0f} / {r['nhwc_compile_s']:.0f}",
                       f"{LOOP_NAMES[r['auto_loop']]} {r['auto_over_plain']:.2f}x")
    console.print(result)
    meta = {**environment("cpu"), "data": data.description, "threads": args.threads, "steps": steps}
    write_results(args.out, meta, {"loops": rows}, {}, console)
    if args.write_defaults:
        write_measured(rows, meta, args)
        console.print(f"wrote {MEASURED_FILE}")


def write_measured(rows: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> None:
    """The rows as ``trainer.speed_choice``'s measurements: images/s eager and compiled in each
    layout and the compile time (the larger layout's), with where, when and how they were taken."""
    measured = [{"model": r["model"], "rule": r["rule"], "eager": round(r["images_per_s_eager"]),
                 "channels_last": round(r["images_per_s_nhwc"]), "compiled": round(r["images_per_s_compiled"]),
                 "compiled_channels_last": round(r["images_per_s_nhwc_compiled"]),
                 "compile_s": round(max(r["compile_s"], r["nhwc_compile_s"]), 1)} for r in rows if "error" not in r]
    about = json.loads(MEASURED_FILE.read_text())["about"]
    MEASURED_FILE.write_text(json.dumps({"about": about, "measured": {
        "date": meta["date"][:10], "machine": f"{meta['device_name']}, {args.threads} threads, torch {meta['torch']}",
        "command": meta["command"], "batch": "per model: bench_cpu's MODELS"}, "rows": measured}, indent=1) + "\n")


if __name__ == "__main__":
    main()
