"""What a run shows and writes while it trains: the header, progress, metrics.jsonl lines and the
summary table. The loop hands it records; it decides how they look.

In a terminal the progress is a rich bar with throughput, and a line per finished epoch above it;
anywhere else (CI, ``nohup``, a log file) it is one plain line every ``train.log_every`` steps and
one per epoch, never clipped.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

CORE_KEYS = frozenset({"step", "epoch", "split", "loss", "lr", "images_per_s", "peak_memory_mb", "time"})


def now() -> str:
    """A wall-clock timestamp for records (UTC, ISO 8601)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


_NUMBER = ((int, float), "a number")
RECORD_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "step": (int, "an integer"), "epoch": (int, "an integer"), "split": (str, "a string"), "time": (str, "a string"),
    **{key: _NUMBER for key in ("loss", "accuracy", "train_loss", "train_accuracy", "lr", "images_per_s",
                                "peak_memory_mb", "train_seconds")},
}  # what readers of metrics.jsonl rely on; other keys (rule diagnostics) are free
EPOCH_KEYS = ("train_loss", "train_accuracy", "images_per_s", "peak_memory_mb")  # an epoch's record has them all


TORN = "not a complete record (a run killed mid-write)"  # a non-JSON last line: not damage, a killed run's


def type_problem(fields: dict[str, Any], types: dict[str, tuple[type | tuple[type, ...], str]]) -> str | None:
    """The first of ``fields`` whose value is not of its type in ``types`` (bools are no numbers),
    said for people, or None."""
    for key, value in fields.items():
        if key in types and (isinstance(value, bool) or not isinstance(value, types[key][0])):
            return f"{key} is {json.dumps(value)[:40]}, not {types[key][1]}"
    return None


def record_problem(record: Any) -> str | None:
    """Why a parsed metrics line is not a record this trainer wrote (not an object, a key missing, a
    value of the wrong type), or None: readers then need no checks of their own."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    needed = ("step", "epoch", *(("loss",) if record.get("split") == "train" else EPOCH_KEYS))
    missing = [key for key in needed if key not in record]
    return f"no {missing[0]!r}" if missing else type_problem(record, RECORD_TYPES)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The records of a metrics.jsonl, and (line number, what is wrong) for every other line: the
    last line a killed run left half-written (``TORN``), or one damaged since."""
    records, broken = [], []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            broken.append((number, TORN if number == len(lines) else "not JSON"))
            continue
        problem = record_problem(record)
        if problem is not None:
            broken.append((number, problem))
            continue
        records.append(record)
    return records, broken


class MetricsLog:
    """metrics.jsonl: one JSON object a line. On resume, lines past the checkpoint are dropped, and
    so is a line that a killed run left half-written (``notes`` says so)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.kept: list[dict[str, Any]] = []
        self.notes: list[str] = []
        if resume_step is None or not path.exists():
            path.write_text("")
            return
        records, broken = read_metrics(path)
        self.notes = [f"dropped line {number} of {path}: {problem}" for number, problem in broken]
        self.kept = [r for r in records if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": now()}) + "\n")


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


def _extras(record: dict[str, Any]) -> str:
    """Diagnostics for people: keys without a "/" (per-unit keys are logged only)."""
    return "".join(f" · {k} {v:.3g}" for k, v in record.items() if k not in CORE_KEYS and "/" not in k
                   and isinstance(v, (int, float)))


class Reporter:
    """The run's output: ``console`` for people (quiet on ranks other than 0), ``log`` for machines
    (None where this rank writes no files)."""

    def __init__(self, console: Console, log: MetricsLog | None):
        self.console, self.log = console, log
        self.live = console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._epoch = ""

    def say(self, text: str) -> None:
        """One line, never wrapped (paths and keys stay whole)."""
        self.console.print(text, soft_wrap=True, highlight=False)

    @contextlib.contextmanager
    def running(self, steps_per_epoch: int) -> Iterator["Reporter"]:
        """The progress bar's lifetime (a terminal only): one bar, reset at every epoch."""
        if not self.live:
            yield self
            return
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
        self._epoch = f"epoch {epoch + 1}/{epochs}"
        if self._progress is not None:
            self._progress.reset(self._task, total=steps, description=self._epoch, stats="")

    def step(self, record: dict[str, Any], step_in_epoch: int, steps: int) -> None:
        """A training record every ``log_every`` steps: to the log whole, to people in short."""
        if self.log:
            self.log.write(record)
        stats = (f"{record['images_per_s']:,.0f} img/s · loss {record['loss']:.4f} · lr {record['lr']:.3g}"
                 f"{_extras(record)}")
        if self._progress is not None:
            self._progress.update(self._task, stats=stats)
        else:
            self.say(f"{self._epoch} · step {step_in_epoch}/{steps} · {stats}")

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def end_epoch(self, summary: dict[str, Any], test_name: str) -> None:
        """An epoch's line, kept when the bar is reset for the next epoch."""
        if self.log:
            self.log.write({"split": test_name, **summary})
        shown = f" · {test_name} acc {100 * summary['accuracy']:.2f}%" if "accuracy" in summary else ""
        stats = f"{summary['images_per_s']:,.0f} img/s · loss {summary['train_loss']:.4f}{shown}"
        self.say(f"{self._epoch} done · {stats} · {summary['train_seconds']:.1f} s")  # above a bar: it stays

    def summary(self, history: list[dict[str, Any]], test_name: str) -> None:
        if history:
            self.console.print(summary_table(history, test_name))

    def note(self, text: str) -> None:
        self.say(f"[dim]note:[/] {escape(text)}")
