"""Where a pipeline cuts a model: the units it splits, a cut named by hand or balanced by measured
time (the timing probes), and the cut that a stage's measured steps call for (rebalancing).

A balanced cut of a local rule comes from a probe on random inputs; the real steps of the first
batches can disagree (caches, the real data, messages), so each stage times its steps and, if the
slowest stage lags the mean by more than ``REBALANCE_ABOVE_MEAN``, the cut moves once
(``trainer.parallel.layout.Pipeline.after_step``).
"""

from __future__ import annotations

import inspect
import re
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import ConfigError
from trainer.parallel.processes import DistEnv
from trainer.passes import uncounted_pass
from trainer.rules.base import Rule
from trainer.rules.unit_rule import UnitRule
from trainer.units import State, detach_state, model_units

REBALANCE_ABOVE_MEAN = 0.10  # how far the slowest stage may lag the mean before the cut moves


def pipeline_units(rule: Rule, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units a pipeline splits: a local rule's own (grouped) units; for end-to-end rules the
    model's residual blocks or layers, or the blocks of its main block stack (any model)."""
    if isinstance(rule, UnitRule):
        return list(zip(rule.unit_names, rule.units))
    try:
        return model_units(model, "block")[0]
    except ValueError:
        return model_units(model, "children")[0]


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.startswith(entry + ".")


def named_stages(names: Sequence[str], boundaries: Sequence[str]) -> list[range]:
    """Stages that begin at the first unit matching each of ``boundaries`` (a name or prefix)."""
    starts = [0]
    for entry in boundaries:
        found = next((i for i, name in enumerate(names) if _matches(name, entry)), None)
        if found is None or found <= starts[-1]:
            why = "names no unit" if found is None else "does not come after the previous boundary"
            raise ConfigError(f"[train] stage_boundaries: {entry!r} {why}; the units, in order: {', '.join(names)}")
        starts.append(found)
    return [range(a, b) for a, b in zip(starts, [*starts[1:], len(names)])]


def balanced_stages(seconds: Sequence[float], stages: int) -> list[range]:
    """Contiguous stages minimising the slowest stage's time (the linear partition problem, by
    dynamic programming over prefix sums)."""
    n = len(seconds)
    prefix = [0.0]
    for t in seconds:
        prefix.append(prefix[-1] + t)
    inf = float("inf")
    # cost[k][i]: the best slowest-stage time of units [0, i) in k stages; cut[k][i]: where the last begins
    cost = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    cost[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                c = max(cost[k - 1][j], prefix[i] - prefix[j])
                if c < cost[k][i]:
                    cost[k][i], cut[k][i] = c, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        bounds.append(range(cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


def above_mean(seconds: Sequence[float]) -> float:
    """How far the slowest stage lags the mean (0.25: 25 % above it)."""
    mean = sum(seconds) / len(seconds)
    return max(seconds) / mean - 1 if mean > 0 else 0.0


def rebalanced_stages(costs: Sequence[float], ranges: list[range], stage_seconds: Sequence[float],
                      threshold: float = REBALANCE_ABOVE_MEAN) -> tuple[list[range], list[float]] | None:
    """The cut that measured stage times call for, and its predicted stage times; None keeps the
    cut (the slowest stage within ``threshold`` of the mean, or no cut predicts a faster slowest
    stage). A stage's measured time is shared among its units as the probe's per-unit ``costs``
    share it: the probe knows the units' relative weight, the steps the stages' true totals."""
    if above_mean(stage_seconds) <= threshold:
        return None
    scaled: list[float] = []
    for r, measured in zip(ranges, stage_seconds):
        estimates = [max(costs[i], 0.0) for i in r]
        total = sum(estimates)
        scaled += [measured * (e / total if total > 0 else 1 / len(r)) for e in estimates]
    moved = balanced_stages(scaled, len(ranges))
    predicted = [sum(scaled[i] for i in r) for r in moved]
    if moved == ranges or max(predicted) >= max(stage_seconds) * (1 - 1e-9):
        return None
    return moved, predicted


# --- the timing probes ---------------------------------------------------------------------------

Backward = Callable[[int, State], None]  # a unit's local backward from its output (index, output)


def wait_for_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device runs it asynchronously): what a timer
    reads afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ones_backward(index: int, out: State) -> None:
    """A stand-in local backward: every tensor of the output that has a graph gets ones."""
    outputs = [t for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t) and t.requires_grad]
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def forward_only_backward(rule: UnitRule, y: torch.Tensor) -> Backward:
    """A forward-only rule's own local backward (its signal included: DRTP's and tpSGD's scale with
    the unit's output, which is largest in the first units)."""
    return lambda index, out: rule.forward_only_backward(index, out, y)


def measure_unit_seconds(units: Sequence[nn.Module], model: nn.Module, x: torch.Tensor,
                         autocast: Callable[[], Any], backward: Backward = ones_backward,
                         repeats: int = 3) -> list[float]:
    """Each unit's forward plus local backward time on the batch ``x`` (the fastest of ``repeats``
    passes, uncounted: BatchNorm statistics and random streams restored, no gradient kept)."""
    best = [float("inf")] * len(units)
    with uncounted_pass(model), torch.enable_grad():
        for _ in range(repeats):
            state: State = x
            for index, unit in enumerate(units):
                wait_for_device(x.device)
                start = time.perf_counter()
                with autocast():
                    out = unit(detach_state(state))
                backward(index, out)
                wait_for_device(x.device)
                best[index] = min(best[index], time.perf_counter() - start)
                state = detach_state(out)
    for p in model.parameters():
        p.grad = None
    return best


def measure_step_seconds(params_per_unit: Sequence[Sequence[torch.Tensor]], optimizer: torch.optim.Optimizer,
                         repeats: int = 3) -> list[float]:
    """Each unit's optimizer step: the optimizer's own class and settings on copies of the unit's
    parameters (the fastest of ``repeats``). A forward-only stage steps on every micro-batch, and a
    step over ResNet-18's last blocks costs as much as their forward on a few images."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    seconds = []
    for params in params_per_unit:
        copies = [t.detach().clone().requires_grad_() for t in params if isinstance(t, nn.Parameter)]
        if not copies:
            seconds.append(0.0)
            continue
        for c in copies:
            c.grad = torch.zeros_like(c)
        scratch = type(optimizer)(copies, **settings)
        best = float("inf")
        for _ in range(repeats + 1):  # the first step creates the optimizer's state
            wait_for_device(copies[0].device)
            start = time.perf_counter()
            scratch.step()
            wait_for_device(copies[0].device)
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    return seconds


# --- the cut -------------------------------------------------------------------------------------


def split_stages(names: Sequence[str], units: Sequence[nn.Module], model: nn.Module, env: DistEnv,
                 boundaries: Sequence[str], probe: torch.Tensor, autocast: Callable[[], Any],
                 owned: list[list[torch.Tensor]], optimizer: torch.optim.Optimizer,
                 steps_per_micro_batch: float, backward: Backward = ones_backward,
                 costs: list[float] | None = None) -> tuple[list[range], str]:
    """The stages, and a note saying how they were chosen: at ``boundaries``, or balanced by the
    per-unit cost of a micro-batch that global rank 0 measures on ``probe`` (one micro-batch): the
    unit's forward and ``backward``, plus ``steps_per_micro_batch`` of its optimizer steps (1 for
    forward-only rules, 1/M for the others), sent to every rank. ``costs``, if given, receives those
    per-unit seconds (a pipeline rebalances with them)."""
    stages = env.stages
    if len(names) < stages:
        raise ConfigError(f"[train] pipeline_stages = {stages}, but the model has {len(names)} units "
                          f"({', '.join(names)}): use fewer stages, or finer units ([rule] granularity or units)")
    if boundaries:
        ranges = named_stages(names, boundaries)
        how = "at train.stage_boundaries"
    else:
        seconds: list[Any] = [None]
        if env.rank == 0:
            steps = measure_step_seconds(owned, optimizer)
            compute = measure_unit_seconds(units, model, probe, autocast, backward)
            seconds = [[c + steps_per_micro_batch * t for c, t in zip(compute, steps)]]
        dist.broadcast_object_list(seconds, src=0)
        ranges = balanced_stages(seconds[0], stages)
        shares = [sum(seconds[0][i] for i in r) / sum(seconds[0]) for r in ranges]
        how = "balanced by measured time (" + " / ".join(f"{share:.0%}" for share in shares) + ")"
        if costs is not None:
            costs[:] = seconds[0]
    labels = [unit_label(name, unit) for name, unit in zip(names, units)]
    return ranges, split_note(env, labels, ranges, how)


def split_note(env: DistEnv, labels: Sequence[str], ranges: list[range], how: str) -> str:
    """The run's line on its stages: how many, how cut, and each stage's first and last unit."""
    listed = "; ".join(f"stage {s} ({len(r)} unit{'s' * (len(r) > 1)}): "
                       + (labels[r.start] if len(r) == 1 else f"{labels[r.start]} … {labels[r.stop - 1]}")
                       for s, r in enumerate(ranges))
    return f"pipeline of {env.stages} stages × {env.replicas} replica(s), {how}: {listed}"


def unit_label(name: str, unit: nn.Module) -> str:
    """A unit's name for people: a bare index path (``1.0`` of a plain net) gets the kind of its first
    layer with parameters (``1.0 Linear``)."""
    if not re.fullmatch(r"[0-9.]+", name):
        return name
    kinds = (type(m).__name__ for m in unit.modules() if next(m.parameters(recurse=False), None) is not None)
    kind = next(kinds, None)
    return f"{name} {kind}" if kind else name
