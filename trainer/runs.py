"""Reading run folders back: ``trainer runs`` (a table of runs and their states) and ``trainer plot``
(training and held-out curves). Needs no torch; plots need matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, path_kind, tomllib
from trainer.report import RECORD_TYPES, TORN, read_metrics, type_problem
from trainer.run_folder import CHECKPOINT_NAME, LOCK_NAME, lock_owner


def read_records(run: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The records of a run's metrics.jsonl, and (line number, what is wrong) for its other lines."""
    path = run / "metrics.jsonl"
    if path_kind(path, "run folder") != "file":
        raise ConfigError(f"{run}: no metrics.jsonl (not a run folder?)")
    return read_metrics(path)


def intact_records(run: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, for readers that draw conclusions from its curve (the
    benchmarks): a damaged line is a ConfigError naming it, since the curve would silently lack that
    record; a last line that a killed run left half-written is no damage and is left out."""
    records, broken = read_records(run)
    damaged = [(number, problem) for number, problem in broken if problem != TORN]
    if damaged:
        number, problem = damaged[0]
        raise ConfigError(f"{run / 'metrics.jsonl'} line {number}: {problem}; train the run again (or mend the "
                          "line) before reading its curve")
    return records


@dataclass
class RunSummary:
    """One row of ``trainer runs``."""

    path: Path
    recipe: str
    rule: str
    epochs_done: int
    epochs: int | None
    best: float | None  # held-out accuracy
    last: float | None
    images_per_s: float | None
    state: str  # finished, running, interrupted, diverged, empty; damaged (FILE: what) when a file is


RESULT_TYPES = {
    **RECORD_TYPES, **dict.fromkeys(("state", "recipe", "rule", "device", "message", "note"), (str, "a string")),
    **dict.fromkeys(("epochs", "steps", "world_size", "pipeline_stages"), (int, "an integer")),
    "rule_state_mb": RECORD_TYPES["train_seconds"], "epoch_seconds": (list, "a list"),
}  # the keys of results.json (trainer.loop), which may also hold an epoch's record


def _read_results(run: Path) -> dict[str, Any]:
    """results.json's keys that ``trainer runs`` shows ({} when there is none); ValueError names a damaged one."""
    path = run / "results.json"
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError("results.json: not JSON") from None
    if not isinstance(results, dict):
        raise ValueError("results.json: not a JSON object")
    problem = type_problem(results, RESULT_TYPES)
    if problem is not None:
        raise ValueError(f"results.json: {problem}")
    return results


def _recipe_epochs(run: Path) -> tuple[str, int | None]:
    """(rule name, train.epochs) from the run's recipe.toml, by reading two keys of it (("?", None)
    without one); ValueError names a damaged one."""
    path = run / "recipe.toml"
    if not path.exists():
        return "?", None
    try:
        tree = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError("recipe.toml: not TOML") from None
    rule, train = tree.get("rule", {}), tree.get("train", {})
    name = rule.get("name", "?") if isinstance(rule, dict) else None
    epochs = train.get("epochs") if isinstance(train, dict) else "not a table"
    if not isinstance(name, str):
        raise ValueError("recipe.toml: [rule] name is not a string")
    if epochs is not None and type(epochs) is not int:
        raise ValueError("recipe.toml: [train] epochs is not an integer")
    return name, epochs


def summarize(run: Path) -> RunSummary:
    """A run folder's recipe, progress, accuracy and state; what can be read of a damaged one."""
    damage: list[str] = []
    results: dict[str, Any] = {}
    rule, epochs = "?", None
    try:
        results = _read_results(run)
    except ValueError as err:
        damage.append(str(err))
    try:
        rule, epochs = _recipe_epochs(run)
    except ValueError as err:
        damage.append(str(err))
    try:
        records, broken = read_records(run)
    except ConfigError:
        records, broken = [], []
    damage += [f"metrics.jsonl line {number}: {problem}" for number, problem in broken if problem != TORN]
    epochs_done = [r for r in records if r.get("split") not in (None, "train")]
    accuracies = [r["accuracy"] for r in epochs_done if "accuracy" in r]
    if damage:
        state = f"damaged ({damage[0]}{f'; {len(damage) - 1} more' if len(damage) > 1 else ''})"
    elif (run / LOCK_NAME).exists() and lock_owner(run) is not None:
        state = "running"
    elif results.get("state") in ("finished", "diverged"):
        state = results["state"]
    elif (run / CHECKPOINT_NAME).exists() or epochs_done:
        state = "interrupted"
    else:
        state = "empty"
    recipe = Path(results.get("recipe", "")).stem or run.name
    return RunSummary(run, recipe, results.get("rule", rule), len(epochs_done), epochs,
                      max(accuracies) if accuracies else None, accuracies[-1] if accuracies else None,
                      epochs_done[-1]["images_per_s"] if epochs_done else None, state)


def find_runs(root: Path) -> list[Path]:
    """Run folders at or below ``root`` (folders holding a recipe.toml or a metrics.jsonl)."""
    if path_kind(root, "run folder") != "folder":
        raise ConfigError(f"{root}: no such folder")
    found = {p.parent for name in ("recipe.toml", "metrics.jsonl") for p in root.rglob(name)}
    return sorted(found)


def run_labels(runs: list[Path]) -> list[str]:
    """Short names that tell the runs apart: their paths below the folder they share
    (runs/bp/seed0 and runs/fa/seed0 become bp/seed0 and fa/seed0)."""
    resolved = [run.resolve() for run in runs]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    return [str(run.relative_to(common)) if run != common else run.name for run in resolved]


def plot_runs(runs: list[Path], metric: str, out: Path) -> list[str]:
    """Training and held-out ``metric`` (accuracy or loss) per epoch, one colour per run; training
    loss also at every logged step. Written as a PNG of 1000 x 500 pixels. Returns a warning for
    each run whose metrics.jsonl has damaged lines (they are skipped)."""
    try:
        import matplotlib  # noqa: PLC0415 -- matplotlib is optional (the plot extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415
    except ImportError:
        raise ConfigError("trainer plot needs matplotlib: pip install 'bpfree-trainer[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()  # matplotlib takes the format from the name's ending
    if out.suffix and out.suffix[1:].lower() not in formats:
        raise ConfigError(f"--out {out}: cannot write {out.suffix} images; name a file ending in "
                          f"{', '.join('.' + name for name in sorted(formats))}")
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    warnings: list[str] = []
    for index, (run, label) in enumerate(zip(runs, run_labels(runs))):
        records, broken = read_records(run)
        damaged = [(number, problem) for number, problem in broken if problem != TORN]
        if damaged:
            warnings.append(f"{run / 'metrics.jsonl'}: skipped {len(damaged)} damaged line(s) (line {damaged[0][0]}: "
                            f"{damaged[0][1]})")
        epochs = [r for r in records if r.get("split") not in (None, "train")]
        colour = f"C{index % 10}"
        if metric == "loss":
            steps = [r for r in records if r.get("split") == "train"]
            per_epoch = max((r["step"] for r in epochs), default=1) / max(len(epochs), 1)
            ax.plot([r["step"] / per_epoch for r in steps], [r["loss"] for r in steps], color=colour, alpha=0.35,
                    label=f"{label} train (steps)")
        ax.plot([r["epoch"] for r in epochs], [r[f"train_{metric}"] for r in epochs], color=colour, linestyle="--",
                marker=".", label=f"{label} train")
        held = [r for r in epochs if metric in r]
        ax.plot([r["epoch"] for r in held], [r[metric] for r in held], color=colour, marker="o",
                label=f"{label} {held[0]['split'] if held else 'held-out'}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write the plot ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    return warnings
