"""Reading run folders back: ``trainer runs`` (a table of runs and their states) and ``trainer plot``
(training and held-out curves). Needs no torch; plots need matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, tomllib
from trainer.report import read_metrics
from trainer.run_folder import CHECKPOINT_NAME, LOCK_NAME, lock_owner

def read_records(run: Path) -> list[dict[str, Any]]:
    """The complete records of a run's metrics.jsonl (a half-written last line is skipped)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run}: no metrics.jsonl (not a run folder?)")
    return read_metrics(path)[0]


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
    state: str  # finished, running, interrupted, diverged, empty


def _recipe_epochs(run: Path) -> tuple[str, int | None]:
    """(rule name, train.epochs) from the run's recipe.toml, by reading two keys of it."""
    try:
        tree = tomllib.loads((run / "recipe.toml").read_text())
        return str(tree.get("rule", {}).get("name", "?")), tree.get("train", {}).get("epochs")
    except (OSError, ValueError):
        return "?", None


def summarize(run: Path) -> RunSummary:
    """A run folder's recipe, progress, accuracy and state."""
    try:
        results = json.loads((run / "results.json").read_text())
    except (OSError, ValueError):
        results = {}
    try:
        records = read_records(run)
    except ConfigError:
        records = []
    epochs_done = [r for r in records if r.get("split") not in (None, "train") and "train_loss" in r]
    accuracies = [r["accuracy"] for r in epochs_done if "accuracy" in r]
    rule, epochs = _recipe_epochs(run)
    if (run / LOCK_NAME).exists() and lock_owner(run) is not None:
        state = "running"
    elif results.get("state") in ("finished", "diverged"):
        state = results["state"]
    elif (run / CHECKPOINT_NAME).exists() or epochs_done:
        state = "interrupted"
    else:
        state = "empty"
    recipe = Path(str(results.get("recipe", ""))).stem or run.name
    return RunSummary(run, recipe, results.get("rule", rule), len(epochs_done), epochs,
                      max(accuracies) if accuracies else None, accuracies[-1] if accuracies else None,
                      epochs_done[-1].get("images_per_s") if epochs_done else None, state)


def find_runs(root: Path) -> list[Path]:
    """Run folders at or below ``root`` (folders holding a recipe.toml or a metrics.jsonl)."""
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    found = {p.parent for name in ("recipe.toml", "metrics.jsonl") for p in root.rglob(name)}
    return sorted(found)


def run_labels(runs: list[Path]) -> list[str]:
    """Short names that tell the runs apart: their paths below the folder they share
    (runs/bp/seed0 and runs/fa/seed0 become bp/seed0 and fa/seed0)."""
    resolved = [run.resolve() for run in runs]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    return [str(run.relative_to(common)) if run != common else run.name for run in resolved]


def plot_runs(runs: list[Path], metric: str, out: Path) -> Path:
    """Training and held-out ``metric`` (accuracy or loss) per epoch, one colour per run; training
    loss also at every logged step. Written as a PNG of 1000 x 500 pixels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("trainer plot needs matplotlib: pip install 'bpfree-trainer[plot]'") from None
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    for index, (run, label) in enumerate(zip(runs, run_labels(runs))):
        records = read_records(run)
        epochs = [r for r in records if r.get("split") not in (None, "train") and "train_loss" in r]
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
    return out
