"""Unit-parallel training on a CPU: S = 2 stage processes of one thread each against one process.

For each model, rule and number of micro-batches M, the parent launches

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m benchmarks.bench_pipeline --worker ...

(gloo, ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in every process, ``train.pipeline_stages
= 2``, ``train.micro_batches = M``, stages balanced by the trainer's own measured unit times), and
next to it one single process of one thread (``--worker`` with ``pipeline_stages = 1``) running the
SAME training: for bp, dfa and rec_lra a step on the whole batch (one baseline per model and rule,
whatever M); for the forward-only rules (drtp, tpsgd), whose pipeline loader gives micro-batches
and updates on each, a step on a micro-batch of batch/M (so their baseline depends on M).

Models and rules (compile = false, amp = false, device = cpu):
- ResNet-18 with the CIFAR stem on CIFAR images: ``--npz`` (x uint8 N x 32 x 32 x 3, y labels), else
  torchvision's CIFAR-10 under data/cifar10 when it is there, else synthetic CIFAR-shaped images
  (same speed and memory; the output says which). Rules bp (pipeline_schedule gpipe and 1f1b), dfa,
  drtp, tpsgd, rec_lra.
- the small ViT of recipes/mnist5k_vit_dfa.toml (patch 7, 4 blocks of width 64) on mnist5k. Rules
  bp (gpipe, 1f1b), dfa, drtp, tpsgd; rec_lra is skipped (the rule refuses a ViT: it is for conv
  nets and ResNets).
Each rule runs with its recipe's settings where the model has one (recipes/cifar10_resnet18_<rule>,
recipes/mnist5k_vit_<rule>); otherwise (drtp on both, tpsgd on the ViT) with the model's DFA recipe
for data, model, optimizer and batch, and the rule's default options, except the units: blocks on
the ResNet and the encoder's children on the ViT, as the DFA recipes cut them. ``--batch`` and
``--vit-batch`` replace the recipes' batch sizes.

What is measured, per run (every rank, reported by the last stage unless said):
- images/s: ``--warmup`` untimed batches, then ``--steps`` timed batches between two
  ``torch.distributed.barrier`` calls (none in the single process); images/s = images trained / seconds.
  A batch is one ``train_step`` for bp, dfa, rec_lra, and M ``train_step`` calls of a micro-batch
  each for drtp and tpsgd, in the pipeline and in their baseline alike.
- efficiency = images/s (S = 2) / (2 x images/s of the one-process baseline): 1 is perfect
  two-process scaling.
- activation memory (MiB), per stage and for the one process: after the timed steps, one more batch
  runs under ``trainer.memory.SavedActivationMeter`` (``benchmarks/_harness.PeakMemory(activations=
  True)``; ``torch.autograd.graph.saved_tensors_hooks``): the PEAK over that batch of the bytes of
  all tensors autograd has saved for backward and not yet released, in this process, each storage
  counted once from its first save until the last graph holding it is freed; parameters and buffers
  of the model and rule are not counted (the metered batch is not timed: the hooks cost time). The
  input batch and a stage's received activations count where an op saves them; not counted:
  gradients, optimizer state, send buffers, and any tensor that no op saves for backward.
- peak RSS (MiB) of each process (``resource.getrusage`` ru_maxrss: the whole process, Python and
  torch included, a high-water mark over its life).

Goals (printed per model): forward-only rules efficiency >= 0.9, DFA >= 0.8, and every local rule
(dfa, drtp, tpsgd, rec_lra) faster with S = 2 than BP's best schedule at the same M.

Default batches: 64 for ResNet-18 (a one-thread BP step of about 1.6 s on this 2-core CPU, 0.8 s at
batch 32; the forward-only micro-batches are 32, 16, 8 at M = 2, 4, 8) and 2048 for the ViT (a BP
step of about 0.8 s, 0.2 s at 512; micro-batches 1024, 512, 256). The machine's cores must be free:
S = 2 needs two idle cores, or the efficiency measures the load. The full run, both models (27
launches for ResNet-18, 23 for the ViT, each a fresh process; about a quarter of an hour on two
free cores), with its defaults spelt out in the second line:

    python -m benchmarks.bench_pipeline --npz path/to/cifar10-train.npz
    python -m benchmarks.bench_pipeline --npz path/to/cifar10-train.npz --models resnet18 vit --micro 2 4 8 \
        --batch 64 --vit-batch 2048 --warmup 2 --steps 6 --out benchmarks/results/pipeline_cpu

One model alone: ``--models vit --out benchmarks/results/pipeline_cpu_vit`` (an ``--out`` of its
own, or it replaces the results of both).

Writes ``<out>.csv`` and ``<out>.json`` (default benchmarks/results/pipeline_cpu). ``--quick``: the
ViT only, M = 2, 1 warm-up and 2 timed batches of 16 images, written under the temp folder unless
``--out`` is given (a smoke run, a minute or two).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

if not __package__:  # run as a file (python benchmarks/bench_pipeline.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import cifar_data, environment, make_console, table, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
STAGES = 2
RULES = ("bp-gpipe", "bp-1f1b", "dfa", "drtp", "tpsgd", "rec_lra")
FORWARD_ONLY = ("drtp", "tpsgd")
LOCAL = ("dfa", "drtp", "tpsgd", "rec_lra")


@dataclass(frozen=True)
class Model:
    """A benchmarked model: its recipes' prefix, the units of rules without a recipe, what it refuses."""

    prefix: str
    granularity: str
    batch_flag: str
    refused: dict[str, str]
    label: str


MODELS = {
    "resnet18": Model("cifar10_resnet18", "block", "batch", {}, "ResNet-18 (CIFAR stem)"),
    "vit": Model("mnist5k_vit", "children", "vit_batch",
                 {"rec_lra": "rec_lra refuses a ViT (it is for conv nets and ResNets): skipped"},
                 "ViT (mnist5k_vit_dfa: patch 7, 4 blocks x 64)"),
}


def rule_name(label: str) -> tuple[str, str | None]:
    """'bp-gpipe' -> ('bp', 'gpipe'); 'dfa' -> ('dfa', None)."""
    name, _, schedule = label.partition("-")
    return name, schedule or None


# --- recipes -----------------------------------------------------------------------------------


def recipe_tree(model: str, rule: str) -> tuple[dict[str, Any], str]:
    """The recipe (as a TOML tree) of ``rule`` on ``model``, and where it came from: the rule's own
    recipe for the model if there is one, else the model's DFA recipe with the rule's default
    options at the model's DFA units."""
    spec = MODELS[model]
    own = RECIPES / f"{spec.prefix}_{rule}.toml"
    if own.is_file():
        tree, source = tomllib.loads(own.read_text()), own.name
    else:
        base = RECIPES / f"{spec.prefix}_dfa.toml"
        tree = tomllib.loads(base.read_text())
        tree["rule"] = {"name": rule, "granularity": spec.granularity}
        source = f"{base.name} with [rule] name = {rule!r}, granularity = {spec.granularity!r}, defaults otherwise"
    if tree["rule"].get("align_every"):
        # DFA's angle diagnostic runs a whole-model backprop pass, which a stage refuses; off in both runs
        tree["rule"]["align_every"] = 0
        source += ", align_every = 0"
    return tree, source


def build_recipe(model: str, rule: str, overrides: list[str]) -> Any:
    """The validated recipe: ``recipe_tree`` plus ``section.key=value`` overrides (read as TOML values)."""
    from trainer.config import parse_override
    from trainer.recipes import recipe_from_dict

    tree, source = recipe_tree(model, rule)
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
    return recipe_from_dict(tree, source=f"bench_pipeline: {source}")


# --- the worker: one process of a run ------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One process of a run; an exception is reported (traceback in the report) before it ends the process."""
    try:
        measure(args)
    except BaseException:
        import traceback

        with open(args.report, "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "error": traceback.format_exc()}) + "\n")
        raise


def measure(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks._harness import PeakMemory, session_steps
    from trainer.distributed import finish
    from trainer.session import build_session, is_forward_only

    torch.set_num_threads(1)
    name, schedule = rule_name(args.rule)
    # the one-process baseline of a forward-only rule trains on the pipeline's micro-batches
    step_batch = args.batch // args.micro if args.stages == 1 and name in FORWARD_ONLY else args.batch
    overrides = [*args.set, f"train.batch_size={step_batch}", f"train.pipeline_stages={args.stages}",
                 f"train.micro_batches={args.micro if args.stages > 1 else 1}", 'train.device="cpu"',
                 "train.compile=false", "train.amp=false", f"train.stage_timeout={args.stage_timeout}"]
    if schedule:
        overrides.append(f'train.pipeline_schedule="{schedule}"')
    recipe = build_recipe(args.model, name, overrides)
    session = build_session(recipe)
    env = session.env
    session.model.train()
    session.rule.train()
    forward_only = is_forward_only(recipe)
    if forward_only != (name in FORWARD_ONLY):
        raise SystemExit(f"{recipe.source}: forward_only = {forward_only}, but the benchmark takes {name!r} "
                         f"{'for' if name in FORWARD_ONLY else 'not for'} a forward-only rule")
    per_batch = args.micro if forward_only else 1  # train_step calls per batch
    steps = session_steps(session)  # the loop's own step: a pipeline rebalances as in a training run
    last: dict[str, Any] = {}

    def barrier() -> None:
        if env.enabled:
            dist.barrier()

    def train_batch() -> int:
        images = 0
        for _ in range(per_batch):
            step_images, out, note = next(steps)
            if note and env.is_main:
                last["rebalance"] = note
            images += step_images
            last["loss"], last["logits"] = out.loss, len(out.logits)
        return images

    for _ in range(args.warmup):
        train_batch()
    barrier()
    start = time.perf_counter()
    images = sum(train_batch() for _ in range(args.steps))
    barrier()
    seconds = time.perf_counter() - start
    rule = session.rule
    exclude = [*rule.parameters(), *rule.buffers(), *session.model.parameters(), *session.model.buffers()]
    with PeakMemory("cpu", activations=True, exclude=exclude) as peak:
        train_batch()
    barrier()
    courier = getattr(session.stepper, "courier", None)
    if courier is not None:
        courier.flush()
    record = {
        "rank": env.rank, "stage": env.stage, "stages": env.stages, "is_main": env.is_main,
        "rule": args.rule, "model": args.model, "micro_batches": args.micro, "forward_only": forward_only,
        "batch": args.batch, "step_batch": images // (args.steps * per_batch), "images": images, "seconds": seconds,
        "images_per_s": images / seconds, "activation_bytes": peak.bytes,
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(), "loss": float(last["loss"]) if last["logits"] else None,
        "split": " ".join(session.layout.notes) or "one process", "rebalance": last.get("rebalance"),
        "recipe": recipe.source,
    }
    with open(args.report, "a") as f:  # one short line per rank, appended
        f.write(json.dumps(record) + "\n")
    finish(env)


# --- the parent -------------------------------------------------------------------------------------


@dataclass
class Job:
    model: str
    rule: str
    micro: int
    stages: int
    batch: int


def job_command(job: Job, args: argparse.Namespace, data_overrides: list[str], report: Path) -> list[str]:
    worker_args = ["-m", "benchmarks.bench_pipeline", "--worker", "--model", job.model, "--rule", job.rule,
                   "--micro", str(job.micro), "--stages", str(job.stages), "--batch", str(job.batch),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--report", str(report),
                   "--stage-timeout", str(args.stage_timeout)]
    for text in data_overrides:
        worker_args += ["--set", text]
    if job.stages > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.stages}",
                *worker_args]
    return [sys.executable, *worker_args]


WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def read_report(job: Job, command: list[str], report: Path, returncode: int, stderr: str,
                expected: int) -> list[dict] | str:
    """The ranks' records, or the error (exit status and the end of stderr)."""
    records = [json.loads(line) for line in report.read_text().splitlines()] if report.is_file() else []
    failed = [r for r in records if "error" in r]
    if failed:  # the ranks' own tracebacks, the first rank's first
        return (f"exit {returncode}: {shlex.join(command)}\n"
                + "\n".join(f"rank {r['rank']}: {r['error'].strip()}" for r in sorted(failed, key=lambda r: r["rank"])))
    if returncode != 0 or len(records) != expected:
        tail = "\n".join(stderr.strip().splitlines()[-40:])
        return f"exit {returncode}, {len(records)} of {expected} reports: {shlex.join(command)}\n{tail}"
    return sorted(records, key=lambda r: r["rank"])


def run_job(job: Job, args: argparse.Namespace, data_overrides: list[str], folder: Path) -> list[dict] | str:
    """Run one measurement; the ranks' records, or the error."""
    report = folder / f"{job.model}-{job.rule}-M{job.micro}-S{job.stages}.jsonl"
    report.unlink(missing_ok=True)
    command = job_command(job, args, data_overrides, report)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, **WORKER_ENV}, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.timeout} s: {shlex.join(command)}"
    return read_report(job, command, report, done.returncode, done.stderr, job.stages)


def machine_ceiling(job: Job, args: argparse.Namespace, data_overrides: list[str], folder: Path,
                    alone: float) -> float | str:
    """What two processes can get from this machine at all: two copies of the one-process ``job``
    run at once, their mean images/s over ``alone`` (one copy by itself). Shared caches, memory
    bandwidth and the machine's other load cap every two-process efficiency at this figure."""
    running = []
    for copy in range(STAGES):
        report = folder / f"{job.model}-ceiling-{copy}.jsonl"
        report.unlink(missing_ok=True)
        command = job_command(job, args, data_overrides, report)
        running.append((command, report, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                          text=True, env={**os.environ, **WORKER_ENV}, cwd=ROOT)))
    rates = []
    for command, report, process in running:
        _, stderr = process.communicate(timeout=args.timeout)
        records = read_report(job, command, report, process.returncode, stderr, 1)
        if isinstance(records, str):
            return records
        rates.append(records[0]["images_per_s"])
    return sum(rates) / len(rates) / alone


def mib(value: float | None) -> float | None:
    return None if value is None else value / 2**20


def measure_model(model: str, args: argparse.Namespace, data_overrides: list[str], folder: Path,
                  console: Any) -> tuple[list[dict], list[str]]:
    """Every (rule, M) of one model: the pipeline runs and their one-process baselines."""
    spec = MODELS[model]
    batch = getattr(args, spec.batch_flag)
    overrides = [*(data_overrides if model == "resnet18" else []), *args.set]
    rows, notes = [], []
    baselines: dict[tuple[str, int], list[dict] | str] = {}
    for label in args.rules:
        name, _ = rule_name(label)
        if name in spec.refused:
            notes.append(spec.refused[name])
            console.print(f"[yellow]{model} {label}: {spec.refused[name]}[/]")
            continue
        for micro in args.micro:
            if batch % micro:
                notes.append(f"{label} M={micro}: batch {batch} is not a multiple of M: skipped")
                continue
            pipe = run_job(Job(model, label, micro, STAGES, batch), args, overrides, folder)
            forward_only = name in FORWARD_ONLY
            key = (name, micro if forward_only else 0)  # bp's baseline serves both schedules
            if key not in baselines:
                baselines[key] = run_job(Job(model, label, micro if forward_only else 1, 1, batch), args,
                                         overrides, folder)
            single = baselines[key]
            row: dict[str, Any] = {"model": model, "rule": label, "M": micro, "batch": batch,
                                   "step_batch": batch // micro if forward_only else batch}
            errors = [f"{what}: {result}" for what, result in ((f"S={STAGES}", pipe), ("1 process", single))
                      if isinstance(result, str)]
            if not isinstance(pipe, str):
                main = next(r for r in pipe if r["is_main"])
                row.update(images_per_s=main["images_per_s"], seconds=main["seconds"], images=main["images"],
                           loss=main["loss"], split=main["split"], recipe=main["recipe"], rebalance=main.get("rebalance"))
                for r in pipe:
                    row[f"activation_mib_stage{r['stage']}"] = mib(r["activation_bytes"])
                    row[f"rss_mib_stage{r['stage']}"] = mib(r["rss_bytes"])
            if not isinstance(single, str):
                one = single[0]
                row.update(images_per_s_1p=one["images_per_s"], seconds_1p=one["seconds"],
                           activation_mib_1p=mib(one["activation_bytes"]), rss_mib_1p=mib(one["rss_bytes"]),
                           loss_1p=one["loss"])
            if "images_per_s" in row and "images_per_s_1p" in row:
                row["efficiency"] = row["images_per_s"] / (STAGES * row["images_per_s_1p"])
            if errors:
                row["error"] = "\n".join(errors)
                console.print(f"[red]{model} {label} M={micro}: {escape(row['error'])}[/]")
            else:
                console.print(f"{model} {label} M={micro}: {row['images_per_s']:.1f} img/s (S={STAGES}), "
                              f"{row['images_per_s_1p']:.1f} img/s (1 process), efficiency {row['efficiency']:.2f}")
                if row.get("rebalance"):
                    console.print(f"  {escape(row['rebalance'])}")
            rows.append(row)
    reference = next(((key, r) for key, r in baselines.items() if key[1] == 0 and not isinstance(r, str)), None)
    if reference is not None:  # the whole-batch baseline of the first non-forward-only rule
        (name, _), records = reference
        label = next(label for label in args.rules if rule_name(label)[0] == name)
        ceiling = machine_ceiling(Job(model, label, 1, 1, batch), args, overrides, folder, records[0]["images_per_s"])
        if isinstance(ceiling, str):
            notes.append(f"machine ceiling not measured: {ceiling}")
        else:
            for row in rows:
                row["ceiling"] = ceiling
            notes.append(f"machine ceiling: {STAGES} independent one-thread processes of the {label} baseline at once "
                         f"run at {ceiling:.2f} of one alone (the best any {STAGES}-process efficiency can be here)")
    return rows, notes


def goals(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(goal, met (None: nothing measured), the figures behind it) for one model's rows."""
    def eff(row: dict) -> float | None:
        return row.get("efficiency")

    def figures(picked: list[dict], key: str, fmt: str) -> str:
        return ", ".join(f"{r['rule']} M={r['M']}: " + ("error" if r.get(key) is None else format(r[key], fmt))
                         for r in picked)

    out: list[tuple[str, bool | None, str]] = []
    for goal, picked, bound in (("forward-only (drtp, tpsgd) efficiency >= 0.9",
                                 [r for r in rows if rule_name(r["rule"])[0] in FORWARD_ONLY], 0.9),
                                ("DFA efficiency >= 0.8", [r for r in rows if r["rule"] == "dfa"], 0.8)):
        met = None if not picked else all(eff(r) is not None and eff(r) >= bound for r in picked)
        out.append((goal, met, figures(picked, "efficiency", ".2f")))
    best_bp: dict[int, float] = {}
    for r in rows:
        if rule_name(r["rule"])[0] == "bp" and r.get("images_per_s") is not None:
            best_bp[r["M"]] = max(best_bp.get(r["M"], 0.0), r["images_per_s"])
    local = [r for r in rows if rule_name(r["rule"])[0] in LOCAL]
    checks = []
    for r in local:
        bp = best_bp.get(r["M"])
        rate = r.get("images_per_s")
        ok = bp is not None and rate is not None and rate > bp
        checks.append(ok)
        r["beats_best_bp"] = ok
        r["best_bp_images_per_s"] = bp
    text = ", ".join(f"{r['rule']} M={r['M']}: "
                     + ("error" if r.get("images_per_s") is None or r["best_bp_images_per_s"] is None
                        else f"{r['images_per_s'] / r['best_bp_images_per_s']:.2f}x") for r in local)
    out.append(("every local rule faster (S=2) than BP's best schedule at the same M",
                None if not local or not best_bp else all(checks), text if best_bp else "BP not measured"))
    return out


def fmt(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def parent(args: argparse.Namespace) -> None:
    console = make_console(160)
    folder = Path(tempfile.gettempdir()) / "bpfree-bench"
    folder.mkdir(parents=True, exist_ok=True)
    data_overrides: list[str] = []
    data_note = "mnist5k"
    if "resnet18" in args.models:
        npz = args.npz
        if npz is not None and not npz.is_file():
            console.print(f"[yellow]--npz {npz}: no such file; falling back[/]")
            npz = None
        data = cifar_data(npz, None, folder / "synthetic-cifar10.npz")
        data_overrides = list(data.overrides)
        data_note = f"ResNet-18: {data.description}; ViT: mnist5k"
        console.print(f"data: {data.description}")
    tables: dict[str, list[dict]] = {}
    headline: dict[str, Any] = {}
    started = time.perf_counter()
    for model in args.models:
        rows, notes = measure_model(model, args, data_overrides, folder, console)
        tables[model] = rows
        spec = MODELS[model]
        batch = getattr(args, spec.batch_flag)
        result = table(f"{spec.label}, batch {batch}: S = {STAGES} processes of 1 thread (gloo) vs 1 process of "
                       f"1 thread, {args.steps} timed batches after {args.warmup}",
                       ["rule", "M", "step batch", "img/s S=2", "img/s 1 proc", "efficiency",
                        "act. MiB stage 0", "act. MiB stage 1", "act. MiB 1 proc", "RSS MiB s0 / s1 / 1p", "error"],
                       left=["error"],
                       caption="efficiency = img/s(S=2) / (2 x img/s(1 process)); step batch: the images of one "
                               "train_step in the baseline (forward-only rules: a micro-batch); act.: peak bytes "
                               "saved for backward over one batch (SavedActivationMeter)")
        for r in rows:
            rss = " / ".join(fmt(r.get(k), ",.0f") for k in ("rss_mib_stage0", "rss_mib_stage1", "rss_mib_1p"))
            result.add_row(r["rule"], str(r["M"]), str(r["step_batch"]), fmt(r.get("images_per_s")),
                           fmt(r.get("images_per_s_1p")), fmt(r.get("efficiency"), ".2f"),
                           fmt(r.get("activation_mib_stage0")), fmt(r.get("activation_mib_stage1")),
                           fmt(r.get("activation_mib_1p")), rss,
                           escape(r["error"].strip().splitlines()[-1][:80]) if r.get("error") else "")
        console.print(result)
        for note in notes:
            console.print(f"note: {note}")
        splits: dict[str, list[str]] = {}  # the units of each stage (the measured shares vary run to run)
        for r in rows:
            if r.get("split"):
                splits.setdefault(r["split"].split("): ", 1)[-1], []).append(f"{r['rule']} M={r['M']}")
        for units, runs in splits.items():
            console.print(f"stages of {', '.join(runs)}: {escape(units)}")
        model_goals = goals(rows)
        headline[model] = {goal: met for goal, met, _ in model_goals}
        for goal, met, text in model_goals:
            mark = "[dim]n/a[/]" if met is None else "[green]met[/]" if met else "[red]missed[/]"
            console.print(f"goal ({model}): {goal}: {mark}  ({text})")
    meta = {**environment("cpu"), "stages": STAGES, "threads_per_process": 1, "backend": "gloo",
            "data": data_note, "batch_resnet18": args.batch, "batch_vit": args.vit_batch, "micro": args.micro,
            "steps": args.steps, "warmup": args.warmup, "rules": args.rules, "models": args.models,
            "activation_memory": "peak live bytes saved for backward over one batch per process "
                                 "(trainer.memory.SavedActivationMeter), parameters and buffers excluded",
            "wall_s": time.perf_counter() - started}
    out = args.out if args.out is not None else (
        folder / "pipeline_quick" if args.quick else ROOT / "benchmarks" / "results" / "pipeline_cpu")
    write_results(out.with_suffix(".csv"), meta, tables, headline, console)
    write_results(out.with_suffix(".json"), meta, tables, headline, console)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None, help="default: both")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=None, help="default: all")
    parser.add_argument("--micro", nargs="+", type=int, default=None, help="micro-batches M (default 2 4 8)")
    parser.add_argument("--batch", type=int, default=None, help="ResNet-18 batch (default 64)")
    parser.add_argument("--vit-batch", type=int, default=None, help="ViT batch (default 2048)")
    parser.add_argument("--steps", type=int, default=None, help="timed batches per run (default 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per run (default 2)")
    parser.add_argument("--npz", type=Path, help="an .npz of CIFAR images (x uint8 N x 32 x 32 x 3, y labels)")
    parser.add_argument("--out", type=Path, help="results stem: writes <out>.csv and <out>.json "
                                                 "(default benchmarks/results/pipeline_cpu)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--stage-timeout", type=float, default=300, help="train.stage_timeout of the pipeline runs")
    parser.add_argument("--quick", action="store_true", help="smoke run: the ViT, M=2, 1 + 2 batches of 16")
    # the worker's own flags (the parent sets them)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--rule", choices=RULES, help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=int, default=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[],
                        help="an override for every run, pipeline and baseline alike (e.g. rule.granularity=\"layer\")")
    args = parser.parse_args()
    if args.worker:
        args.micro = args.micro[0]
        worker(args)
        return
    quick = args.quick
    defaults = {"models": ["vit"] if quick else list(MODELS), "rules": list(RULES), "micro": [2] if quick else [2, 4, 8],
                "batch": 8 if quick else 64, "vit_batch": 16 if quick else 2048,
                "steps": 2 if quick else 6, "warmup": 1 if quick else 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parent(args)


if __name__ == "__main__":
    main()
