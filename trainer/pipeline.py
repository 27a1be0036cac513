"""Unit-parallel training: a model's units split into S contiguous stages, one per process.

In backprop a stage waits for the backward pass of every stage above it (backward locking);
pipeline schedules (GPipe, 1F1B) hide part of the wait and leave a bubble of about
(S−1)/(M+S−1) with M micro-batches. The local rules need no backward pass across stages, so
their stages do not wait for the stages above (docs/rules.md, "Unit-parallel training"):

- forward-only rules (drtp, tpsgd): the loader gives micro-batches of batch_size / M; stage s
  runs its units' forwards and local updates on a micro-batch as soon as it arrives and sends
  its output on. Nothing travels back, so each update is exactly that of one-process training
  with batch = micro-batch (unit l reads unit l−1's output from before unit l−1's step either way).
- error rules (dfa, bdfa, sdfa, hybrid DFA; shallow): the last stage sends each micro-batch's
  output error e (N/M × C numbers) to every stage; a stage keeps the unit graphs of at most
  S − s micro-batches until their e arrives, runs their local backwards, adds them up and steps
  once per batch: the update of one-process training on the whole batch (BatchNorm statistics
  aside, which are per micro-batch).
- lra, rec_lra: the error units travel down one stage boundary at a time through the E maps
  (one message per boundary and micro-batch; error skips take e from the top directly); each
  stage adds up its micro-batches' updates and steps once per batch, as one process does.
- bp, trace_bp: PyTorch's own pipeline engine on the same split (``trainer.pipeline_bp``).

Every process builds the whole model (the same seed gives the same parameters) but runs and
updates only its stage's units: activations, graphs and optimizer state are per stage, parameters
are not. At the end of every epoch each stage broadcasts what it trained to the others, so every
process then holds the trained model, evaluates it and can write it. Every receive waits at most
``train.stage_timeout`` seconds: a stage that stops ends the job on every rank (``StageFailed``).

A balanced cut of a local rule comes from a probe on random inputs; the real steps of the first
batches can disagree (caches, the real data, messages), so each stage times its steps of batches
2…``REBALANCE_AFTER`` and, if the slowest stage lags the mean by more than ``REBALANCE_ABOVE_MEAN``,
the cut moves once, at a batch boundary, before the first checkpoint (``train.rebalance``).
"""

from __future__ import annotations

import collections
import datetime
import inspect
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint import load_stage_part, remove_stage_parts, save_stage_part
from trainer.config import ConfigError, TrainConfig
from trainer.distributed import DistEnv
from trainer.errors import StageFailed
from trainer.layout import Layout
from trainer.rules.alignment import preserved_buffers
from trainer.rules.base import Rule, RuleError, StepResult, Transport, UnitBatch, UnitRule
from trainer.units import State, detach_state, dry_outputs, model_units, primary, used_parameters

if TYPE_CHECKING:
    from trainer.pipeline_bp import BackpropPipeline

ACTIVATION, ERROR, ERROR_UNITS = 0, 1, 2  # message tags: states up, e from the top, LRA's error units down
MAX_PENDING_SENDS = 8  # unfinished sends a stage may hold before it waits: back-pressure on a fast stage
REBALANCE_AFTER = 6  # batches of the first epoch after which the cut may move (the first, warm-up, untimed)
REBALANCE_ABOVE_MEAN = 0.10  # how far the slowest stage may lag the mean before the cut moves


# --- the split -------------------------------------------------------------------------------------


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


Backward = Callable[[int, State], None]  # a unit's local backward from its output (index, output)


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
    passes; BatchNorm statistics restored, no gradient kept)."""
    best = [float("inf")] * len(units)
    with preserved_buffers(model), torch.enable_grad():
        for _ in range(repeats):
            state: State = x
            for index, unit in enumerate(units):
                _sync(x.device)
                start = time.perf_counter()
                with autocast():
                    out = unit(detach_state(state))
                backward(index, out)
                _sync(x.device)
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
            _sync(copies[0].device)
            start = time.perf_counter()
            scratch.step()
            _sync(copies[0].device)
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# --- what each stage owns ----------------------------------------------------------------------------


def owned_state(units: Sequence[nn.Module], model: nn.Module, x: torch.Tensor, rule: Rule) -> list[list[torch.Tensor]]:
    """Per unit, the tensors its updates change: the parameters its forward uses (autograd on one
    training-mode pass: a ResNet layer unit holds its whole block but uses one conv and BN), the
    buffers of the modules it calls (BatchNorm statistics), and the rule's own parameters of it."""
    called: set[nn.Module] = set()
    with_buffers = {m for unit in units for m in unit.modules() if next(m.buffers(recurse=False), None) is not None}
    hooks = [m.register_forward_pre_hook(lambda module, args: called.add(module)) for m in with_buffers]
    owned: list[list[torch.Tensor]] = []
    try:
        with preserved_buffers(model), torch.enable_grad():
            state: State = x
            for index, unit in enumerate(units):
                called.clear()
                out = unit(detach_state(state))
                outputs = [t.float() for t in state_tensors(out) if t.requires_grad]
                params = used_parameters(unit, sum(t.sum() for t in outputs)) if outputs else []
                buffers = [b for m in called for b in m.buffers(recurse=False)]
                extra = rule.unit_rule_parameters(index) if isinstance(rule, UnitRule) else []
                owned.append([*params, *buffers, *extra])
                state = detach_state(out)
    finally:
        for hook in hooks:
            hook.remove()
    return owned


def stage_state(owned: list[list[torch.Tensor]], ranges: list[range], names: Sequence[str]) -> list[list[torch.Tensor]]:
    """Each stage's tensors (in a fixed order); a tensor two stages would both change is refused."""
    per_stage: list[list[torch.Tensor]] = []
    owner: dict[int, int] = {}
    for stage, r in enumerate(ranges):
        tensors = {}
        for index in r:
            for t in owned[index]:
                if owner.setdefault(id(t), stage) != stage:
                    raise ConfigError(f"a tensor of shape {tuple(t.shape)} is used by unit {names[index]!r} on stage "
                                      f"{stage} and by a unit on stage {owner[id(t)]} (shared weights): a pipeline "
                                      "keeps each parameter on one stage; move train.stage_boundaries")
                tensors[id(t)] = t
        per_stage.append(list(tensors.values()))
    return per_stage


@torch.no_grad()
def broadcast_stage_state(per_stage: list[list[torch.Tensor]], env: DistEnv) -> None:
    """Every rank of the pipeline gets what each stage trained (one broadcast per stage and dtype)."""
    for stage, tensors in enumerate(per_stage):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = collections.defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=env.rank_of(stage), group=env.pipeline_group)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def move_optimizer_state(optimizer: torch.optim.Optimizer, old: list[list[torch.Tensor]],
                         new: list[list[torch.Tensor]], env: DistEnv) -> None:
    """The optimizer state of the parameters that change stage goes from their old stage's rank to
    their new one's (one object broadcast per stage), which then steps them exactly as the old did;
    the old one drops it, so its stage part holds its own parameters only."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    stage_of = {id(t): stage for stage, tensors in enumerate(new) for t in tensors}
    state = optimizer.state_dict()
    kept = dict(state["state"])
    for stage, tensors in enumerate(old):
        moving = [index[id(t)] for t in tensors if id(t) in index and stage_of[id(t)] != stage]
        sent: list[Any] = [None]
        if env.stage == stage:
            sent = [{i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in kept.pop(i).items()}
                     for i in moving if i in kept}]
        dist.broadcast_object_list(sent, src=env.rank_of(stage), group=env.pipeline_group)
        kept.update({i: entry for i, entry in sent[0].items() if stage_of[id(params[i])] == env.stage})
    optimizer.load_state_dict({"state": kept, "param_groups": state["param_groups"]})  # onto the parameters' devices


# --- messages ----------------------------------------------------------------------------------------


def state_tensors(state: State) -> list[torch.Tensor]:
    """The tensors of a state, in order (carried plain numbers stay out: both sides know them)."""
    return [t for t in (state if isinstance(state, tuple) else (state,)) if torch.is_tensor(t)]


def rebuild_state(template: State, tensors: list[torch.Tensor]) -> State:
    """A state shaped like ``template`` holding the received ``tensors``."""
    if not isinstance(template, tuple):
        return tensors[0]
    received = iter(tensors)
    return tuple(next(received) if torch.is_tensor(t) else t for t in template)


class Courier:
    """Point-to-point messages between the stages of one pipeline (gloo on CPU, NCCL on GPU).

    Sends do not block (at most ``MAX_PENDING_SENDS`` stay unfinished); every receive waits at most
    ``timeout_s`` and then raises ``StageFailed`` naming the stage it waited for.
    """

    def __init__(self, env: DistEnv, timeout_s: float):
        self.env, self.timeout = env, datetime.timedelta(seconds=timeout_s)
        self.pending: collections.deque[tuple[Any, torch.Tensor]] = collections.deque()
        self.timed_device: torch.device | None = None  # set while the stage times its steps: waits are counted
        self.waited = 0.0  # seconds spent waiting while timed

    def send(self, tensors: list[torch.Tensor], stage: int, tag: int) -> None:
        for t in tensors:
            t = t.detach().contiguous()
            self.pending.append((dist.isend(t, dst=self.env.rank_of(stage), tag=tag), t))
        while len(self.pending) > MAX_PENDING_SENDS:
            self._wait(self.pending.popleft()[0], stage, "to send to")

    def receive(self, buffers: list[torch.Tensor], stage: int, tag: int, what: str) -> list[torch.Tensor]:
        """Fill ``buffers`` (fresh, of the message's shapes and dtypes) from ``stage``; returns them."""
        works = [dist.irecv(b, src=self.env.rank_of(stage), tag=tag) for b in buffers]
        for work in works:
            self._wait(work, stage, f"for {what} from")
        return buffers

    def flush(self) -> None:
        while self.pending:
            self._wait(self.pending.popleft()[0], None, "to send")

    def _wait(self, work: Any, stage: int | None, doing: str) -> None:
        device = self.timed_device
        if device is not None:  # the device's queued work is the stage's own; what follows is waiting
            _sync(device)
            start = time.perf_counter()
        try:
            work.wait(timeout=self.timeout)
            if device is not None:
                _sync(device)
                self.waited += time.perf_counter() - start
        except RuntimeError as err:
            peer = "a stage" if stage is None else f"stage {stage} (rank {self.env.rank_of(stage)})"
            gone = "timed out" if "imed out" in str(err) else "lost the connection"
            raise StageFailed(f"stage {self.env.stage} (rank {self.env.rank}) waited {doing} {peer} and {gone} after "
                              f"at most {self.timeout.total_seconds():g} s (train.stage_timeout): that stage has "
                              "stopped; see its own error above") from None


# --- one stage of a local rule ------------------------------------------------------------------------


class StageTransport(Transport):
    """What one stage of a local rule exchanges with the others, for the rule's own step engine
    (``UnitRule.run_units``): activations up from the stage below and on to the stage above, each
    micro-batch's ``e`` from the last stage to every other, and LRA's error units down to the
    stages whose signals read them (``rule.error_sources``)."""

    def __init__(self, rule: UnitRule, env: DistEnv, ranges: list[range], micro_batches: int, courier: Courier):
        self.rule, self.courier = rule, courier
        self.stage, self.stages = env.stage, env.stages
        self.units = ranges[env.stage]
        self.stage_of_unit = [s for s, r in enumerate(ranges) for _ in r]
        self.micro_batches = 1 if rule.forward_only else micro_batches  # forward-only: the loader gives micro-batches
        self.window = self.stages - 1 - self.stage  # micro-batches in flight beyond the current one
        top, own = rule.top, set(self.units)
        below = [l for l in self.units if l < top]
        # error units this stage needs from the stages above, and those it sends down
        self.needs = sorted({src for l in below for src in rule.error_sources(l) if src not in own and src != top})
        sends = {j: sorted({self.stage_of_unit[l] for l in range(self.units.start) if j in rule.error_sources(l)})
                 for j in self.units if j != top}
        self.sends = {j: stages for j, stages in sends.items() if stages}
        self._templates: dict[int, list[State]] = {}

    def templates(self, micro: int) -> list[State]:
        """Every unit's output state for a micro-batch of ``micro`` samples (``dry_outputs``)."""
        if micro not in self._templates:
            zeros = torch.zeros((micro, *self.rule.ctx.input_shape), device=self.rule.ctx.device)
            self._templates[micro] = dry_outputs(self.rule.model, self.rule.units, zeros, self.rule.autocast)
        return self._templates[micro]

    def receive_input(self, samples: int) -> State:
        template = self.templates(samples)[self.units.start - 1]
        buffers = [torch.empty_like(t) for t in state_tensors(template)]
        return rebuild_state(template, self.courier.receive(buffers, self.stage - 1, ACTIVATION, "activations"))

    def send_output(self, state: State) -> None:
        self.courier.send(state_tensors(state), self.stage + 1, ACTIVATION)

    def publish_error(self, error: torch.Tensor) -> None:
        for stage in range(self.stages - 1):
            self.courier.send([error], stage, ERROR)

    def receive_error(self, samples: int) -> torch.Tensor:
        buffer = torch.empty((samples, self.rule.ctx.num_classes), device=self.rule.ctx.device)
        return self.courier.receive([buffer], self.stages - 1, ERROR, "the output error")[0]

    def receive_error_units(self, batch: UnitBatch) -> None:
        templates = self.templates(len(batch.y))
        for src in self.needs:
            buffer = torch.empty(primary(templates[src]).shape, device=batch.y.device)  # sent as float32
            batch.errors[src] = self.courier.receive([buffer], self.stage_of_unit[src], ERROR_UNITS, "error units")[0]

    def send_error_units(self, batch: UnitBatch) -> None:
        for j, stages in self.sends.items():
            for stage in stages:
                self.courier.send([batch.errors[j].float()], stage, ERROR_UNITS)


class LocalPipeline:
    """One stage of a local rule: the rule's own step engine over the stage's units, with a
    ``StageTransport``. ``train_step`` takes the batch every rank's loader gives (only stage 0
    reads ``x``; every stage reads ``y``, the same on all) and returns, on the last stage, the loss
    and logits; on the others a zero loss and no logits (they see none)."""

    def __init__(self, rule: UnitRule, env: DistEnv, ranges: list[range], micro_batches: int, timeout_s: float):
        rule.prepare_pipeline([s for s, r in enumerate(ranges) for _ in r], micro_batches)
        self.rule, self.courier = rule, Courier(env, timeout_s)
        self.transport = StageTransport(rule, env, ranges, micro_batches, self.courier)
        self.env, self.micro_batches, self.timeout_s = env, micro_batches, timeout_s  # to build it cut elsewhere
        self.timed: list[float] | None = None  # while timed: each step's busy seconds (its wall time less its waits)

    def recut(self, ranges: list[range]) -> LocalPipeline:
        """This stage of the same rule under another cut (RuleError where the rule refuses that cut)."""
        return LocalPipeline(self.rule, self.env, ranges, self.micro_batches, self.timeout_s)

    def start_timing(self) -> None:
        self.timed, self.courier.timed_device = [], self.rule.ctx.device

    def stop_timing(self) -> list[float]:
        timed, self.timed, self.courier.timed_device = self.timed or [], None, None
        return timed

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        if self.timed is None:
            return self.rule.run_units(x, y, optimizer, self.transport, self.transport.units)
        start, waited = time.perf_counter(), self.courier.waited
        out = self.rule.run_units(x, y, optimizer, self.transport, self.transport.units)
        _sync(self.rule.ctx.device)
        self.timed.append(time.perf_counter() - start - (self.courier.waited - waited))
        return out


# --- the whole -------------------------------------------------------------------------------------

@dataclass
class Pipeline(Layout):
    """This process's stage of a pipeline, and what every stage trains (for the epoch-end sync).
    Each rank's optimizer state covers its own stage only: it is kept in a stage part beside
    ``checkpoint.pt`` (``trainer.checkpoint``), which records the number of stages and the cut."""

    stage: LocalPipeline | BackpropPipeline
    per_stage: list[list[torch.Tensor]]
    note: str  # the split
    env: DistEnv
    ranges: list[range]  # the cut: each stage's units
    names: list[str]  # the units, in order
    labels: list[str]  # their names for people (unit_label)
    owned: list[list[torch.Tensor]]  # per unit, what its updates change (owned_state)
    optimizer: torch.optim.Optimizer
    costs: list[float] | None  # the probe's per-unit seconds while the cut may still move; None: it stays
    steps: int = 0  # training steps so far, while the cut may still move

    @staticmethod
    def collective_timeout(cfg: TrainConfig) -> float | None:
        return cfg.stage_timeout

    @staticmethod
    def loader_batch_size(cfg: TrainConfig, forward_only: bool) -> int:
        # a forward-only rule updates on every micro-batch: its loader gives micro-batches
        return cfg.batch_size // cfg.micro_batches if forward_only else cfg.batch_size

    @classmethod
    def build(cls, rule: Rule, model: nn.Module, env: DistEnv, cfg: TrainConfig, input_shape: tuple[int, ...],
              optimizer: torch.optim.Optimizer) -> Pipeline:
        """Split the rule's (or the model's) units into ``env.stages`` stages and build this rank's.
        A random micro-batch of inputs times the units and shapes the messages; ``optimizer`` (the
        session's) times the units' steps."""
        if rule.pipelining not in ("local", "torch"):
            raise RuleError(f"rule {rule.name!r} is not pipelined: {rule.pipelining}")
        probe = torch.randn((cfg.batch_size // cfg.micro_batches, *input_shape), device=rule.ctx.device)
        named = pipeline_units(rule, model)
        names, units = [name for name, _ in named], [unit for _, unit in named]
        owned = owned_state(units, model, probe, rule)
        forward_only = isinstance(rule, UnitRule) and rule.forward_only
        backward = forward_only_backward(rule, torch.randint(0, rule.ctx.num_classes, (len(probe),),
                                                             device=probe.device)) if forward_only else ones_backward
        costs: list[float] = []
        ranges, note = split_stages(names, units, model, env, cfg.stage_boundaries, probe, rule.autocast, owned,
                                    optimizer, 1.0 if forward_only else 1.0 / cfg.micro_batches, backward, costs)
        per_stage = stage_state(owned, ranges, names)
        if rule.pipelining == "local":
            stage: LocalPipeline | BackpropPipeline = LocalPipeline(rule, env, ranges, cfg.micro_batches,
                                                                    cfg.stage_timeout)
        else:
            from trainer.pipeline_bp import BackpropPipeline

            mine = ranges[env.stage]
            template = probe if mine.start == 0 else dry_outputs(model, units[: mine.start], probe, rule.autocast)[-1]
            try:
                stage = BackpropPipeline(units[mine.start : mine.stop], env.stage, env.stages, env.pipeline_group,
                                         probe.device, cfg.micro_batches, cfg.pipeline_schedule, rule.criterion,
                                         template, rule.autocast)
            except ValueError as err:  # a state the engine cannot send (checked on every stage alike)
                raise RuleError(str(err)) from None
        rebalances = rule.pipelining == "local" and cfg.rebalance and bool(costs)  # not a cut set by hand
        return cls(stage, per_stage, note, env, ranges, names, [unit_label(n, u) for n, u in zip(names, units)],
                   owned, optimizer, costs if rebalances else None)

    @property
    def notes(self) -> list[str]:
        return [self.note]

    def after_step(self, epoch_ends: bool) -> str | None:
        """While the cut may move: time this stage's steps from the second batch on, and after
        ``REBALANCE_AFTER`` batches (or at the first epoch's end, if sooner) move it or keep it, once."""
        if self.costs is None or not isinstance(self.stage, LocalPipeline):
            return None
        self.steps += 1
        if self.steps == 1:
            self.stage.start_timing()
        if self.steps < REBALANCE_AFTER and not epoch_ends:
            return None
        return self._rebalance(self.stage, self.costs)

    def _rebalance(self, local: LocalPipeline, costs: list[float]) -> str:
        """Gather the stages' timed steps and move the cut if ``rebalanced_stages`` says so: every
        rank takes the same decision from the same gathered times, every stage's tensors are
        broadcast (a stage gaining a unit gets it as trained) and the optimizer state of the moved
        parameters follows them, so training goes on exactly as one process would."""
        self.costs = None
        local.courier.flush()  # every message of this batch has arrived: no step is in flight
        timed = local.stop_timing()
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, (self.env.stage, statistics.median(timed) if timed else None))
        if any(t is None for _, t in gathered):
            return f"kept the cut: the first epoch has {self.steps} batch(es), too few to time the stages' steps"
        seconds = [statistics.mean(t for s, t in gathered if s == stage) for stage in range(self.env.stages)]
        head = (f"after {self.steps} batches: stage times {' / '.join(f'{t:.3g}' for t in seconds)} s "
                f"(slowest {above_mean(seconds) * 100:.0f} % above the mean")
        found = rebalanced_stages(costs, self.ranges, seconds)
        if found is None:
            why = (f", within {REBALANCE_ABOVE_MEAN * 100:.0f} %)" if above_mean(seconds) <= REBALANCE_ABOVE_MEAN
                   else "); no other cut predicts a faster slowest stage")
            return f"kept the cut {head}{why}"
        ranges, predicted = found
        cut = ", ".join(self.labels[r.start] for r in ranges[1:])
        try:
            per_stage = stage_state(self.owned, ranges, self.names)
            stage = local.recut(ranges)
        except (ConfigError, RuleError) as err:  # alike on every rank: the cut stays everywhere
            return f"kept the cut {head}): the balanced cut at {cut} is refused: {err}"
        broadcast_stage_state(self.per_stage, self.env)
        move_optimizer_state(self.optimizer, self.per_stage, per_stage, self.env)
        was = ", ".join(self.labels[r.start] for r in self.ranges[1:])
        self.stage, self.per_stage, self.ranges = stage, per_stage, ranges
        return (f"rebalanced {head}) → cut moved from {was} to {cut} "
                f"(predicted {' / '.join(f'{t:.3g}' for t in predicted)} s)")

    def synchronize(self) -> None:
        """This stage's sends finished, then every rank gets every stage's trained tensors
        (collective over the pipeline)."""
        if isinstance(self.stage, LocalPipeline):
            self.stage.courier.flush()
        broadcast_stage_state(self.per_stage, self.env)

    def checkpoint_fields(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"optimizer": None, "pipeline": {"stages": self.env.stages,
                                                "boundaries": [self.names[r.start] for r in self.ranges[1:]]}}

    def save_part(self, out_dir: Path, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """This rank's optimizer state, then a wait for every rank's: the checkpoint that names
        ``epoch`` is written only once all its parts are."""
        save_stage_part(out_dir, epoch, self.env.rank, optimizer.state_dict())
        dist.barrier()

    def drop_older_parts(self, out_dir: Path, epoch: int) -> None:
        dist.barrier()
        remove_stage_parts(out_dir, self.env.rank, keep=epoch)

    def optimizer_state(self, payload: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """This rank's part; a local rule's stages go back to the checkpoint's cut first (a rebalanced
        one, or a probe's that timed otherwise), whose stage each part's optimizer state is of. A
        resumed run keeps that cut."""
        self.costs = None
        saved = payload["pipeline"].get("boundaries")  # checkpoints before rebalancing have none
        if saved is not None and isinstance(self.stage, LocalPipeline):
            ranges = named_stages(self.names, saved)
            if ranges != self.ranges:
                self.stage, self.ranges = self.stage.recut(ranges), ranges
                self.per_stage = stage_state(self.owned, ranges, self.names)
            self.note = split_note(self.env, self.labels, ranges, "at the checkpoint's cut")
        return load_stage_part(out_dir, payload["epoch"], self.env.rank)["optimizer"]
