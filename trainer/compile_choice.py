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

MIN_SPEEDUP = 1.10  # below this the measurement's noise (spreads of 3-35 %) could be the whole gain
PAYBACK = 1.5  # the saving must beat the compile time by half again: a short run is never slower


@dataclass(frozen=True)
class Measured:
    """One row of bench_cpu: images/s eager and compiled, and the compile time (s)."""

    eager: float
    compiled: float
    compile_s: float


# (model name, rule name) -> images/s at bench_cpu's batch (128; the ViT 256) on 2 cores, 2026-12-02,
# `python -m benchmarks.bench_cpu --npz cifar10-mini-train.npz` (BENCHMARKS.md, "Compiled training on
# the CPU"). Rows whose compile time the run could not see (a warm compile cache) are left out: unmeasured.
CPU_MEASURED: dict[tuple[str, str], Measured] = {
    ("cnn", "bp"): Measured(3520, 3917, 11.5),
    ("cnn", "dfa"): Measured(3239, 3258, 13.4),
    ("cnn", "rec_lra"): Measured(2515, 2863, 13.5),
    ("cnn", "trace_bp"): Measured(2150, 2530, 17.9),
    ("resnet20", "bp"): Measured(622, 785, 27.1),
    ("resnet20", "dfa"): Measured(523, 410, 53.0),
    ("resnet20", "rec_lra"): Measured(564, 439, 67.7),
    ("resnet20", "trace_bp"): Measured(349, 525, 33.4),
    ("resnet18", "bp"): Measured(56, 88, 32.8),
    ("vit", "bp"): Measured(3865, 4208, 23.8),
}


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
