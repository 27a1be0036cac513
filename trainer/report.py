"""What a run shows and writes while it trains: the header, a progress bar, metrics.jsonl lines and
the summary table. The loop hands it records; it decides how they look."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class MetricsLog:
    """metrics.jsonl: one JSON object a line. On resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def summary_table(history: list[dict[str, Any]], test_name: str) -> Table:
    """One row per epoch: training and evaluation loss and accuracy, throughput, peak memory."""
    table = Table(title="training summary")
    for col in ("epoch", "train loss", "train acc", f"{test_name} loss", f"{test_name} acc", "images/s", "peak MB"):
        table.add_column(col, justify="right")
    for r in history:
        table.add_row(
            str(r["epoch"]), f"{r['train_loss']:.4f}", f"{100 * r['train_accuracy']:.2f}%",
            f"{r['loss']:.4f}" if "loss" in r else "-", f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else "-",
            f"{r['images_per_s']:.0f}", f"{r['peak_memory_mb']:.0f}",
        )
    return table


class Reporter:
    """The run's output: ``console`` for people (quiet on ranks other than 0), ``log`` for machines
    (None where this rank writes no files)."""

    def __init__(self, console: Console, log: MetricsLog | None):
        self.console, self.log = console, log
        self._progress: Progress | None = None
        self._task: Any = None

    def header(self, text: str) -> None:
        self.console.print(text)

    @contextlib.contextmanager
    def running(self, steps_per_epoch: int) -> Iterator["Reporter"]:
        """The progress bar's lifetime: one bar, reset at every epoch."""
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False, disable=self.console.quiet,
        )
        with progress:
            self._progress, self._task = progress, progress.add_task("", total=steps_per_epoch, stats="")
            try:
                yield self
            finally:
                self._progress = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._progress.reset(self._task, total=steps, description=f"epoch {epoch + 1}/{epochs}", stats="")

    def step(self, record: dict[str, Any]) -> None:
        """A training record every ``log_every`` steps: to the log whole; to the bar the rate, loss,
        learning rate and the diagnostics whose keys have no "/" (per-unit keys are logged only)."""
        if self.log:
            self.log.write(record)
        core = {"step", "epoch", "split", "loss", "lr", "images_per_s", "peak_memory_mb"}
        extra = "".join(f" · {k} {v:.3g}" for k, v in record.items() if k not in core and "/" not in k)
        self._progress.update(self._task, stats=f"{record['images_per_s']:,.0f} img/s · loss {record['loss']:.4f} · "
                                                f"lr {record['lr']:.3g}{extra}")

    def advance(self) -> None:
        self._progress.advance(self._task)

    def end_epoch(self, summary: dict[str, Any], test_name: str) -> None:
        if self.log:
            self.log.write({"split": test_name, **summary})
        shown = f" · {test_name} acc {100 * summary['accuracy']:.2f}%" if "accuracy" in summary else ""
        self._progress.update(self._task, stats=f"{summary['images_per_s']:,.0f} img/s · "
                                                f"loss {summary['train_loss']:.4f}{shown}")

    def summary(self, history: list[dict[str, Any]], test_name: str) -> None:
        if history:
            self.console.print(summary_table(history, test_name))
