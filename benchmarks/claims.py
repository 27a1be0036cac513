"""The seeds' headline claims, each tested at a budget this machine allows, with a verdict.

    python -m benchmarks.claims --list
    python -m benchmarks.claims small-data --npz cifar10-mini-train.npz --seeds 0 1 2 --jobs 2
    python -m benchmarks.claims rec-lra --npz cifar10-mini-train.npz --epochs 30 --models resnet20 resnet18:15 --jobs 2
    python -m benchmarks.claims tpsgd --npz cifar10-mini-train.npz --seeds 0 1 2 --jobs 2
    python -m benchmarks.claims trace-noise --npz cifar10-mini-train.npz --epochs 10 --seeds 0 1 2 --jobs 2
    python -m benchmarks.claims weight-transport --npz cifar10-mini-train.npz --epochs 30 --kp-decay 5e-3 --jobs 2

At the full data (all 50,000 CIFAR-10 images, 45,000 / 5,000; the full-CIFAR table's bf16 autocast):

    python -m benchmarks.claims small-data --npz data/cifar10-train50k.npz --subsets 500 1000 2500 5000 10000 45000 \
        --images 200000 --models resnet20 --rules bp hybrid bdfa --seeds 0 1 2 --jobs 2 --set train.amp=true \
        --out benchmarks/results/claims_full
    python -m benchmarks.claims rec-lra --from-table benchmarks/results/cifar10_resnet20 --out benchmarks/results/claims_full
    python -m benchmarks.claims weight-transport --from-table benchmarks/results/cifar10_resnet20 \
        --out benchmarks/results/claims_full
    python -m benchmarks.claims --markdown --out benchmarks/results/claims --out benchmarks/results/claims_full

Every claim is a ``Claim``: the paper's statement, its source, and its criterion, written down here
before anything runs. The verdict (``holds``, ``does not hold``, or ``not at this budget``) is a
function of the table's numbers alone (the ``*_verdict`` functions, tested on made-up numbers in
tests/test_claims.py); the table says the budget it was reached at (epochs, images, seeds). Two
numbers are "apart" when their means differ by more than the larger of their seeds' standard
deviations (``compare``); a claim that needs a precondition the budget did not reach (Kolen–Pollack's
B aligned with W) is ``not at this budget``.

Each training is its own ``trainer run`` process (``benchmarks.compare_rules.run_one``) in
``--runs``/LABEL-HASH/seedN, HASH naming the recipe and overrides, so ``--reuse`` reads every run
that already finished with exactly that recipe: claims share runs (rec-lra's and
weight-transport's BP), and an interrupted claim trains only what is missing (an interrupted run's
folder is refused, naming it: remove it to train it again). ``--set KEY=VALUE`` goes last into every
training's overrides, so into its recipe, its HASH and --reuse's match. The claim's table goes
to ``--out`` as CLAIM.csv (one row per run or measurement), CLAIM.json (the table, the verdict and its
reasons) and CLAIM.png (matplotlib, when installed). ``--from-table DIR`` judges rec-lra and
weight-transport on the full-CIFAR table's runs that ``benchmarks.full_cifar`` published in DIR
(RULE/seedN) instead of training. ``--markdown`` prints the claims table of one or more ``--out``
folders, one per budget: a row per claim and folder.

CIFAR images come from ``--npz`` (e.g. the 4,660 real CIFAR-10 images of cifar10-mini-train.npz,
split into 4,194 training and 466 held-out images, ``data.split_seed`` fixed), else torchvision's
CIFAR-10 under data/cifar10, else synthetic CIFAR-shaped images (accuracy then means nothing; the
table says so). ``--quick`` shrinks every budget to seconds (the suite runs it); its verdicts mean
nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

if not __package__:  # run as a file (python benchmarks/claims.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import full_cifar
from benchmarks._harness import cifar_data, make_console, recipe_rule, table, time_interleaved, write_csv, write_json
from benchmarks.compare_rules import RECIPES, run_one
from trainer.config import ConfigError
from trainer.runs import intact_records

HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "not at this budget"


# ---- numbers to verdicts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of one quantity over seeds (sd 0 for one seed)."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        values = list(values)
        if not values:
            raise ValueError("no values: every seed of this setting failed")
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.sd:.2f}"


def compare(a: Spread, b: Spread, floor: float = 0.0) -> int:
    """+1 if a is above b by more than the larger sd (or ``floor``), -1 if below by more, 0 otherwise."""
    margin = max(a.sd, b.sd, floor)
    return 1 if a.mean - b.mean > margin else -1 if b.mean - a.mean > margin else 0


def combine(verdicts: Iterable[str]) -> str:
    """A claim made of parts: it fails if any part fails, holds if every part holds, else is undecided."""
    verdicts = list(verdicts)
    if FAILS in verdicts:
        return FAILS
    return HOLDS if verdicts and all(v == HOLDS for v in verdicts) else UNDECIDED


@dataclass
class Verdict:
    verdict: str
    reasons: list[str]


def small_data_verdict(accuracy: Mapping[tuple[str, int, str], Sequence[float]],
                       rules: Sequence[str] = ("hybrid", "bdfa")) -> Verdict:
    """Claim 1. ``accuracy[(model, subset size, rule)]``: held-out accuracy (%) per seed.

    Holds when, on every model, each of ``rules`` beats BP (``compare`` = +1) at the two smallest
    subsets; fails when one of them is below BP there (-1); otherwise (within the seeds' spread) it
    is undecided at this budget."""
    outcomes, reasons = [], []
    for model in sorted({m for m, _, _ in accuracy}):
        for subset in sorted({s for m, s, _ in accuracy if m == model})[:2]:
            bp = Spread.of(accuracy[(model, subset, "bp")])
            for rule in rules:
                got = Spread.of(accuracy[(model, subset, rule)])
                outcome = compare(got, bp)
                outcomes.append({1: HOLDS, 0: UNDECIDED, -1: FAILS}[outcome])
                word = {1: "above", 0: "level with", -1: "below"}[outcome]
                reasons.append(f"{model}, {subset} images: {rule} {got} is {word} bp {bp} "
                               f"({got.mean - bp.mean:+.2f} points, margin {max(got.sd, bp.sd):.2f})")
    return Verdict(combine(outcomes), reasons)


Curve = Sequence[tuple[int, float, float]]  # (epoch, held-out accuracy %, training seconds so far)


def _mean_curve(curves: Sequence[Curve]) -> list[tuple[int, float, float]]:
    epochs = sorted(set.intersection(*({e for e, _, _ in c} for c in curves)))
    points = [{e: (a, s) for e, a, s in c} for c in curves]
    return [(e, statistics.fmean(p[e][0] for p in points), statistics.fmean(p[e][1] for p in points)) for e in epochs]


def _first_reaching(curve: Sequence[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    return next(((e, s) for e, a, s in curve if a >= target), None)


def rec_lra_verdict(bp: Sequence[Curve], rec_lra: Sequence[Curve], margin: float = 1.0,
                    target_share: float = 0.9) -> Verdict:
    """Claim 2: rec-LRA "generalizes as well as backprop while converging sooner".

    As well: rec-LRA's final mean is at most max(``margin`` points, the larger sd) below BP's. Sooner:
    on the mean curves, rec-LRA first reaches ``target_share`` of BP's final mean accuracy in fewer
    epochs, or in fewer training seconds, than BP. Holds when both do. When rec-LRA is behind, the
    claim is undecided at this budget if the gap was still closing (by more than ``margin`` points
    over the last quarter of the epochs), else it fails; it fails too when it is level but later."""
    bp_mean, rec_mean = _mean_curve(bp), _mean_curve(rec_lra)
    bp_final, rec_final = Spread.of([c[-1][1] for c in bp]), Spread.of([c[-1][1] for c in rec_lra])
    target = target_share * bp_final.mean
    bp_at, rec_at = _first_reaching(bp_mean, target), _first_reaching(rec_mean, target)
    as_well = rec_final.mean >= bp_final.mean - max(margin, bp_final.sd, rec_final.sd)
    sooner = rec_at is not None and bp_at is not None and (rec_at[0] < bp_at[0] or rec_at[1] < bp_at[1])
    def reached(at: tuple[int, float] | None) -> str:
        return f"epoch {at[0]} ({at[1]:.0f} s)" if at else "never"
    reasons = [f"final: rec_lra {rec_final} vs bp {bp_final} ({rec_final.mean - bp_final.mean:+.2f} points; "
               f"as well as BP: {'yes' if as_well else 'no'})",
               f"first at {target:.1f} % ({target_share:.0%} of BP's final): rec_lra {reached(rec_at)}, bp "
               f"{reached(bp_at)} (sooner: {'yes' if sooner else 'no'})"]
    if as_well and sooner:
        return Verdict(HOLDS, reasons)
    if not as_well:
        quarter = bp_mean[max(0, len(bp_mean) - 1 - len(bp_mean) // 4)][0]
        gap = {e: b - r for (e, b, _), (_, r, _) in zip(bp_mean, rec_mean)}
        closing = gap[quarter] - gap[bp_mean[-1][0]]
        reasons.append(f"gap at epoch {quarter}: {gap[quarter]:.2f}, at the end {gap[bp_mean[-1][0]]:.2f} points "
                       f"(closing by {closing:.2f})")
        if closing > margin:
            return Verdict(UNDECIDED, reasons)
    return Verdict(FAILS, reasons)


def tpsgd_verdict(settings: Mapping[str, Mapping[str, Any]], limit: float = 5.0) -> Verdict:
    """Claim 3: tpSGD within 5 % of BP on shallow MLPs, CNNs and RNNs, with less memory and time.

    ``settings[name]``: ``bp`` and ``tpsgd`` held-out accuracies (%) per seed, ``memory_ratio`` and
    ``time_ratio`` (tpSGD over BP: peak saved activations and step time). "Within 5 %" is read as
    within 5 accuracy points. A setting holds when the gap is at most ``limit`` and both ratios are
    below 1; it fails when the gap exceeds ``limit`` by more than the larger sd, or a ratio is 1 or
    more; otherwise it is undecided."""
    parts, reasons = [], []
    for name, s in settings.items():
        bp, tp = Spread.of(s["bp"]), Spread.of(s["tpsgd"])
        gap = bp.mean - tp.mean
        cheaper = s["memory_ratio"] < 1 and s["time_ratio"] < 1
        if gap - max(bp.sd, tp.sd) > limit or not cheaper:
            part = FAILS
        else:
            part = HOLDS if gap <= limit else UNDECIDED
        parts.append(part)
        reasons.append(f"{name}: tpsgd {tp} vs bp {bp} (gap {gap:.2f} points), memory x{s['memory_ratio']:.2f}, "
                       f"step time x{s['time_ratio']:.2f}: {part}")
    return Verdict(combine(parts), reasons)


def trace_noise_verdict(ratio: Mapping[tuple[str, str, int], float], memory: Mapping[int | str, float],
                        probes: int = 16, order: float = 10.0) -> Verdict:
    """Claim 4: the trace estimate's error is of the order of SGD's minibatch noise; memory falls with r.

    ``ratio[(point, conv, r)]``: the estimate's mean squared error against the exact minibatch
    gradient, over the variance of the exact gradient across minibatches. ``memory[r]`` and
    ``memory["exact"]``: saved activation bytes of a step. "Of the same order" is a ratio of at most
    ``order``; the claim is tested at the recipes' r = ``probes``: it holds when the median over the
    convs is within the order at every point of training and memory rises strictly with r and stays
    below exact BP's; otherwise it fails."""
    reasons, ok = [], True
    for point in dict.fromkeys(p for p, _, _ in ratio):  # in the order measured
        values = [v for (p, _, r), v in ratio.items() if p == point and r == probes]
        median = statistics.median(values)
        within = sum(v <= order for v in values)
        ok &= median <= order
        reasons.append(f"{point}: r = {probes}, median error/noise {median:.2f} "
                       f"({within} of {len(values)} convs within {order:g}x)")
    rs = sorted(r for r in memory if r != "exact")
    rising = all(memory[a] < memory[b] for a, b in zip(rs, rs[1:])) and memory[rs[-1]] < memory["exact"]
    reasons.append("saved activations by r: " + ", ".join(f"{r}: {memory[r] / 2**20:.1f} MiB" for r in rs)
                   + f", exact {memory['exact'] / 2**20:.1f} MiB (rising with r, below exact: "
                   f"{'yes' if rising else 'no'})")
    return Verdict(HOLDS if ok and rising else FAILS, reasons)


def weight_transport_verdict(bp: Sequence[float], usf: Sequence[float], kp: Sequence[float],
                             kp_angle: float | None, points: float = 2.0, aligned: float = 45.0,
                             kp_bp: Sequence[float] | None = None) -> Verdict:
    """Claim 5: sign symmetry (uSF) ≈ BP; Kolen–Pollack close to BP once B has aligned with W.

    "≈" and "close" are: not below BP by more than max(``points``, the larger sd). KP is judged only
    once its final B–W angle (mean over layers) is at most ``aligned`` degrees: before that the
    claim's precondition is not reached at this budget. ``kp_bp``, when given, is the BP that KP is
    held against (BP trained with KP's weight decay), else ``bp``."""
    bp_s, usf_s, kp_s = Spread.of(bp), Spread.of(usf), Spread.of(kp)
    usf_part = FAILS if compare(usf_s, bp_s, points) < 0 else HOLDS
    reasons = [f"usf {usf_s} vs bp {bp_s} ({usf_s.mean - bp_s.mean:+.2f} points): {usf_part}"]
    if kp_angle is None or kp_angle > aligned:
        kp_part = UNDECIDED
        angle = ("not logged (too few steps, or the recipe's rule.align_every = 0): kp not judged" if kp_angle is None
                 else f"{kp_angle:.1f}° > {aligned:g}°: B has not aligned at this budget")
        reasons.append(f"kp {kp_s}: B-W angle {angle}")
    else:
        base, name = (bp_s, "bp") if kp_bp is None else (Spread.of(kp_bp), "bp at kp's decay")
        kp_part = FAILS if compare(kp_s, base, points) < 0 else HOLDS
        reasons.append(f"kp {kp_s} vs {name} {base} ({kp_s.mean - base.mean:+.2f} points, B-W angle "
                       f"{kp_angle:.1f}°): {kp_part}")
    return Verdict(combine([usf_part, kp_part]), reasons)


# ---- runs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One configuration to train once per seed: a recipe (a built-in's name or a file) and overrides."""

    label: str
    recipe: str
    overrides: tuple[str, ...] = ()

    def folder(self, runs: Path) -> Path:
        digest = hashlib.sha1(json.dumps([self.recipe, sorted(self.overrides)]).encode()).hexdigest()[:8]
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)
        return runs / f"{slug}-{digest}"


@dataclass
class Context:
    """What every claim is run with (the command line, resolved)."""

    seeds: list[int]
    jobs: int
    runs: Path
    out: Path
    reuse: bool
    quick: bool
    epochs: int | None
    data: list[str]  # the overrides selecting the CIFAR images (and their held-out split)
    data_note: str
    console: Any
    env: dict[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # --set: last in every training's overrides (so in its folder's HASH)

    def full(self, setting: Setting) -> Setting:
        """``setting`` as trained: with ``--set``'s overrides after its own, so that they win and a run
        with them never shares a folder (or --reuse's match) with one without."""
        return dataclasses.replace(setting, overrides=(*setting.overrides, *self.overrides))

    def folder(self, setting: Setting, seed: int) -> Path:
        """Where ``setting`` trains with ``seed``."""
        return self.full(setting).folder(self.runs) / f"seed{seed}"


def train(ctx: Context, settings: Sequence[Setting]) -> dict[tuple[str, int], dict]:
    """Every setting once per seed (``ctx.jobs`` at a time): results keyed by (label, seed)."""
    jobs = [(s, seed) for s in settings for seed in ctx.seeds]

    def launch(job: tuple[Setting, int]) -> dict:
        setting, seed = job
        ctx.console.print(f"  {setting.label} (seed {seed}) …")
        return run_one(setting.label, setting.recipe, seed, list(ctx.full(setting).overrides),
                       ctx.folder(setting, seed), ctx.env, ctx.reuse)

    with ThreadPoolExecutor(max_workers=ctx.jobs) as pool:
        done = list(pool.map(launch, jobs))
    for row in done:
        if "error" in row:
            ctx.console.print(f"  [red]{row['label']} seed {row['seed']} failed:[/] {' '.join(row['error'])}")
    return {(s.label, seed): row for (s, seed), row in zip(jobs, done)}


def accuracies(results: Mapping[tuple[str, int], dict], label: str) -> list[float]:
    """Final held-out accuracy (%) of each seed of ``label`` that finished."""
    return [100 * r["accuracy"] for (name, _), r in sorted(results.items()) if name == label and "error" not in r]


def derived_recipe(ctx: Context, base: str, rule: Mapping[str, Any], name: str) -> str:
    """A built-in recipe with its ``[rule]`` table replaced (BP beside a rule, all else equal), written
    under the runs folder; returns its path."""
    tree = tomllib.loads((RECIPES / f"{base}.toml").read_text())
    tree["rule"] = dict(rule)
    from trainer.config import dump_toml

    path = ctx.runs / "recipes" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {base}.toml with [rule] = {dict(rule)}, written by benchmarks/claims.py\n" + dump_toml(tree))
    return str(path)


def report(ctx: Context, claim: "Claim", columns: Sequence[str], rows: Sequence[Sequence[str]],
           records: Sequence[Mapping[str, Any]], verdict: Verdict, budget: str,
           draw: Callable[[Any], None] | None = None) -> dict:
    """Print the claim's table and verdict; write CLAIM.csv, CLAIM.json and (matplotlib) CLAIM.png."""
    shown = table(f"{claim.name}: {claim.statement} [{claim.source}]", columns, left={columns[0]},
                  caption=f"budget: {budget}; seeds {', '.join(map(str, ctx.seeds))}; data: {ctx.data_note}")
    for row in rows:
        shown.add_row(*row)
    ctx.console.print(shown)
    ctx.console.print(f"criterion: {claim.criterion}")
    for reason in verdict.reasons:
        ctx.console.print(f"  {reason}")
    colour = {HOLDS: "green", FAILS: "red"}.get(verdict.verdict, "yellow")
    ctx.console.print(f"[bold {colour}]verdict: {verdict.verdict}[/] ({budget})")
    ctx.out.mkdir(parents=True, exist_ok=True)
    stem = ctx.out / claim.name
    write_csv(stem.with_suffix(".csv"), list(records))
    summary = {"claim": claim.name, "statement": claim.statement, "source": claim.source,
               "criterion": claim.criterion, "budget": budget, "seeds": ctx.seeds, "data": ctx.data_note,
               "quick": ctx.quick, "columns": list(columns), "rows": [list(r) for r in rows],
               "verdict": verdict.verdict, "reasons": verdict.reasons,
               "command": " ".join(["python -m benchmarks.claims", *sys.argv[1:]])}
    write_json(stem.with_suffix(".json"), summary)
    if draw is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return summary
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        ax.set_title(f"{claim.name}: {verdict.verdict}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
        plt.close(fig)
    return summary


def is_published(folder: Path) -> bool:
    """Whether ``folder`` holds a finished run's results.json and the metrics.jsonl its curve comes from."""
    return full_cifar.finished(folder) and (folder / "metrics.jsonl").is_file()


def published(table: Path, rule: str, seeds: Sequence[int]) -> dict[int, Path]:
    """``--from-table``: the folders of ``rule``'s finished runs that ``benchmarks.full_cifar`` published
    in ``table`` (RULE/seedN), by seed. A missing one is a ConfigError naming the folder and the
    command that trains and publishes it (a claim reads every seed asked for, or none)."""
    folders = {seed: table / rule / f"seed{seed}" for seed in seeds}
    for seed, folder in folders.items():
        if not is_published(folder):
            results = "" if table.resolve() == full_cifar.RESULTS.resolve() else f" --results {table}"
            raise ConfigError(f"--from-table: {folder} holds no published run (a finished results.json and its "
                              f"metrics.jsonl); make it with: python -m benchmarks.full_cifar{results} run --rules "
                              f"{rule} --seeds {seed}")
    return folders


def table_budget(folders: Iterable[Path]) -> str:
    """The budget of a claim judged on the table's runs: their epochs, as their results.json say."""
    epochs = sorted({full_cifar.read_json(folder / "results.json")["epochs"] for folder in folders})
    return (f"ResNet-20, all of CIFAR-10 (45,000 / 5,000), {' / '.join(map(str, epochs))} epochs, "
            "the full-CIFAR table's runs")


def _tiny(ctx: Context, images: int = 64) -> list[str]:
    """--quick: a few images, small batches, one epoch."""
    return [f"data.train_subset={images}", "train.batch_size=16", "train.eval_batch_size=256"] if ctx.quick else []


# ---- claim 1: hybrid DFA and BDFA on small data -----------------------------------------------------

SMALL_DATA_RULES = {"bp": "cifar10_resnet20_bp", "dfa": "cifar10_resnet20_dfa", "hybrid": "cifar10_resnet20_hybrid",
                    "bdfa": "cifar10_resnet20_bdfa"}
SMALL_DATA_MODELS = {"resnet20": [], "cnn": ["model.name=cnn"]}
# the hybrid's BP part: ResNet-20's stem, layer1 and layer2 (its recipe); the CNN's first conv block.
# BP's SGD at ResNet-20's lr 0.1 diverges on the CNN, whose dense layers have no BatchNorm (the loss
# stays at ln 10); at 0.01 it trains (3 epochs of all images, seed 0: 52.8 %, AdamW 1e-3 46.4 %).
SMALL_DATA_EXTRA = {("cnn", "hybrid"): ['rule.bp_units=["0.0"]'], ("cnn", "bp"): ["optim.lr=0.01"]}


def small_data(ctx: Context, args: argparse.Namespace) -> dict:
    subsets = args.subsets or ([40, 80] if ctx.quick else [250, 500, 1000, 0])
    images = args.images or (80 if ctx.quick else 10_000)
    models = args.models or (["cnn"] if ctx.quick else list(SMALL_DATA_MODELS))
    rules = args.rules or list(SMALL_DATA_RULES)
    settings, where = [], {}
    for model in models:
        for subset in subsets:
            size = subset or args.train_images
            epochs = max(1, math.ceil(images / size))
            for rule in rules:
                setting = Setting(f"{model} {size} {rule}", SMALL_DATA_RULES[rule], (
                    *SMALL_DATA_MODELS[model], *SMALL_DATA_EXTRA.get((model, rule), []), *ctx.data,
                    f"data.train_subset={subset}", f"train.epochs={epochs}", f"train.eval_every={epochs}",
                    f"train.batch_size={16 if ctx.quick else 50}"))  # only the final accuracy counts
                settings.append(setting)
                where[setting.label] = (model, size, rule, epochs)
    results = train(ctx, settings)
    acc = {where[s.label][:3]: accuracies(results, s.label) for s in settings}
    verdict = small_data_verdict(acc)
    rows, records = [], []
    for model in models:
        for subset in subsets:
            size = subset or args.train_images
            bp = Spread.of(acc[(model, size, "bp")])
            cells = [f"{model}", f"{size:,}", str(where[f"{model} {size} bp"][3])]
            for rule in rules:
                got = Spread.of(acc[(model, size, rule)])
                cells.append(str(got) + ("" if rule == "bp" else f" ({got.mean - bp.mean:+.1f})"))
            rows.append(cells)
    for (label, seed), r in results.items():
        model, size, rule, epochs = where[label]
        records.append({"model": model, "train_images": size, "epochs": epochs, "rule": rule, "seed": seed,
                        "accuracy": r.get("accuracy", ""), "error": " ".join(r.get("error", []))})

    def draw(ax: Any) -> None:
        for model in models:
            for rule in rules:
                sizes = [subset or args.train_images for subset in subsets]
                ax.errorbar(sizes, [Spread.of(acc[(model, s, rule)]).mean for s in sizes],
                            [Spread.of(acc[(model, s, rule)]).sd for s in sizes], marker="o", capsize=3,
                            label=f"{model} {rule}", linestyle="-" if model == "resnet20" else "--")
        ax.set(xscale="log", xlabel="training images", ylabel="held-out accuracy (%)")

    budget = (f"at least {images:,} training images seen per run (epochs = ⌈{images:,} / subset⌉), batch "
              f"{16 if ctx.quick else 50}, the same for every rule")
    return report(ctx, CLAIMS["small-data"], ["model", "train images", "epochs", *(f"{r} (vs bp)" for r in
                  rules)], rows, records, verdict, budget, draw)


# ---- claim 2: recursive LRA against BP on residual networks ------------------------------------------

REC_LRA_MODELS = {"resnet20": ("cifar10_resnet20_bp", "cifar10_resnet20_rec_lra", []),
                  "resnet18": ("cifar10_resnet18_bp", "cifar10_resnet18_rec_lra", ["train.batch_size=64"])}


def epoch_curve(folder: Path) -> list[tuple[int, float, float]]:
    """(epoch, held-out %, cumulative training seconds) from a finished run folder's metrics."""
    seconds, curve = 0.0, []
    for record in intact_records(folder):
        if record.get("split") == "train":
            continue
        seconds += record["train_seconds"]
        if record.get("accuracy") is not None:
            curve.append((record["epoch"], 100 * record["accuracy"], seconds))
    return curve


def model_budgets(values: Sequence[str], known: Iterable[str], epochs: int) -> dict[str, int]:
    """``--models NAME[:EPOCHS] …`` as {NAME: epochs}: a model without ``:EPOCHS`` gets ``epochs`` (a
    larger model can be given a shorter budget the machine allows). ValueError names a bad value."""
    known, budgets = list(known), {}
    for value in values:
        name, colon, count = value.partition(":")
        if name not in known:
            raise ValueError(f"--models {value}: unknown model {name!r}; choose from {', '.join(known)}")
        if colon and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"--models {value}: EPOCHS must be a whole number above 0, as in {name}:15")
        budgets[name] = int(count) if colon else epochs
    return budgets


def rec_lra(ctx: Context, args: argparse.Namespace) -> dict:
    if args.from_table:  # the full-CIFAR table's ResNet-20 runs; its stage variant beside them, outside the verdict
        runs = {("resnet20", rule): published(args.from_table, rule, ctx.seeds) for rule in ("bp", "rec_lra")}
        stages = args.from_table / "rec_lra_stages" / "seed0"
        if is_published(stages):
            runs[("resnet20", "rec_lra_stages")] = {0: stages}
        curves = {key: {seed: epoch_curve(folder) for seed, folder in folders.items()} for key, folders in runs.items()}
        models = ["resnet20"]
        budget = table_budget([*runs[("resnet20", "bp")].values(), *runs[("resnet20", "rec_lra")].values()])
    else:
        budgets = model_budgets(args.models or ["resnet20"], REC_LRA_MODELS, ctx.epochs or (2 if ctx.quick else 30))
        settings = {}
        for model, epochs in budgets.items():
            bp, rec, extra = REC_LRA_MODELS[model]
            for rule, recipe in (("bp", bp), ("rec_lra", rec)):
                overrides = (*ctx.data, f"train.epochs={epochs}", *extra, *_tiny(ctx))
                settings[(model, rule)] = Setting(f"{model} {rule}", recipe, overrides)
        results = train(ctx, list(settings.values()))
        curves = {key: {seed: epoch_curve(ctx.folder(setting, seed)) for seed in ctx.seeds
                        if "error" not in results[(setting.label, seed)]} for key, setting in settings.items()}
        models = list(budgets)
        budget = ", ".join(f"{model} {e} epoch{'s' * (e != 1)}" for model, e in budgets.items()) + ", each rule's recipe"
    verdicts = {model: rec_lra_verdict(list(curves[(model, "bp")].values()), list(curves[(model, "rec_lra")].values()))
                for model in models}
    verdict = Verdict(combine(v.verdict for v in verdicts.values()),
                      [f"{m}: {reason}" for m, v in verdicts.items() for reason in v.reasons])
    rows, records = [], []
    for (model, rule), by_seed in curves.items():
        final = Spread.of([c[-1][1] for c in by_seed.values()])
        mean = _mean_curve(list(by_seed.values()))
        marks = [mean[min(len(mean) - 1, round(q * len(mean)) - 1)] for q in (0.25, 0.5, 0.75)]
        rows.append([model, rule, *(f"{a:.1f} (ep {e}, {s:.0f} s)" for e, a, s in marks), str(final),
                     f"{mean[-1][2]:.0f}"])
        for seed, c in by_seed.items():
            records += [{"model": model, "rule": rule, "seed": seed, "epoch": e, "accuracy_pct": a,
                         "train_seconds": s} for e, a, s in c]

    def draw(ax: Any) -> None:
        for (model, rule), by_seed in curves.items():
            mean = _mean_curve(list(by_seed.values()))
            ax.plot([e for e, _, _ in mean], [a for _, a, _ in mean], marker=".", label=f"{model} {rule}")
        ax.set(xlabel="epoch", ylabel="held-out accuracy (%, mean over seeds)")

    return report(ctx, CLAIMS["rec-lra"], ["model", "rule", "at 1/4 of training", "at 1/2", "at 3/4",
                  "final held-out %", "train s"], rows, records, verdict, budget, draw)


# ---- claim 3: tpSGD within 5 % of BP on shallow networks ---------------------------------------------

# name: (tpSGD recipe, overrides of both rules, BP's [rule]); BP is the same recipe with [rule] replaced
TPSGD_SETTINGS = {
    "mlp (mnist5k)": ("mnist5k_tpsgd", ("model.name=mlp",), False),
    "cnn (mnist5k)": ("mnist5k_tpsgd", (), False),
    "rnn (mnist5k)": ("mnist5k_rnn_tpsgd", (), False),
    "cnn (cifar)": ("mnist5k_tpsgd", (), True),
}


def step_costs(recipe_path: str, overrides: Sequence[str], input_shape: tuple[int, int, int], batch: int,
               repeats: int) -> tuple[float, float]:
    """(peak saved-activation bytes, median step ms) of one training step of a recipe's rule and model
    on a random batch, on the CPU (``trainer.memory.SavedActivationMeter``; the timing interleaved)."""
    from trainer.memory import SavedActivationMeter
    from trainer.recipes import load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    rule, optimizer = recipe_rule(recipe, input_shape, 10, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *input_shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    model = rule.model
    rule.train_step(x, y, optimizer)  # warm-up (lazy state)
    with SavedActivationMeter(exclude=[*model.parameters(), *model.buffers()]) as meter:
        rule.train_step(x, y, optimizer)
    timing = time_interleaved({"step": lambda: rule.train_step(x, y, optimizer)}, "cpu", warmup=1, repeats=repeats)
    return meter.peak, timing["step"].median_ms


def tpsgd(ctx: Context, args: argparse.Namespace) -> dict:
    epochs = ctx.epochs or (1 if ctx.quick else 10)
    settings, shapes = {}, {}
    for name, (recipe, extra, cifar) in TPSGD_SETTINGS.items():
        data = tuple(ctx.data) if cifar else ()
        bp = derived_recipe(ctx, recipe, {"name": "bp"}, f"{recipe}_as_bp")
        common = (*data, *extra, f"train.epochs={epochs}", *_tiny(ctx))
        settings[(name, "tpsgd")] = Setting(f"{name} tpsgd", recipe, common)
        settings[(name, "bp")] = Setting(f"{name} bp", bp, common)
        shapes[name] = (3, 32, 32) if cifar else (1, 28, 28)
    results = train(ctx, list(settings.values()))
    table_in, rows, records = {}, [], []
    for name in TPSGD_SETTINGS:
        costs = {}
        for rule in ("bp", "tpsgd"):
            s = ctx.full(settings[(name, rule)])  # the model and rule as trained, --set's included
            path = s.recipe if s.recipe.endswith(".toml") else str(RECIPES / f"{s.recipe}.toml")
            model_overrides = [o for o in s.overrides if o.startswith(("model.", "rule."))]
            costs[rule] = step_costs(path, model_overrides, shapes[name], 64, 3 if ctx.quick else 20)
        acc = {rule: accuracies(results, settings[(name, rule)].label) for rule in ("bp", "tpsgd")}
        table_in[name] = {**acc, "memory_ratio": costs["tpsgd"][0] / costs["bp"][0],
                          "time_ratio": costs["tpsgd"][1] / costs["bp"][1]}
        bp_s, tp_s = Spread.of(acc["bp"]), Spread.of(acc["tpsgd"])
        rows.append([name, str(bp_s), str(tp_s), f"{bp_s.mean - tp_s.mean:.2f}",
                     f"{costs['bp'][0] / 2**20:.2f} / {costs['tpsgd'][0] / 2**20:.2f}",
                     f"{table_in[name]['memory_ratio']:.2f}",
                     f"{costs['bp'][1]:.1f} / {costs['tpsgd'][1]:.1f}", f"{table_in[name]['time_ratio']:.2f}"])
        for rule in ("bp", "tpsgd"):
            for seed, a in zip(ctx.seeds, acc[rule]):
                records.append({"setting": name, "rule": rule, "seed": seed, "accuracy_pct": a,
                                "saved_activation_bytes": costs[rule][0], "step_ms": costs[rule][1]})
    verdict = tpsgd_verdict(table_in)

    def draw(ax: Any) -> None:
        names = list(TPSGD_SETTINGS)
        for offset, rule in ((-0.2, "bp"), (0.2, "tpsgd")):
            spreads = [Spread.of(table_in[n][rule]) for n in names]
            ax.bar([i + offset for i in range(len(names))], [s.mean for s in spreads], 0.4,
                   yerr=[s.sd for s in spreads], capsize=3, label=rule)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set(ylabel="held-out accuracy (%)")

    budget = f"{epochs} epochs each, batch 64 (step cost at batch 64, CPU)"
    return report(ctx, CLAIMS["tpsgd"], ["setting", "bp %", "tpsgd %", "gap (points)", "saved MiB bp / tp",
                  "memory x", "step ms bp / tp", "time x"], rows, records, verdict, budget, draw)


# ---- claim 4: trace-estimation error against minibatch noise ------------------------------------------

TRACE_PROBES = (1, 4, 16, 64)


def gradient_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, probes: Sequence[int],
                   draws: int) -> dict[tuple[str, int], float]:
    """Per conv weight W (all but the first, which the rule keeps exact): ``E‖ĝ_r − g‖² / E‖g_B − ḡ‖²``.

    g is the exact gradient of the first minibatch of ``batch`` images, ĝ_r its trace estimate with r
    probes (mean over ``draws`` probe draws), g_B the exact gradient of each minibatch of x, ḡ their
    mean: the denominator is the sample variance of SGD's minibatch gradient (summed over W's
    entries), the noise SGD lives with at that batch size. BatchNorm uses batch statistics in both
    (train mode, running statistics frozen)."""
    from kernels import convert_to_trace_conv

    exact = copy.deepcopy(model).train()
    for module in exact.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    convs = [name for name, m in exact.named_modules() if isinstance(m, nn.Conv2d)][1:]
    criterion = nn.CrossEntropyLoss()

    def weight_grads(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        criterion(net(xb), yb).backward()
        modules = dict(net.named_modules())
        return {name: modules[name].weight.grad.detach().clone() for name in convs}

    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]
    per_batch = [weight_grads(exact, xb, yb) for xb, yb in batches]
    noise = {name: torch.stack([g[name] for g in per_batch]).var(0, unbiased=True).sum().item() for name in convs}
    out = {}
    for r in probes:
        traced = convert_to_trace_conv(copy.deepcopy(exact), probes=r, keep_first_exact=True, mask_relu=False,
                                       compact_bn=False)
        errors = {name: 0.0 for name in convs}
        for draw in range(draws):
            torch.manual_seed(draw)
            estimate = weight_grads(traced, *batches[0])
            for name in convs:
                errors[name] += (estimate[name] - per_batch[0][name]).pow(2).sum().item() / draws
        out.update({(name, r): errors[name] / noise[name] for name in convs})
    return out


def trace_noise(ctx: Context, args: argparse.Namespace) -> dict:
    from benchmarks.bench_trace_conv import saved_bytes
    from kernels import convert_to_trace_conv
    from trainer.checkpoint import load_checkpoint
    from trainer.data import build_data
    from trainer.evaluation import trained_model
    from trainer.models import build_model
    from trainer.recipes import load_recipe

    epochs = ctx.epochs or (2 if ctx.quick else 10)
    probes = args.probes or ([1, 4] if ctx.quick else list(TRACE_PROBES))
    common = (*ctx.data, f"train.epochs={epochs}", *_tiny(ctx))
    settings = {"exact": Setting("resnet20 bp", "cifar10_resnet20_bp", common)}
    traced = {r: Setting(f"resnet20 trace_bp r={r}", "cifar10_resnet20_trace_bp", (*common, f"rule.probes={r}"))
              for r in probes}
    early = Setting("resnet20 bp, 1 epoch", "cifar10_resnet20_bp", (*ctx.data, "train.epochs=1", *_tiny(ctx)))
    results = train(ctx, [settings["exact"]])
    first_seed = ctx.seeds[0]
    # trace_bp trains 3-5x slower than BP on a CPU: --accuracy-seeds N trains it with the first N seeds only
    results |= train(dataclasses.replace(ctx, seeds=ctx.seeds[: args.accuracy_seeds or None]), list(traced.values()))
    settings |= traced
    results |= train(dataclasses.replace(ctx, seeds=[first_seed]), [early])

    # the gradients at three points of BP's training: its initialisation, after one epoch, at the end
    recipe = load_recipe(RECIPES / "cifar10_resnet20_bp.toml", [*ctx.data, *_tiny(ctx), *ctx.overrides])
    batch = 16 if ctx.quick else 128
    data = build_data(recipe.data, torch.device("cpu"), batch, batch, seed=0)  # the runs' training images
    images = data.train  # uint8 images and labels, as the runs' loader holds them
    count = batch * (3 if ctx.quick else 8)
    order = torch.randperm(images.num_samples, generator=torch.Generator().manual_seed(0))[:count]
    torch.manual_seed(first_seed)
    fresh = build_model(recipe.model, data.input_shape, data.num_classes)
    points = {"init": (fresh, data.stats)}
    for point, setting in (("1 epoch", early), (f"{epochs} epochs", settings["exact"])):
        trained = trained_model(load_checkpoint(ctx.folder(setting, first_seed)), setting.label)
        points[point] = (trained.model, trained.stats)
    ratio = {}
    for point, (model, stats) in points.items():
        x = stats.apply(images.x[order])
        for (name, r), value in gradient_noise(model, x, images.y[order], batch, probes, 2 if ctx.quick else 8).items():
            ratio[(point, name, r)] = value

    def saved(r: int | None) -> float:
        torch.manual_seed(0)
        model = build_model(recipe.model, (3, 32, 32), 10).train()
        if r is not None:
            convert_to_trace_conv(model, probes=r)
        return float(sum(saved_bytes(model, torch.randn(128, 3, 32, 32)).values()))

    memory: dict[int | str, float] = {r: saved(r) for r in probes} | {"exact": saved(None)}
    claim_r = 16 if 16 in probes else probes[-1]
    verdict = trace_noise_verdict(ratio, memory, probes=claim_r)
    rows, records = [], []
    bp_acc = Spread.of(accuracies(results, settings["exact"].label))
    for r in [*probes, "exact"]:
        acc = bp_acc if r == "exact" else Spread.of(accuracies(results, settings[r].label))
        medians = [statistics.median(v for (p, _, rr), v in ratio.items() if p == point and rr == r)
                   for point in points] if r != "exact" else []
        rows.append([str(r), *([f"{m:.2f}" for m in medians] if medians else ["—"] * len(points)),
                     f"{memory[r] / 2**20:.1f}", str(acc)])
    for (point, name, r), value in ratio.items():
        records.append({"kind": "error_over_noise", "point": point, "conv": name, "probes": r, "value": value})
    for r in [*probes, "exact"]:
        records.append({"kind": "saved_activation_bytes", "point": "batch 128", "conv": "", "probes": r,
                        "value": memory[r]})
    for (label, seed), run in results.items():
        records.append({"kind": "accuracy", "point": label, "conv": "", "probes": seed,
                        "value": run.get("accuracy", "")})

    def draw(ax: Any) -> None:
        for point in points:
            ax.plot(probes, [statistics.median(v for (p, _, rr), v in ratio.items() if p == point and rr == r)
                             for r in probes], marker="o", label=f"median over convs, {point}")
        ax.axhline(10, color="grey", linestyle=":", label="10x minibatch noise")
        ax.axhline(1, color="grey", linestyle="--", label="1x minibatch noise")
        ax.set(xscale="log", yscale="log", xlabel="probes r", ylabel="trace error / minibatch variance")

    trained = len(ctx.seeds[: args.accuracy_seeds or None])
    budget = (f"ResNet-20, batch {batch}, {count} images for the minibatch variance, "
              f"{2 if ctx.quick else 8} probe draws; accuracy after {epochs} epochs (trace_bp: "
              f"{trained} seed{'s' if trained > 1 else ''})")
    return report(ctx, CLAIMS["trace-noise"], ["r", *(f"error/noise, {p}" for p in points), "saved MiB (b 128)",
                  "held-out %"], rows, records, verdict, budget, draw)


# ---- claim 5: the weight-transport baselines -----------------------------------------------------------

WEIGHT_TRANSPORT = {"bp": "cifar10_resnet20_bp", "usf": "cifar10_resnet20_usf", "kp": "cifar10_resnet20_kp_sgd"}


def final_angle(folder: Path) -> float | None:
    """The last logged B–W angle (``fb_angle``, mean over layers) of a run, if it logged one."""
    angles = [r["fb_angle"] for r in intact_records(folder) if "fb_angle" in r]
    return angles[-1] if angles else None


def weight_transport(ctx: Context, args: argparse.Namespace) -> dict:
    if args.from_table:  # the full-CIFAR table's runs: each rule's own recipe, at the table's budget
        runs = {rule: published(args.from_table, rule, ctx.seeds) for rule in WEIGHT_TRANSPORT}
        acc = {rule: [100 * full_cifar.read_json(folder / "results.json")["accuracy"] for folder in folders.values()]
               for rule, folders in runs.items()}
        kp_runs = runs["kp"]
        recipes = {rule: full_cifar.recipe_path(rule).stem for rule in runs}
        budget = table_budget(folder for folders in runs.values() for folder in folders.values())
    else:
        epochs = ctx.epochs or (1 if ctx.quick else 30)
        common = (*ctx.data, f"train.epochs={epochs}", *_tiny(ctx))
        settings = {rule: Setting(f"resnet20 {rule}", recipe, common) for rule, recipe in WEIGHT_TRANSPORT.items()}
        if args.kp_decay is not None:  # B aligns by the coupled decay: few steps need a larger one, and BP beside it
            decay = f"{args.kp_decay:g}"
            for rule, name in (("kp", "kp"), ("bp", "bp, kp's decay")):
                settings[name] = Setting(f"resnet20 {rule} wd {decay}", WEIGHT_TRANSPORT[rule],
                                         (*common, f"optim.weight_decay={decay}"))
        results = train(ctx, list(settings.values()))
        acc = {rule: accuracies(results, s.label) for rule, s in settings.items()}
        kp_runs = {seed: ctx.folder(settings["kp"], seed) for seed in ctx.seeds}
        recipes = {rule: " ".join((s.recipe, *s.overrides[len(common):])) for rule, s in settings.items()}
        kp_setting = ("kp: SGD with coupled weight decay" if args.kp_decay is None else
                      f"kp and a second bp: SGD with coupled weight decay {args.kp_decay:g}")
        budget = f"ResNet-20, {epochs} epochs, each rule's recipe ({kp_setting})"
    angles = {seed: a for seed, folder in kp_runs.items() if (a := final_angle(folder)) is not None}
    angle = statistics.fmean(angles.values()) if angles else None
    verdict = weight_transport_verdict(acc["bp"], acc["usf"], acc["kp"], angle, kp_bp=acc.get("bp, kp's decay"))
    spreads = {rule: Spread.of(a) for rule, a in acc.items()}
    rows = [[rule, recipes[rule], str(spreads[rule]), " ".join(f"{a:.1f}" for a in acc[rule]),
             f"{spreads[rule].mean - spreads['bp'].mean:+.2f}",
             f"{angle:.1f}" if rule == "kp" and angle is not None else "—"] for rule in acc]
    records = [{"rule": rule, "seed": seed, "accuracy_pct": a, "fb_angle": angles.get(seed, "") if rule == "kp" else ""}
               for rule in acc for seed, a in zip(ctx.seeds, acc[rule])]

    def draw(ax: Any) -> None:
        ax.bar(range(len(spreads)), [s.mean for s in spreads.values()], yerr=[s.sd for s in spreads.values()],
               capsize=4, label="held-out accuracy, mean ± sd")
        ax.set_xticks(range(len(spreads)), list(spreads))
        ax.set(ylabel="held-out accuracy (%)")

    return report(ctx, CLAIMS["weight-transport"], ["rule", "recipe", "held-out %", "per seed", "vs bp",
                  "B-W angle °"], rows, records, verdict, budget, draw)


# ---- the claims ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    source: str
    criterion: str
    run: Callable[[Context, argparse.Namespace], dict]


CLAIMS = {claim.name: claim for claim in [
    Claim("small-data", "hybrid DFA+BP and binary DFA train CNNs better than BP, especially on small data sets",
          "Han & Yoo 2019, Efficient CNN training with direct feedback alignment",
          "on ResNet-20 and the small CNN, at the two smallest class-balanced subsets of the CIFAR images, "
          "hybrid mean - BP mean and BDFA mean - BP mean both exceed the larger of the two sds "
          "(every run sees the same number of images)", small_data),
    Claim("rec-lra", "recursive LRA generalizes as well as backprop while converging sooner, on residual networks",
          "Ororbia et al. 2020, Large-scale gradient-free deep learning with recursive local representation alignment",
          "final held-out accuracy at most max(1 point, the larger sd) below BP's, and 90 % of BP's final accuracy "
          "reached in fewer epochs or fewer training seconds (mean curves over seeds), on every model", rec_lra),
    Claim("tpsgd", "tpSGD is within 5 % of BP on shallow fully-connected, convolutional and recurrent networks, "
          "with less memory and time", "Lomnitz et al. 2022, Learning with local gradients at the edge",
          "for an MLP, a CNN and an LSTM on mnist5k and the CNN on CIFAR images: BP mean - tpSGD mean <= 5 points, "
          "and tpSGD's peak saved activations and step time below BP's", tpsgd),
    Claim("trace-noise", "the error randomized trace estimation adds to a conv weight gradient is of the order of "
          "SGD's minibatch noise, and memory falls with the number of probes r",
          "Louboutin et al. 2021, Low-memory stochastic backpropagation with multi-channel randomized trace "
          "estimation",
          "at r = 16, the median over ResNet-20's convs of E|g_r - g|^2 / Var(g_B) is at most 10 at initialisation, "
          "after one epoch and at the end of training; saved activations rise strictly with r and stay below "
          "exact BP's", trace_noise),
    Claim("weight-transport", "sign symmetry (uSF) is about as good as BP; Kolen-Pollack is close to BP once B has "
          "aligned with W", "Liao et al. 2016; Akrout et al. 2019",
          "uSF and KP each no more than max(2 points, the larger sd) below BP; KP judged only once its final B-W "
          "angle is at most 45 degrees", weight_transport),
]}


def markdown_summary(*outs: Path) -> str:
    """One row per claim and ``--out`` folder that has its CLAIM.json (a folder per budget: the
    small-budget claims, the full-data ones), a claim's rows together: its budget (the data it was
    judged on), the setting, the numbers, the verdict."""
    lines = ["| claim | budget | the paper says | setting | numbers | verdict |", "|---|---|---|---|---|---|"]
    for name in CLAIMS:
        found = [json.loads(path.read_text()) for out in outs if (path := out / f"{name}.json").is_file()]
        for s in found:
            says = f"{s['statement']} ({s['source'].split(',')[0]})" if s is found[0] else "(as above)"
            numbers = "<br>".join(s["reasons"]).replace("|", "/")
            lines.append(f"| `{name}` | {s['data']} | {says} | {s['budget']}; seeds {', '.join(map(str, s['seeds']))} "
                         f"| {numbers} | **{s['verdict']}** |")
    return "\n".join(lines)


TABLE_CLAIMS = ("rec-lra", "weight-transport")  # --from-table: the claims the full-CIFAR table's runs answer
MODEL_CHOICES = {"small-data": SMALL_DATA_MODELS, "rec-lra": REC_LRA_MODELS}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claim", nargs="?", choices=sorted(CLAIMS))
    parser.add_argument("--list", action="store_true", help="name the claims, their sources and criteria")
    parser.add_argument("--markdown", action="store_true", help="print the claims table of the CLAIM.json files "
                        "in --out as Markdown (for BENCHMARKS.md); --out again for each budget, one row per claim "
                        "and folder")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (seconds): checks the code path, "
                        "the verdicts mean nothing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default 0 1 2)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (CPU threads are split among them)")
    parser.add_argument("--epochs", type=int, help="rec-lra, tpsgd, trace-noise, weight-transport: the budget")
    parser.add_argument("--npz", type=Path, help="the .npz of CIFAR images to split and train on")
    parser.add_argument("--cifar-root", type=Path, help="torchvision's CIFAR-10 folder (default data/cifar10)")
    parser.add_argument("--subsets", type=int, nargs="+", help="small-data: training-set sizes (0: all)")
    parser.add_argument("--rules", nargs="+", choices=list(SMALL_DATA_RULES), help="small-data: the rules to train "
                        "(default: all; bp, hybrid and bdfa are the claim's, dfa can be left out)")
    parser.add_argument("--images", type=int, help="small-data: training images each run sees (default 10,000)")
    parser.add_argument("--models", nargs="+", help="small-data: resnet20 cnn; rec-lra: resnet20 resnet18, each "
                        "NAME or NAME:EPOCHS (its own budget, else --epochs)")
    parser.add_argument("--probes", type=int, nargs="+", help="trace-noise: values of r (default 1 4 16 64)")
    parser.add_argument("--accuracy-seeds", type=int, help="trace-noise: train trace_bp with the first N seeds only "
                        "(the gradient noise does not depend on them; default: every seed)")
    parser.add_argument("--kp-decay", type=float, help="weight-transport: KP's coupled weight decay (B aligns by "
                        "it; few steps need more than the recipe's), with BP trained at it beside KP")
    parser.add_argument("--out", type=Path, action="append", help="where CLAIM.csv, CLAIM.json and CLAIM.png go "
                        "(default benchmarks/results/claims)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every "
                        "training a claim starts (e.g. train.amp=true), part of each run's recipe (repeatable)")
    parser.add_argument("--from-table", type=Path, metavar="DIR", help="rec-lra, weight-transport: read the "
                        "full-CIFAR table's published runs in DIR (benchmarks/results/cifar10_resnet20) instead "
                        "of training")
    parser.add_argument("--runs", type=Path, default=Path("bench_out/claims/runs"), help="the training runs' folders")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="read runs that finished in --runs with exactly the same recipe instead of training "
                        "them again (default; claims share runs); --no-reuse refuses a folder that holds a run")
    args = parser.parse_args(argv)
    if args.models and args.claim in MODEL_CHOICES:
        try:
            model_budgets(args.models, MODEL_CHOICES[args.claim], 1)
        except ValueError as error:
            parser.error(str(error))
        if args.claim == "small-data" and any(":" in m for m in args.models):
            parser.error("small-data: --models takes names only (the epochs follow from --images and --subsets)")
    elif args.models and args.claim:
        parser.error(f"--models applies to {' and '.join(MODEL_CHOICES)}, not {args.claim}")
    if args.rules and args.claim != "small-data":
        parser.error(f"--rules applies to small-data, not {args.claim}")
    if args.rules and not {"bp", "hybrid", "bdfa"} <= set(args.rules):
        parser.error("small-data: --rules must name bp, hybrid and bdfa (the claim compares them); dfa is optional")
    if args.from_table and args.claim not in TABLE_CLAIMS:
        parser.error(f"--from-table applies to {' and '.join(TABLE_CLAIMS)}, not {args.claim}")
    if args.from_table and (given := [flag for flag, used in (("--models", args.models), ("--epochs", args.epochs is
                            not None), ("--kp-decay", args.kp_decay is not None), ("--set", args.set)) if used]):
        parser.error(f"--from-table reads the table's runs at their own budget and recipes: drop {', '.join(given)}")
    if args.out and len(args.out) > 1 and not args.markdown:
        parser.error("--out: one folder for a claim's results (several only with --markdown, one per budget)")
    outs = args.out or [Path("benchmarks/results/claims")]
    console = make_console(150)
    if (args.list or args.claim is None) and not args.markdown:
        for claim in CLAIMS.values():
            console.print(f"[bold]{claim.name}[/]: {claim.statement} ({claim.source})\n  criterion: {claim.criterion}")
        return
    if args.markdown:
        print(markdown_summary(*outs))
        return
    try:
        ctx = context(args, outs[0], console)
        console.print(f"[bold]{args.claim}[/]: {CLAIMS[args.claim].statement}\ndata: {ctx.data_note}")
        CLAIMS[args.claim].run(ctx, args)
    except ConfigError as error:  # a bad --set, a subset larger than the data, a table's run not published
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def context(args: argparse.Namespace, out: Path, console: Any) -> Context:
    """The claim's Context from the command line: the CIFAR images (none for --from-table) and the
    number of training images they hold (``args.train_images``, small-data's subset 0)."""
    env = dict(os.environ)
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    common = dict(seeds=args.seeds, jobs=args.jobs, runs=args.runs, out=out, reuse=args.reuse, quick=args.quick,
                  epochs=args.epochs, console=console, env=env, overrides=tuple(args.set))
    if args.from_table:
        return Context(data=[], data_note=f"all of CIFAR-10: the full-CIFAR table's runs in {args.from_table}", **common)
    args.runs.mkdir(parents=True, exist_ok=True)
    chosen = cifar_data(args.npz, args.cifar_root, args.runs / "synthetic-cifar10.npz", 600 if args.quick else 5000)
    data = list(chosen.overrides)
    if "data.name=npz" in data:  # an .npz has no test split: hold out 10 %
        data.append("data.val_fraction=0.1")
    from trainer.data import load_images
    from trainer.recipes import load_recipe

    recipe = load_recipe(RECIPES / "cifar10_resnet20_bp.toml", [*data, *args.set])  # a bad --set fails here, at once
    train_images = len(load_images(recipe.data, False)[0].y)
    for subset in args.subsets or []:
        if not 0 <= subset <= train_images:
            raise ConfigError(f"--subsets {subset}: the training split holds {train_images} images; give 1 to "
                              f"{train_images} (or 0 for all)")
    args.train_images = train_images
    return Context(data=data, data_note=f"{chosen.description} ({train_images} training images)", **common)


if __name__ == "__main__":
    main()
