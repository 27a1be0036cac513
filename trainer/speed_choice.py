"""What an unset ``train.channels_last`` and an unset ``train.compile`` ("auto") choose: each where it
was measured to pay on this kind of device.

The measurements are data, not code: ``trainer/cpu_speed.json`` (which ``benchmarks/bench_cpu.py
--write-defaults`` writes on the machine it runs on, and which says where and when it was measured).
channels_last (NHWC weights, hence NHWC activations from mkldnn's convolutions) costs nothing to
switch on, so on the CPU ``auto`` takes it for a (model, rule) measured at least ``MIN_SPEEDUP``
faster eager. ``torch.compile`` costs tens of seconds on the CPU
(training and evaluation graphs), and inductor's C++ code is faster for some models and slower for
others; so ``auto`` compiles a measured (model, rule) only when it gains in the layout chosen and the
run is long enough to win the compile time back with a margin::

    saved = images · (1/rate_eager − 1/rate_compiled)      images = the run's training images
    compile  iff  rate_compiled ≥ MIN_SPEEDUP · rate_eager  and  saved ≥ PAYBACK · compile_s

On CUDA it compiles (kernels fuse and launches fall; compile time is small beside a GPU run) and
keeps the default layout (channels_last on a GPU is unmeasured here). An unmeasured model or rule
stays eager in the default layout on the CPU; a pipeline keeps the default layout (its messages
assume it). ``true`` / ``false`` override either choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MIN_SPEEDUP = 1.10  # below this the measurement's noise (spreads of 3-35 %) could be the whole gain
PAYBACK = 1.5  # the saving must beat the compile time by half again: a short run is never slower
MEASURED_FILE = Path(__file__).with_name("cpu_speed.json")


@dataclass(frozen=True)
class Measured:
    """One row of bench_cpu: the trainer's images/s eager and compiled, each in the default layout
    and in channels_last, and the compile time (s; the larger of the two layouts')."""

    eager: float
    channels_last: float
    compiled: float
    compiled_channels_last: float
    compile_s: float


def load_measured(path: Path = MEASURED_FILE) -> dict[tuple[str, str], Measured]:
    """The (model, rule) rows of a measurements file (``trainer/cpu_speed.json``: images/s, where and
    how it was measured), which ``benchmarks/bench_cpu.py --write-defaults`` writes."""
    rows = json.loads(path.read_text())["rows"]
    return {(row["model"], row["rule"]): Measured(row["eager"], row["channels_last"], row["compiled"],
                                                  row["compiled_channels_last"], row["compile_s"]) for row in rows}


CPU_MEASURED: dict[tuple[str, str], Measured] = load_measured()


def _row(model: str, rule: str, table: dict[tuple[str, str], Measured] | None) -> Measured | None:
    return (CPU_MEASURED if table is None else table).get((model, rule))


def choose_channels_last(flag: bool | None, device_type: str, model: str, rule: str, pipeline_stages: int = 1,
                         table: dict[tuple[str, str], Measured] | None = None) -> tuple[bool, str]:
    """Whether to store the model's 4-D weights NHWC, and why in words (the run's first lines say it)."""
    if flag is not None:
        return flag, f"channels_last = {str(flag).lower()} (set)"
    if pipeline_stages > 1:
        return False, "channels_last auto: off (pipeline stages pass activations in the default layout)"
    if device_type != "cpu":
        return False, f"channels_last auto: off (unmeasured on {device_type}; set train.channels_last = true to try)"
    measured = _row(model, rule, table)
    if measured is None:
        return False, (f"channels_last auto: off (on the CPU, {model} under {rule} was not measured to gain; "
                       "set train.channels_last = true to try)")
    speedup = measured.channels_last / measured.eager
    if speedup < MIN_SPEEDUP:
        return False, f"channels_last auto: off (on the CPU, {model} under {rule} runs {speedup:.2f}x channels_last)"
    return True, f"channels_last auto: on ({speedup:.2f}x on the CPU, eager)"


def choose_compile(flag: bool | None, device_type: str, model: str, rule: str, images: int,
                   channels_last: bool = False,
                   table: dict[tuple[str, str], Measured] | None = None) -> tuple[bool, str]:
    """Whether to compile, and why in words (the run's first lines say it). ``images``: the
    training images of the whole run (epochs × steps × batch); ``channels_last``: the layout chosen."""
    if flag is not None:
        return flag, f"compile = {str(flag).lower()} (set)"
    if device_type == "cuda":
        return True, "compile auto: on (CUDA)"
    if device_type != "cpu":
        return False, f"compile auto: off (unmeasured on {device_type}; set train.compile = true to try)"
    measured = _row(model, rule, table)
    if measured is None:
        return False, f"compile auto: off (on the CPU, {model} under {rule} was not measured to gain; set train.compile = true to try)"
    eager, compiled = ((measured.channels_last, measured.compiled_channels_last) if channels_last
                       else (measured.eager, measured.compiled))
    layout = " channels_last" if channels_last else ""
    speedup = compiled / eager
    if speedup < MIN_SPEEDUP:
        return False, f"compile auto: off (on the CPU, {model} under {rule} runs {speedup:.2f}x compiled{layout})"
    saved = images * (1 / eager - 1 / compiled)
    if saved < PAYBACK * measured.compile_s:
        return False, (f"compile auto: off ({speedup:.2f}x compiled{layout} on the CPU would save ~{saved:.0f} s of "
                       f"this run, less than {PAYBACK:g}x the ~{measured.compile_s:.0f} s compile)")
    return True, (f"compile auto: on ({speedup:.2f}x{layout} on the CPU saves ~{saved:.0f} s of this run for a "
                  f"~{measured.compile_s:.0f} s compile)")
