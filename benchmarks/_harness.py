"""What every benchmark shares, so that the scripts differ only in what they measure.

* Timers. ``time_ops`` is for kernel-sized calls: ``triton.testing.do_bench`` on CUDA (warm-up, L2
  flushed between calls, median and 20th/80th percentiles). ``time_interleaved`` is for whole
  training steps on any device and for every CPU timing: the candidates run round-robin, one call
  each per round with the device synchronised around it, so a change in the machine's load hits all
  of them alike and their ratios stay fair.
* ``PeakMemory``: CUDA allocator peak (reset on entry); on a CPU the saved-activation meter
  (``trainer.memory.SavedActivationMeter``) when activations are what is measured, else peak RSS.
* ``sync``, ``environment`` (device, versions, date, command), ``write_results`` (.json or .csv),
  ``table`` (a rich table with text left and numbers right), and ``cifar_data``: real CIFAR-10 when
  the user has it, else synthetic images of the same shape, saying which.
* What trains is what gets measured: ``session_steps`` steps a ``trainer.session.Session`` by the
  loop's own step, ``recipe_rule`` and ``cifar_rule`` build through ``trainer.session.build_trainee``
  (as ``build_session`` does), and ``cycle`` feeds epochs without end; a run's metrics.jsonl is read
  by ``trainer.runs`` (``intact_records``), never parsed here.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
CIFAR_ROOT = Path("data/cifar10")  # the CIFAR recipes' own data.root


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a wall clock around it is honest."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 20th and 80th percentiles, and how they were taken."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str  # "do_bench" or "interleaved"

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how far one figure can be trusted."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_interleaved(candidates: Mapping[str, Callable[[], object]], device: torch.device | str, *,
                     warmup: int, repeats: int) -> dict[str, Timing]:
    """Time the candidates round-robin: ``warmup`` untimed rounds (compilation, allocator), then
    ``repeats`` rounds in which each candidate is called once between two device syncs."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + max(1, repeats)):
        for name, call in candidates.items():
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            if round_index >= warmup:
                samples[name].append(1000 * (time.perf_counter() - start))
    timings = {}
    for name, values in samples.items():
        ordered = sorted(values)
        timings[name] = Timing(*(_quantile(ordered, q) for q in QUANTILES), method="interleaved")
    return timings


def time_ops(ops: Mapping[str, Callable[[], object]], device: torch.device | str, *, quick: bool = False,
             cpu_repeats: int = 5) -> dict[str, Timing]:
    """Time kernel-sized calls: ``do_bench`` on CUDA (25 ms warm-up and 100 ms of repeats, a third
    of that when ``quick``), else one warm-up round and ``cpu_repeats`` interleaved rounds."""
    if torch.device(device).type != "cuda":
        return time_interleaved(ops, device, warmup=1, repeats=cpu_repeats)
    import triton.testing

    warmup_ms, rep_ms = (10, 30) if quick else (25, 100)
    return {name: Timing(*triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)),
                         method="do_bench")
            for name, call in ops.items()}


class PeakMemory:
    """Peak memory over a ``with`` block.

    CUDA: ``max_memory_allocated`` (reset on entry); ``bytes`` is the peak above what was allocated
    on entry (what the block itself needed), ``total_bytes`` the whole peak. CPU with
    ``activations=True``: the peak of live bytes autograd saves for backward, ``exclude`` (parameters,
    buffers) not counted. CPU otherwise: the process's peak RSS (a high-water mark that cannot be
    reset, so only a fresh process measures one thing).
    """

    def __init__(self, device: torch.device | str, *, activations: bool = False, exclude: Iterable[torch.Tensor] = ()):
        self.device = torch.device(device)
        self.bytes = 0
        self.total_bytes: int | None = None
        if self.device.type == "cuda":
            self.method = "cuda max_memory_allocated"
        elif activations:
            from trainer.memory import SavedActivationMeter

            self._meter = SavedActivationMeter(exclude=exclude)
            self.method = "saved activations (saved_tensors_hooks)"
        else:
            self.method = "peak RSS of the process"

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif hasattr(self, "_meter"):
            self._meter.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.total_bytes = torch.cuda.max_memory_allocated(self.device)
            self.bytes = self.total_bytes - self._base
        elif hasattr(self, "_meter"):
            self._meter.__exit__(*exc)
            self.bytes = self._meter.peak
        else:
            self.bytes = self.total_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def hardware_name(device: torch.device | str) -> str:
    """The hardware a result was measured on, in words (not ``trainer.devices.device_name``, which
    resolves a recipe's ``[train] device``): the GPU's name, or the CPU's architecture, cores and
    the vector instructions PyTorch uses on it (AVX2, AVX512: bf16 is native only with the latter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Where and how a result was measured: device, versions, threads, date and the command line."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": str(device), "device_name": hardware_name(device), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command_line()}


def command_line() -> str:
    """This process's command as it is typed again: ``python -m benchmarks.NAME ...`` for a script run
    as a module (``sys.argv[0]`` is then the file's full path, which is not how it is run)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    script = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return shlex.join([Path(sys.executable).name, *script, *sys.argv[1:]])


def _plain(value: Any) -> Any:
    """JSON-ready: Timings and dataclasses become dicts, paths and dtypes strings."""
    if isinstance(value, Timing):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    return value


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(value), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as CSV, with the union of their keys (in first-seen order) as the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [_plain(dict(row)) for row in rows]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_results(path: Path | None, meta: Mapping[str, Any], tables: Mapping[str, Sequence[Mapping[str, Any]]],
                  headline: Mapping[str, Any] | None = None, console: Console | None = None) -> None:
    """A benchmark's results: .csv writes every table's rows (with a ``table`` column); anything
    else writes JSON ``{meta, headline, tables}``, which ``gpu_check.py`` collects. None: nothing."""
    if path is None:
        return
    if path.suffix == ".csv":
        write_csv(path, [{"table": name, **row} for name, rows in tables.items() for row in rows])
    else:
        write_json(path, {"meta": meta, "headline": headline or {}, "tables": tables})
    if console is not None:
        console.print(f"wrote {path}")


def make_console(min_width: int = 150) -> Console:
    """A console wide enough for the tables even when the output is a pipe or a file."""
    return Console(width=max(Console().width, min_width))


def table(title: str, columns: Sequence[str], left: Collection[str] = (), caption: str | None = None) -> Table:
    """A rich table: the first column and those named in ``left`` (text) left-aligned, numbers right."""
    result = Table(title=title, caption=caption)
    for index, column in enumerate(columns):
        result.add_column(column, justify="left" if index == 0 or column in left else "right")
    return result


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float32."""
    got, want = got.float(), want.float()
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()


# ---- CIFAR-10 images for the benchmarks that train -------------------------------------------------


def write_synthetic_cifar(path: Path, images: int, seed: int = 0) -> Path:
    """CIFAR-shaped images (uint8 32x32x3, 10 classes) in an .npz: noise around a colour of the
    class, so that a loss can fall. Speed and memory are those of CIFAR; accuracy means nothing."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, images)
    colours = rng.integers(40, 216, (10, 1, 1, 3))
    x = colours[labels] + rng.normal(0, 40, (images, 32, 32, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.clip(x, 0, 255).astype(np.uint8), y=labels.astype(np.int64))
    return path


@dataclass(frozen=True)
class CifarData:
    """Which CIFAR images a run uses: the recipe overrides that select them, and a line saying so."""

    overrides: tuple[str, ...]
    description: str


def cifar_data(npz: Path | None, root: Path | None, synthetic_path: Path, synthetic_images: int = 5000) -> CifarData:
    """``npz`` if given; else torchvision's CIFAR-10 under ``root`` (default ``data/cifar10``, the
    recipes' own) when it is there; else synthetic CIFAR-shaped images written to ``synthetic_path``."""
    if npz is not None:
        return CifarData(("data.name=npz", f"data.path={json.dumps(str(npz.resolve()))}"), f"npz {npz}")
    folder = root if root is not None else CIFAR_ROOT
    if (folder / "cifar-10-batches-py").is_dir():
        return CifarData(("data.name=cifar10", f"data.root={json.dumps(str(folder.resolve()))}"),
                         f"CIFAR-10 (torchvision) under {folder}")
    if root is not None:
        raise SystemExit(f"{root}: no cifar-10-batches-py/ there (torchvision's CIFAR-10 layout)")
    write_synthetic_cifar(synthetic_path, synthetic_images)
    return CifarData(("data.name=npz", f"data.path={json.dumps(str(synthetic_path.resolve()))}"),
                     f"SYNTHETIC CIFAR-shaped images ({synthetic_images}): no CIFAR-10 found (pass --npz or "
                     f"--cifar-root); speed and memory hold, accuracy means nothing")


# ---- the trainer's own training steps ----------------------------------------------------------------


def cycle(make_epoch: Callable[[int], Iterable[Any]]) -> Iterator[Any]:
    """The batches of ``make_epoch(0)``, then of ``make_epoch(1)``, and so on without end: a benchmark
    takes as many steps as it times, whatever the epoch's length."""
    for epoch in itertools.count():
        yield from make_epoch(epoch)


def session_steps(session: Any) -> Iterator[tuple[int, Any, str | None]]:
    """The training steps of a ``trainer.session.Session`` without end, each taken by the loop's own
    ``trainer.loop.training_step`` (the update, the layout's after-step, the schedule's step) on the
    next batch of the session's loader, epoch after epoch; each ``next`` takes one step and gives
    (its images, its ``StepResult``, the layout's note or None)."""
    from trainer.loop import training_step

    per_epoch = len(session.data.train)
    for taken, (x, y) in enumerate(cycle(session.data.train.batches)):
        out, note = training_step(session, x, y, taken, taken // per_epoch, (taken + 1) % per_epoch == 0)
        yield len(y), out, note


# ---- rules on CIFAR models for the step benchmarks --------------------------------------------------

CIFAR_SHAPE, CIFAR_CLASSES = (3, 32, 32), 10
RESNET18_CIFAR = {"name": "resnet18", "cifar_stem": True}


def add_step_arguments(parser: Any, batch: int | None) -> None:
    """The flags of the training-step benchmarks: batch (None: the benchmark chooses it after parsing,
    e.g. by the suite asked for), steps, warm-up, device, compile, amp, out."""
    import argparse

    parser.add_argument("--batch", type=int, default=batch,
                        help="images a step" + (" (default: the suite's)" if batch is None else ""))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per rule")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per rule (compilation, allocator)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the units / model (default: on for CUDA)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA)")
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .csv)")


def step_settings(args: Any) -> tuple[torch.device, bool, bool]:
    """(device, compile, amp) from ``add_step_arguments``' flags: compile and bf16 default to on for CUDA."""
    from trainer.devices import on_cuda_by_default, resolve_device

    device = resolve_device(args.device)
    return device, on_cuda_by_default(args.compile, device.type), on_cuda_by_default(args.amp, device.type)


def cifar_rule(rule: str, options: Mapping[str, Any], device: torch.device, *, compile: bool = False,
               amp: bool = False, optim: Mapping[str, Any] | None = None,
               model: Mapping[str, Any] = RESNET18_CIFAR) -> tuple[Any, torch.optim.Optimizer]:
    """(rule, optimizer) training a fresh CIFAR model (``[model]`` keys; default ResNet-18 with the
    CIFAR stem; 10 classes, 32x32 images), built through the recipe schema as ``trainer run`` builds
    it: validated options, the session's optimizer groups. ``optim``: the recipe's ``[optim]`` keys
    (default SGD + Nesterov)."""
    from trainer.recipes import recipe_from_dict

    recipe = recipe_from_dict({"model": dict(model), "rule": {"name": rule, **options},
                               "optim": dict(optim or {}), "train": {"compile": compile, "amp": amp}},
                              source=f"benchmark rule {rule!r}")
    return recipe_rule(recipe, CIFAR_SHAPE, CIFAR_CLASSES, device)


def recipe_rule(recipe: Any, input_shape: tuple[int, ...], num_classes: int,
                device: torch.device) -> tuple[Any, torch.optim.Optimizer]:
    """(rule, optimizer) of a validated recipe's ``[model]``, ``[rule]`` and ``[optim]``, on a fresh
    model seeded by ``train.seed``, built by ``trainer.session.build_trainee`` as ``trainer run``
    builds them (its memory layout, its compile choice for a run of unknown length, divergence left
    to the loop); the data is not loaded."""
    from trainer.session import build_trainee

    torch.manual_seed(recipe.train.seed)
    trainee = build_trainee(recipe, device, tuple(input_shape), num_classes, images=0)
    trainee.rule.train()
    return trainee.rule, trainee.optimizer


def cifar_batch(size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random CIFAR-shaped batch (step time and memory do not depend on the pixel values)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *CIFAR_SHAPE, generator=gen)
    y = torch.randint(0, CIFAR_CLASSES, (size,), generator=gen)
    return x.to(device), y.to(device)
