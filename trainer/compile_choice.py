"""What an unset ``train.compile`` ("auto") chooses: ``torch.compile`` where it pays for itself.

On CUDA it compiles: kernels fuse and launches fall, and compile time is small beside a GPU run.
On the CPU, inductor's C++ code is faster for some models and slower for others, and compiling
costs tens of seconds (training and evaluation graphs); so ``auto`` compiles only a (model, rule)
whose speed-up ``benchmarks/bench_cpu.py`` measured, and only when the run is long enough to win
the compile time back with a margin::

    saved = images · (1/rate_eager − 1/rate_compiled)      images = the run's training images
    compile  iff  rate_compiled ≥ MIN_SPEEDUP · rate_eager  and  saved ≥ PAYBACK · compile_s

An unmeasured model or rule stays eager on the CPU. ``train.compile = true / false`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SPEEDUP = 1.05  # below this the measurement's noise could be the whole gain
PAYBACK = 1.5  # the saving must beat the compile time by half again: a short run is never slower


@dataclass(frozen=True)
class Measured:
    """One row of bench_cpu: images/s eager and compiled, and the compile time (s)."""

    eager: float
    compiled: float
    compile_s: float


# (model name, rule name) -> measured on the CPU; see BENCHMARKS.md, "Compiled training on the CPU"
CPU_MEASURED: dict[tuple[str, str], Measured] = {}


def choose_compile(flag: bool | None, device_type: str, model: str, rule: str, images: int,
                   table: dict[tuple[str, str], Measured] | None = None) -> tuple[bool, str]:
    """Whether to compile, and why in words (the run's first lines say it). ``images``: the
    training images of the whole run (epochs × steps × batch)."""
    if flag is not None:
        return flag, f"compile = {str(flag).lower()} (set)"
    if device_type == "cuda":
        return True, "compile auto: on (CUDA)"
    measured = (CPU_MEASURED if table is None else table).get((model, rule))
    if measured is None:
        return False, f"compile auto: off (on the CPU, {model} under {rule} was not measured to gain; set train.compile = true to try)"
    speedup = measured.compiled / measured.eager
    if speedup < MIN_SPEEDUP:
        return False, f"compile auto: off (on the CPU, {model} under {rule} runs {speedup:.2f}x compiled)"
    saved = images * (1 / measured.eager - 1 / measured.compiled)
    if saved < PAYBACK * measured.compile_s:
        return False, (f"compile auto: off ({speedup:.2f}x compiled on the CPU would save ~{saved:.0f} s of this run, "
                       f"less than {PAYBACK:g}x the ~{measured.compile_s:.0f} s compile)")
    return True, (f"compile auto: on ({speedup:.2f}x on the CPU saves ~{saved:.0f} s of this run for a "
                  f"~{measured.compile_s:.0f} s compile)")
