"""What an unset ``train.channels_last`` and an unset ``train.compile`` ("auto") choose: each where it
was measured to pay on this kind of device.

channels_last (NHWC weights, hence NHWC activations from mkldnn's convolutions) costs nothing to
switch on, so on the CPU ``auto`` takes it for a (model, rule) that ``benchmarks/bench_cpu.py``
measured at least ``MIN_SPEEDUP`` faster eager. ``torch.compile`` costs tens of seconds on the CPU
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

from dataclasses import dataclass

MIN_SPEEDUP = 1.10  # below this the measurement's noise (spreads of 3-35 %) could be the whole gain
PAYBACK = 1.5  # the saving must beat the compile time by half again: a short run is never slower


@dataclass(frozen=True)
class Measured:
    """One row of bench_cpu: the trainer's images/s eager and compiled, each in the default layout
    and in channels_last, and the compile time (s; the larger of the two layouts')."""

    eager: float
    channels_last: float
    compiled: float
    compiled_channels_last: float
    compile_s: float


# (model name, rule name) -> images/s at bench_cpu's batch (128; the ViT 256) on 2 cores, 2026-12-02,
# `TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m benchmarks.bench_cpu --npz cifar10-mini-train.npz`
# (BENCHMARKS.md, "Compiled training and channels_last on the CPU"; benchmarks/results/cpu.json). A rule
# measured after another on the same model reused the other's compiled units, so its compile time went
# unseen: it takes the model's largest ("cached").
CPU_MEASURED: dict[tuple[str, str], Measured] = {
    ("cnn", "bp"): Measured(2800, 3706, 3326, 3503, 18.8),
    ("cnn", "dfa"): Measured(3005, 3258, 3228, 2938, 14.4),
    ("cnn", "bdfa"): Measured(2942, 3316, 3232, 3088, 18.8),  # cached
    ("cnn", "drtp"): Measured(2831, 3134, 3307, 2863, 18.8),  # cached
    ("cnn", "tpsgd"): Measured(2860, 3101, 3138, 2901, 18.8),  # cached
    ("cnn", "rec_lra"): Measured(2667, 3187, 2554, 2395, 12.3),
    ("cnn", "trace_bp"): Measured(1681, 1700, 1659, 1714, 18.8),  # cached
    ("resnet20", "bp"): Measured(527, 663, 707, 703, 26.5),
    ("resnet20", "dfa"): Measured(538, 573, 448, 465, 46.5),
    ("resnet20", "bdfa"): Measured(526, 584, 441, 471, 61.4),  # cached
    ("resnet20", "drtp"): Measured(551, 594, 472, 459, 61.4),  # cached
    ("resnet20", "tpsgd"): Measured(581, 594, 442, 430, 61.4),  # cached
    ("resnet20", "rec_lra"): Measured(456, 424, 353, 372, 61.4),
    ("resnet20", "trace_bp"): Measured(304, 281, 447, 455, 33.3),
    ("resnet18", "bp"): Measured(54, 68, 69, 70, 26.7),
    ("vit", "bp"): Measured(3892, 3860, 4573, 4601, 21.5),
}


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
