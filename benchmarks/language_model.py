"""The language-model table: bp, dfa, bdfa and hybrid on a word-level corpus at one budget, by
``examples/language_model.py`` (a 2-block transformer trained through ``rule.prepare()``).

    python -m benchmarks.language_model prepare WT2_DIR data/wikitext2-articles   # see below
    python -m benchmarks.language_model run --data data/wikitext2-articles --epochs 3 --seeds 0 1 2
    python -m benchmarks.language_model time --data data/wikitext2-articles     # interleaved step time
    python -m benchmarks.language_model table [--markdown]

``run`` trains every (rule, seed) not yet in ``--out`` (RULE/seedN.json, the example's last line;
its printed epochs beside it as RULE/seedN.log), seed by seed so that a session that ends early
leaves whole seeds. ``time`` builds each rule over one model and times its training step (forward,
backward, Adam) on one fixed window, the rules' steps alternating, so a change in the machine's
load hits all alike. ``table`` writes table.csv and table.json: validation and test perplexity
(mean ± sd over seeds), each rule's validation perplexity over BP's, and the step times.

The corpus: the example reads a folder of train.txt, valid.txt and test.txt. With WikiText-2's
three files, pass that folder. ``prepare`` makes such a folder out of WikiText-2's validation and
test files alone (the 122 Wikipedia articles they hold, split by article: every tenth to valid,
the next to test, the rest to train, about 80 / 10 / 10 % of 460,000 tokens), for a machine that
has those two files only; its perplexities are not comparable with published WikiText-2 figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/language_model.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks._harness import environment, make_console, table, time_interleaved, write_csv, write_json

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "language_model.py"
RESULTS = Path("benchmarks/results/language_model")
RULES = ("bp", "dfa", "bdfa", "hybrid")


def articles(path: Path) -> list[list[str]]:
    """The lines of a WikiText file grouped by article: an article begins at a top-level heading
    (`` = Title = ``, one '=' a side; sections have two or more)."""
    groups: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf8").splitlines(keepends=True):
        words = line.split()
        heading = len(words) >= 3 and words[0] == words[-1] == "=" and words[1] != "="
        if heading and any(text.strip() for text in groups[-1]):
            groups.append([])
        groups[-1].append(line)
    return groups


def prepare(source: Path, out: Path) -> dict[str, int]:
    """Split the articles of ``source``'s valid.txt and test.txt into ``out``'s train, valid and
    test files (article i: i % 10 == 0 to valid, 1 to test, else train); returns each file's words."""
    pool = [a for name in ("valid.txt", "test.txt") for a in articles(source / name)]
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for index, article in enumerate(pool):
        splits["valid" if index % 10 == 0 else "test" if index % 10 == 1 else "train"].extend(article)
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        (out / f"{name}.txt").write_text("".join(lines), encoding="utf8")
    return {name: sum(len(line.split()) for line in lines) for name, lines in splits.items()}


def run(args: argparse.Namespace) -> None:
    console = make_console()
    for seed in args.seeds:
        for rule in args.rules:
            target = args.out / rule / f"seed{seed}.json"
            if target.exists():
                continue
            command = [sys.executable, str(EXAMPLE), "--data", str(args.data), "--rule", rule, "--epochs",
                       str(args.epochs), "--seed", str(seed), *args.example]
            console.print(f"[bold]{rule} seed {seed}[/]: {' '.join(command[1:])}")
            target.parent.mkdir(parents=True, exist_ok=True)
            lines = []
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
                for line in process.stdout:
                    print(line, end="", flush=True)
                    lines.append(line)
            if process.returncode != 0:
                sys.exit(f"{rule} seed {seed} failed (exit {process.returncode}); its output is above")
            target.with_suffix(".log").write_text("".join(lines[:-1]))
            write_json(target, {**json.loads(lines[-1]), "command": " ".join(command[1:])})


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("language_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_steps(args: argparse.Namespace) -> None:
    """Each rule's training step on one fixed (batch, bptt) window of the training file."""
    example, console = load_example(), make_console()
    corpus = example.Corpus(args.data)
    window = example.batchify(corpus.train, args.batch_size)[:, : args.bptt + 1]
    x, y = window[:, :-1], window[:, 1:]
    vocab, steps = len(corpus.words), {}
    for rule in args.rules:
        torch.manual_seed(0)
        model = example.TransformerLM(vocab)
        net = example.rule_for(rule, model, x[:2], 0).prepare()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

        def step(net=net, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x).reshape(-1, vocab), y.reshape(-1)).backward()
            optimizer.step()

        steps[rule] = step
    timings = time_interleaved(steps, "cpu", warmup=2, repeats=args.repeats)
    rows = [{"rule": rule, "step_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
             "vs_bp": t.median_ms / timings["bp"].median_ms if "bp" in timings else None}
            for rule, t in timings.items()]
    write_json(args.out / "step_time.json", {"environment": environment("cpu"), "vocab": vocab,
                                             "batch_size": args.batch_size, "bptt": args.bptt, "rows": rows})
    shown = table(f"training step, batch {args.batch_size} x {args.bptt} tokens, vocabulary {vocab:,}",
                  ["rule", "median ms", "p20–p80 ms", "× BP"])
    for row in rows:
        shown.add_row(row["rule"], f"{row['step_ms']:.0f}", f"{row['p20_ms']:.0f}–{row['p80_ms']:.0f}",
                      f"{row['vs_bp']:.2f}" if row["vs_bp"] else "")
    console.print(shown)


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def make_table(args: argparse.Namespace) -> None:
    timing_file = args.out / "step_time.json"
    timed = {row["rule"]: row for row in json.loads(timing_file.read_text())["rows"]} if timing_file.exists() else {}
    runs = {rule: [json.loads(p.read_text()) for p in sorted((args.out / rule).glob("seed*.json"))] for rule in RULES}
    runs = {rule: results for rule, results in runs.items() if results}  # a rule still training has none yet
    bp_valid = statistics.mean(r["valid_ppl"] for r in runs["bp"]) if runs.get("bp") else None
    rows = []
    for rule, results in runs.items():
        valid = [r["valid_ppl"] for r in results]
        rows.append({
            "rule": rule, "seeds": len(results), "epochs": results[0]["epochs"],
            "valid_ppl": mean_sd(valid), "test_ppl": mean_sd([r["test_ppl"] for r in results]),
            "valid_vs_bp": round(statistics.mean(valid) / bp_valid, 2) if bp_valid else None,
            "train_step_ms": round(statistics.mean(r["step_ms"] for r in results)),
            "interleaved_step_ms": round(timed[rule]["step_ms"]) if rule in timed else None,
            "interleaved_vs_bp": round(timed[rule]["vs_bp"], 2) if rule in timed else None,
        })
    write_csv(args.out / "table.csv", rows)
    write_json(args.out / "table.json", rows)
    columns = list(rows[0]) if rows else []
    if args.markdown:
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |")
        return
    shown = table("language model: validation and test perplexity", columns)
    for row in rows:
        shown.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    make_console().print(shown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("prepare", help="a train/valid/test folder from WikiText-2's valid.txt and test.txt")
    made.add_argument("source", type=Path)
    made.add_argument("folder", type=Path)
    for name in ("run", "time", "table"):
        sub = commands.add_parser(name)
        sub.add_argument("--out", type=Path, default=RESULTS)
        if name != "table":
            sub.add_argument("--data", type=Path, required=True)
            sub.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    commands.choices["run"].add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    commands.choices["run"].add_argument("--epochs", type=int, default=3)
    commands.choices["run"].add_argument("example", nargs="*", help="more options for the example, after --")
    commands.choices["time"].add_argument("--batch-size", type=int, default=20)
    commands.choices["time"].add_argument("--bptt", type=int, default=35)
    commands.choices["time"].add_argument("--repeats", type=int, default=15)
    commands.choices["table"].add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if not all((args.source / f).is_file() for f in ("valid.txt", "test.txt")):
            parser.error(f"{args.source}: needs WikiText-2's valid.txt and test.txt")
        words = prepare(args.source, args.folder)
        print(f"{args.folder}: " + ", ".join(f"{name} {count:,} words" for name, count in words.items()))
    elif args.command == "run":
        run(args)
    elif args.command == "time":
        time_steps(args)
    else:
        make_table(args)


if __name__ == "__main__":
    main()
