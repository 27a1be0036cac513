"""The full-CIFAR table: every rule on ResNet-20 with all 50,000 CIFAR-10 training images (45,000 to
train, 5,000 held out for validation, ``data.split_seed = 0``), one budget for all, beside biotorch's
published ResNet-20 figures.

    python -m benchmarks.full_cifar run --jobs 2                    # train what is missing, resume the rest
    python -m benchmarks.full_cifar run --rules bp,dfa --seeds 0    # ... only these
    python -m benchmarks.full_cifar table [--markdown]              # the table from the published runs

``run`` trains each (rule, seed) of ``ROWS`` that has not finished in ``--runs`` (RULE/seedN), each as
its own ``trainer run`` of ``recipes/cifar10full_resnet20_RULE.toml``; a run with a checkpoint and no
results is continued with ``--resume`` (a session that ends mid-run loses at most one epoch). Every
finished run is published at once into ``--results``: its results.json, metrics.jsonl and recipe.toml
(RULE/seedN/), and for seed 0 the exported model (RULE.pt, ``trainer export``), which ``trainer eval
RULE.pt --data npz:FILE`` checks. ``--set`` overrides go to every run (and so into its recipe.toml).

``table`` reads ``--results`` alone: the last epoch's validation accuracy (mean ± sd over seeds), the
seconds per epoch and in all, images/s and peak memory as the runs logged them (runs that shared the
machine's cores with another training show it in their times: the table's caption says how many ran
at once), and biotorch's published test accuracy (its README: 100 − top-1 error, 250 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/full_cifar.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import make_console, table, write_csv, write_json

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RESULTS = Path(__file__).resolve().parent / "results" / "cifar10_resnet20"


@dataclass(frozen=True)
class Row:
    rule: str  # the row's name: recipes/cifar10full_resnet20_RULE.toml, and RULE.pt
    seeds: tuple[int, ...]
    biotorch_sgd: float | None = None  # biotorch's published ResNet-20 test accuracy (%)
    biotorch_adam: float | None = None


ROWS = [  # the claims read bp, dfa, rec_lra, usf and kp: three seeds each
    Row("bp", (0, 1, 2), 90.58, 89.73),
    Row("dfa", (0, 1, 2), 60.65, 62.30),
    Row("usf", (0, 1, 2), 84.99, 89.44),
    Row("kp", (0, 1, 2)),
    Row("rec_lra", (0, 1, 2)),
    Row("rec_lra_stages", (0,)),
    Row("fa", (0,), 63.62, 70.84),
    Row("brsf", (0,), 85.05, 88.76),
    Row("frsf", (0,), 83.06, 88.71),
    Row("sdfa", (0,)),
    Row("hybrid", (0,)),
    Row("bdfa", (0,)),
    Row("drtp", (0,)),
    Row("tpsgd", (0,)),
    Row("lra", (0,)),
    Row("trace_bp", (0,)),
    Row("shallow", (0,)),
]


def recipe_path(rule: str) -> Path:
    return RECIPES / f"cifar10full_resnet20_{rule}.toml"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished(folder: Path) -> bool:
    results = read_json(folder / "results.json")
    return results is not None and results.get("state") == "finished"


def publish(rule: str, seed: int, run: Path, results: Path) -> None:
    """Copy a finished run's record into ``results`` (and export seed 0's model beside it)."""
    dest = results / rule / f"seed{seed}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "metrics.jsonl", "recipe.toml"):
        shutil.copy2(run / name, dest / name)
    if seed == 0:
        subprocess.run([sys.executable, "-m", "trainer", "export", str(run), str(results / f"{rule}.pt")], check=True,
                       capture_output=True, text=True)


def train(rule: str, seed: int, run: Path, overrides: list[str], env: dict[str, str]) -> str:
    """Train (or continue) one run to its end; the last line it printed, or '' on success."""
    command = [sys.executable, "-m", "trainer", "run", str(recipe_path(rule)), "--out", str(run),
               "--set", f"train.seed={seed}", *(arg for item in overrides for arg in ("--set", item))]
    if (run / "checkpoint.pt").exists():
        command.append("--resume")
    run.mkdir(parents=True, exist_ok=True)
    with (run.parent / f"seed{seed}.log").open("a") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode == 0:
        return ""
    lines = (run.parent / f"seed{seed}.log").read_text().strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"


def run(args: argparse.Namespace) -> None:
    console = make_console(120)
    wanted = set(args.rules.split(",")) if args.rules else {row.rule for row in ROWS}
    unknown = wanted - {row.rule for row in ROWS}
    if unknown:
        raise SystemExit(f"--rules: unknown {', '.join(sorted(unknown))}; rows: {', '.join(r.rule for r in ROWS)}")
    jobs = [(row.rule, seed) for seed in (0, 1, 2) for row in ROWS
            if row.rule in wanted and seed in row.seeds and (args.seeds is None or seed in args.seeds)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    def one(job: tuple[str, int]) -> None:
        rule, seed = job
        folder = args.runs / rule / f"seed{seed}"
        if not finished(folder):
            console.print(f"{rule} seed {seed}: training in {folder} …")
            failure = train(rule, seed, folder, args.set, env)
            if failure:
                console.print(f"[red]{rule} seed {seed} failed:[/] {failure}")
                return
        publish(rule, seed, folder, args.results)
        console.print(f"{rule} seed {seed}: published to {args.results / rule}")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, jobs))


def summarize(row: Row, results: Path) -> dict[str, Any] | None:
    """One row of the table from its published seeds, or None when none is published."""
    runs = []
    for seed in row.seeds:
        folder = results / row.rule / f"seed{seed}"
        final = read_json(folder / "results.json")
        if final is None:
            continue
        recipe = tomllib.loads((folder / "recipe.toml").read_text())
        runs.append({**final, "seed": seed, "amp": recipe["train"].get("amp") is True})
    if not runs:
        return None
    accuracy = [100 * r["accuracy"] for r in runs]
    epoch_s = [s for r in runs for s in r["epoch_seconds"]]
    return {"rule": row.rule, "seeds": [r["seed"] for r in runs], "epochs": runs[0]["epochs"],
            "accuracy": statistics.fmean(accuracy), "accuracy_sd": statistics.stdev(accuracy) if len(runs) > 1 else None,
            "accuracy_per_seed": accuracy, "epoch_s": statistics.fmean(epoch_s),
            "hours": statistics.fmean(r["train_seconds"] for r in runs) / 3600,
            "images_per_s": statistics.fmean(r["images_per_s"] for r in runs),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in runs), "bf16": all(r["amp"] for r in runs),
            "biotorch_sgd": row.biotorch_sgd, "biotorch_adam": row.biotorch_adam,
            "model": f"{row.rule}.pt" if (results / f"{row.rule}.pt").exists() else None}


def markdown(rows: list[dict[str, Any]], pending: list[str]) -> str:
    head = ("| rule | seeds | validation acc. (%) | s / epoch | hours | images/s | peak MB | bf16 | "
            "biotorch SGD | biotorch Adam | model |\n|---|---|---|---|---|---|---|---|---|---|---|\n")

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = []
    for r in rows:
        spread = "" if r["accuracy_sd"] is None else f" ± {r['accuracy_sd']:.2f}"
        lines.append(f"| {r['rule']} | {len(r['seeds'])} | {r['accuracy']:.2f}{spread} | {r['epoch_s']:.0f} | "
                     f"{r['hours']:.2f} | {r['images_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} | "
                     f"{'yes' if r['bf16'] else 'no'} | {cell(r['biotorch_sgd'])} | {cell(r['biotorch_adam'])} | "
                     f"{r['model'] or '–'} |")
    lines += [f"| {rule} | – | not yet trained | | | | | | | | |" for rule in pending]
    return head + "\n".join(lines)


def show(args: argparse.Namespace) -> None:
    rows, pending = [], []
    for row in ROWS:
        summary = summarize(row, args.results)
        if summary is None:
            pending.append(row.rule)
        else:
            rows.append(summary)
    write_csv(args.results / "table.csv", [{k: v for k, v in r.items() if k != "accuracy_per_seed"} for r in rows])
    write_json(args.results / "table.json", rows)
    if args.markdown:
        print(markdown(rows, pending))
        return
    result = table("ResNet-20, all of CIFAR-10 (45,000 train / 5,000 validation)",
                   ["rule", "seeds", "val acc %", "s/epoch", "hours", "images/s", "peak MB", "bf16", "biotorch SGD",
                    "biotorch Adam"])
    for r in rows:
        spread = "" if r["accuracy_sd"] is None else f" ± {r['accuracy_sd']:.2f}"
        result.add_row(r["rule"], str(len(r["seeds"])), f"{r['accuracy']:.2f}{spread}", f"{r['epoch_s']:.0f}",
                       f"{r['hours']:.2f}", f"{r['images_per_s']:,.0f}", f"{r['peak_memory_mb']:,.0f}",
                       "yes" if r["bf16"] else "no", *(f"{v:.2f}" if v else "–" for v in
                                                        (r["biotorch_sgd"], r["biotorch_adam"])))
    for rule in pending:
        result.add_row(rule, "–", "not yet trained", *[""] * 7)
    make_console(120).print(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="where finished runs are published")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("run", help="train (or resume) every row that has not finished")
    train_parser.add_argument("--runs", type=Path, default=Path("runs/cifar10full"), help="the run folders")
    train_parser.add_argument("--rules", help="comma-separated rows (default: all)")
    train_parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: each row's own)")
    train_parser.add_argument("--jobs", type=int, default=1, help="trainings at once (the cores are split)")
    train_parser.add_argument("--set", action="append", default=[], help="an override for every run")
    table_parser = sub.add_parser("table", help="the table of the published runs")
    table_parser.add_argument("--markdown", action="store_true", help="print it as a markdown table")
    args = parser.parse_args(argv)
    (run if args.command == "run" else show)(args)


if __name__ == "__main__":
    main()
