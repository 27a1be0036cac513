"""Every rule on the same data for the same budget: held-out accuracy, images/s, memory.

Each run is a separate `trainer run` process, so peak memory (CUDA max allocated, or the
process's peak RSS on a CPU) belongs to that run alone. Writes a CSV of the table, a JSON of
the per-epoch curves and, when matplotlib is installed (`pip install -e ".[plot]"`), a PNG of
the held-out accuracy curves (mean over seeds).

Short budgets on small held-out sets are noisy (466 held-out images: ±2.3 points of sampling error
alone), so ``--seeds 0 1 2`` trains every rule once per seed (the held-out split stays fixed by
``data.split_seed``) and reports mean ± standard deviation. ``--jobs N`` runs N trainings at once,
each with ``OMP_NUM_THREADS = cores / N`` unless that is set (for CPU machines and one-GPU jobs).
``--reuse`` reads the runs that already finished in ``--out`` with the same recipe, so an interrupted
comparison, or one that adds seeds or rules, trains only what is missing. ``--recipe FILE`` adds a
recipe of your own, e.g. one whose ``[rule] name`` is a ``python:`` rule (imported from the working
directory), labelled by its file name.

The cifar suite trains on ``--npz`` (split into train and held-out), else on torchvision's CIFAR-10
under ``--cifar-root`` (default data/cifar10, the recipes' root) when it is there, else on synthetic
CIFAR-shaped images written to ``--out`` (speed and memory hold, accuracy means nothing); the table
title and every CSV row say which.

    python -m benchmarks.compare_rules --suite mnist5k --epochs 8 --out bench_out/mnist5k
    python -m benchmarks.compare_rules --suite cifar --npz path/to/cifar10-train.npz \
        --epochs 4 --seeds 0 1 2 --jobs 2 --out bench_out/cifar
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.markup import escape

if not __package__:  # run as a file (python benchmarks/compare_rules.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import cifar_data, make_console, table, write_csv, write_json
from trainer.config import ConfigError
from trainer.recipes import load_recipe
from trainer.runs import intact_records

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

ADAMW = ['optim.name="adamw"', "optim.lr=0.001"]  # the weight-transport recipes' optimizer, on the bp recipe
BIOTORCH_RESNET20 = 'model.name="python:benchmarks.biotorch_models:resnet20"'

# (label, recipe, extra overrides): the rules' own recipes, so each runs with its tuned settings.
SUITES: dict[str, list[tuple[str, str, list[str]]]] = {
    "mnist5k": [
        ("bp", "quickstart", []),
        ("dfa", "mnist5k_dfa", []),
        ("bdfa", "mnist5k_bdfa", []),
        ("drtp", "mnist5k_drtp", []),
        ("tpsgd", "mnist5k_tpsgd", []),
        ("lra (mlp)", "mnist5k_lra", []),
        ("rec_lra", "mnist5k_rec_lra", []),
        ("trace_bp r=16", "mnist5k_trace_bp", []),
        ("fa", "mnist5k_fa", []),
        ("usf", "mnist5k_usf", []),
        ("brsf", "mnist5k_brsf", []),
        ("frsf", "mnist5k_frsf", []),
        ("kp", "mnist5k_kp", []),
        ("sdfa", "mnist5k_dfa", ["rule.name=sdfa"]),
        ("shallow", "quickstart", ["rule.name=shallow", "rule.granularity=layer"]),
    ],
    "cifar": [
        ("bp", "cifar10_resnet18_bp", []),
        ("dfa", "cifar10_resnet18_dfa", []),
        ("bdfa", "cifar10_resnet18_bdfa", []),
        ("hybrid dfa+bp", "cifar10_resnet18_hybrid", []),
        ("tpsgd", "cifar10_resnet18_tpsgd", []),
        ("rec_lra", "cifar10_resnet18_rec_lra", []),
        ("rec_lra (stages)", "cifar10_resnet18_rec_lra_stages", []),
        ("trace_bp r=4", "cifar10_resnet18_trace_bp", ["rule.probes=4"]),
        ("trace_bp r=16", "cifar10_resnet18_trace_bp", ["rule.probes=16"]),
        ("trace_bp r=64", "cifar10_resnet18_trace_bp", ["rule.probes=64"]),
    ],
    # biotorch's benchmark: CIFAR ResNet-20 with each weight-transport rule (its own hyper-parameters)
    "biotorch": [
        ("bp", "cifar10_resnet20_bp", []),
        ("fa", "cifar10_resnet20_fa", []),
        ("dfa", "cifar10_resnet20_dfa", []),
        ("usf", "cifar10_resnet20_usf", []),
        ("brsf", "cifar10_resnet20_brsf", []),
        ("frsf", "cifar10_resnet20_frsf", []),
        ("kp", "cifar10_resnet20_kp", []),
        ("sdfa", "cifar10_resnet20_dfa", ["rule.name=sdfa"]),
        # the DFA recipe's data and AdamW, which the bp recipe gets from ADAMW (DFA's [rule] keys are not shallow's)
        ("shallow", "cifar10_resnet20_bp", [*ADAMW, "rule.name=shallow", "rule.granularity=block"]),
    ],
    # the weight-transport rules here and in biotorch 0.0.16, on the same split, augmentation, AdamW 1e-3
    # and schedule: biotorch's own ResNet-20 (benchmarks/biotorch_models.py; PYTHONPATH must hold
    # biotorch) trained by plain autograd, beside ours as shipped, with biotorch's option-A shortcuts, and
    # with its Xavier-uniform weights too
    "biotorch-side-by-side": [
        *[(f"{rule} · biotorch", "cifar10_resnet20_bp", [*ADAMW, BIOTORCH_RESNET20, f"model.kwargs={{mode={rule!r}}}"])
          for rule in ("fa", "usf")],
        ("fa", "cifar10_resnet20_fa", []),
        ("usf", "cifar10_resnet20_usf", []),
        *[(f"{rule} · biotorch", "cifar10_resnet20_bp", [*ADAMW, BIOTORCH_RESNET20, f"model.kwargs={{mode={mode!r}}}"])
          for rule, mode in (("bp", "backpropagation"), ("brsf", "brsf"), ("frsf", "frsf"))],
        ("bp", "cifar10_resnet20_bp", ADAMW),
        ("brsf", "cifar10_resnet20_brsf", []),
        ("frsf", "cifar10_resnet20_frsf", []),
        ("usf · s = std(W)", "cifar10_resnet20_usf", ['rule.feedback_init="match"']),
        *[(f"{rule} · R xavier-uniform", f"cifar10_resnet20_{rule}", ['rule.feedback_init="xavier_uniform"'])
          for rule in ("brsf", "frsf")],
        ("fa · pad shortcuts", "cifar10_resnet20_fa", ['model.cifar_shortcut="pad"']),
        ("usf · pad shortcuts", "cifar10_resnet20_usf", ['model.cifar_shortcut="pad"']),
        ("usf · pad shortcuts · xavier W", "cifar10_resnet20_usf", ['model.cifar_shortcut="pad"',
                                                                    'model.weight_init="xavier"']),
    ],
    # a vision transformer on mnist5k: BP against DFA between its blocks
    "vit": [
        ("bp", "mnist5k_vit_bp", []),
        ("dfa (class token)", "mnist5k_vit_dfa", []),
        ("dfa (all tokens)", "mnist5k_vit_dfa", ["rule.token_feedback=all"]),
    ],
    # torchvision's zoo on CIFAR images: VGG-11 by DFA, MobileNetV3 by tpSGD, each beside BP
    "zoo": [
        ("vgg11_bn bp", "cifar10_vgg11_bp", []),
        ("vgg11_bn dfa", "cifar10_vgg11_dfa", []),
        ("mobilenet_v3 bp", "cifar10_mobilenet_v3_bp", []),
        ("mobilenet_v3 tpsgd", "cifar10_mobilenet_v3_tpsgd", []),
    ],
}
CIFAR_SUITES = ("cifar", "biotorch", "biotorch-side-by-side", "zoo")  # trained on CIFAR images: --npz, --cifar-root or synthetic


def finished_run(out: Path, recipe: Path, overrides: list[str]) -> dict | None:
    """The results in ``out`` if a run of exactly this recipe (after overrides) finished there."""
    if not (out / "results.json").exists():
        return None
    if load_recipe(out / "recipe.toml").to_dict() != load_recipe(recipe, overrides).to_dict():
        return None
    return json.loads((out / "results.json").read_text())


def run_one(label: str, recipe: str, seed: int, overrides: list[str], out: Path, env: dict[str, str],
            reuse: bool = False) -> dict:
    """Train one configuration with one seed in its own process; return its results and curve.

    With ``reuse``, a finished run of the same recipe in ``out`` is read instead of trained again
    (its ``wall_s`` is then the sum of its epochs' training times, not this call's)."""
    path = Path(recipe) if recipe.endswith(".toml") else RECIPES / f"{recipe}.toml"  # a file, or a built-in's name
    items = [*overrides, f"train.seed={seed}"]
    results = finished_run(out, path, items) if reuse else None
    row = {"label": label, "recipe": recipe, "seed": seed}
    if results is None:
        command = [sys.executable, "-m", "trainer", "run", str(path), "--out", str(out)]
        for item in items:
            command += ["--set", item]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        row["wall_s"] = time.perf_counter() - start
        if done.returncode != 0:
            return {**row, "error": done.stderr.strip().splitlines()[-1:]}
        results = json.loads((out / "results.json").read_text())
    try:
        curve = [r for r in intact_records(out) if r.get("split") != "train"]
    except ConfigError as err:  # a damaged metrics.jsonl: this seed's row says so, the others go on
        return {**row, "error": [str(err)]}
    row.setdefault("wall_s", sum(r["train_seconds"] for r in curve))
    return {**results, **row, "curve": [(r["epoch"], r.get("accuracy")) for r in curve]}


def summarize(label: str, recipe: str, runs: list[dict]) -> dict:
    """One rule over its seeds: mean ± sd of the final accuracy, per-seed values, the mean curve."""
    done = [r for r in runs if "error" not in r]
    summary = {"label": label, "recipe": recipe, "seeds": [r["seed"] for r in runs], "runs": runs,
               "errors": [f"seed {r['seed']}: {' '.join(r['error'])}" for r in runs if "error" in r]}  # fmt: skip
    if not done:
        return summary
    accuracy = [r["accuracy"] for r in done]
    by_epoch: dict[int, list[float]] = {}
    for r in done:
        for epoch, acc in r["curve"]:
            if acc is not None:
                by_epoch.setdefault(epoch, []).append(acc)
    return {**summary, "accuracy": statistics.fmean(accuracy), "accuracy_per_seed": accuracy,
            "accuracy_sd": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "images_per_s": statistics.fmean(r["images_per_s"] for r in done),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in done), "rule_state_mb": done[0]["rule_state_mb"],
            "wall_s": sum(r["wall_s"] for r in done),
            "curve": [(e, statistics.fmean(v)) for e, v in sorted(by_epoch.items()) if len(v) == len(done)]}  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if "curve" in row:
            epochs, accuracy = zip(*[(e, 100 * a) for e, a in row["curve"] if a is not None])
            ax.plot(epochs, accuracy, marker="o", label=row["label"])
    ax.set(xlabel="epoch", ylabel="held-out accuracy (%)", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--epochs", type=int, required=True, help="the same budget for every rule")
    parser.add_argument("--npz", type=Path, help="cifar suite: the .npz of CIFAR images to split and train on")
    parser.add_argument("--cifar-root", type=Path, help="cifar suite: torchvision's CIFAR-10 folder (default data/cifar10)")
    parser.add_argument("--recipe", action="append", default=[], metavar="FILE",
                        help="a recipe file of your own to run beside the suite's, labelled by its file name "
                             "(e.g. a python: rule's; repeatable)")
    parser.add_argument("--rules", help="comma-separated labels to run (default: the whole suite and every --recipe)")
    parser.add_argument("--set", action="append", default=[], help="an override for every run, e.g. train.batch_size=64")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values; each rule runs once per seed")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (CPU threads are split among them)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true",
                        help="read runs already finished in --out with the same recipe instead of training them again")
    args = parser.parse_args()
    entries = [*SUITES[args.suite], *((Path(recipe).stem, recipe, []) for recipe in args.recipe)]
    if args.rules:
        wanted = {r.strip() for r in args.rules.split(",")}
        entries = [e for e in entries if e[0] in wanted]
    for item in args.set:
        key = item.split("=", 1)[0].strip()
        flag = {"train.seed": "--seeds", "train.epochs": "--epochs"}.get(key)
        if flag:
            parser.error(f"--set {key}=… conflicts with {flag} (one of them would silently win); use {flag}")
    args.out.mkdir(parents=True, exist_ok=True)
    console = make_console(140)
    data, data_overrides = "the recipes' own", []
    if args.suite in CIFAR_SUITES:
        chosen = cifar_data(args.npz, args.cifar_root, args.out / "synthetic-cifar10.npz")
        data, data_overrides = chosen.description, list(chosen.overrides)
        if "data.name=npz" in data_overrides:  # an .npz has no test split: hold out 10 %
            data_overrides.append("data.val_fraction=0.1")
        console.print(f"data: {data}")
    common = [f"train.epochs={args.epochs}", *data_overrides, *args.set]
    env = dict(os.environ)
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    jobs = [(label, recipe, seed, [*common, *overrides]) for label, recipe, overrides in entries for seed in args.seeds]

    def launch(job: tuple[str, str, int, list[str]]) -> dict:
        label, recipe, seed, overrides = job
        folder = args.out / label.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "")
        console.print(f"[bold]{label}[/] ({recipe}, seed {seed}) …")
        out = folder / f"seed{seed}" if len(args.seeds) > 1 else folder
        return run_one(label, recipe, seed, overrides, out, env, args.reuse)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(launch, jobs))
    rows = [summarize(label, recipe, [r for r in runs if r["label"] == label]) for label, recipe, _ in entries]

    seeds = ", ".join(map(str, args.seeds))
    result = table(f"{args.suite}: {args.epochs} epochs each, seed{'s' if len(args.seeds) > 1 else ''} {seeds}; "
                   f"data: {data}", ["rule", "recipe", "held-out acc", "per seed", "images/s", "peak MB",
                                     "feedback/rule state MB", "wall s"], left={"recipe", "per seed"})
    for r in rows:
        if "accuracy" not in r:
            result.add_row(r["label"], r["recipe"], escape("failed: " + "; ".join(r["errors"])), "", "", "", "", "")
            continue
        spread = f" ± {100 * r['accuracy_sd']:.2f}" if len(r["accuracy_per_seed"]) > 1 else ""
        result.add_row(r["label"], r["recipe"], f"{100 * r['accuracy']:.2f}%{spread}",
                       " ".join(f"{100 * a:.1f}" for a in r["accuracy_per_seed"]) + (" (+failures)" if r["errors"] else ""),
                       f"{r['images_per_s']:,.0f}", f"{r['peak_memory_mb']:,.0f}", f"{r['rule_state_mb']:.2f}",
                       f"{r['wall_s']:.0f}")  # fmt: skip
    columns = ("accuracy", "images_per_s", "peak_memory_mb", "rule_state_mb", "wall_s")
    write_csv(args.out / "results.csv", [{"rule": r["label"], "recipe": r["recipe"], "seed": r["seed"],
                                          **{key: r.get(key, "") for key in columns},
                                          "error": " ".join(r.get("error", [])), "data": data} for r in runs])
    write_json(args.out / "curves.json", rows)
    console.print(result)
    if plot(rows, args.out / "accuracy.png", f"{args.suite}: held-out accuracy, {args.epochs} epochs, seeds {seeds}"):
        console.print(f"curves: {args.out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
