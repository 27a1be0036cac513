"""How a run's units lie across processes: the one place where a pipeline run differs from a plain
one for the session, the loop and checkpoints.

``Layout`` is the default, one process holding every unit (data-parallel replicas included,
``trainer.parallel.data_parallel``). ``Pipeline`` is this process's stage of a pipeline: a model's
units split into S contiguous stages (``trainer.parallel.split``), one per process. In backprop a
stage waits for the backward pass of every stage above it (backward locking); pipeline schedules
(GPipe, 1F1B) hide part of the wait and leave a bubble of about (S−1)/(M+S−1) with M micro-batches
(``trainer.parallel.backprop``). The local rules need no backward pass across stages, so their
stages do not wait for the stages above (``trainer.parallel.transport``).

Each stage updates only the tensors its units own (``trainer.parallel.ownership``); at the end of
every epoch each stage broadcasts what it trained to the others, so every process then holds the
trained model, evaluates it and can write it. Every receive waits at most ``train.stage_timeout``
seconds: a stage that stops ends the job on every rank (``StageFailed``). A local rule's cut may
move once, after the first batches (``Pipeline.after_step``, ``train.rebalance``).

The session picks the class once, from ``train.pipeline_stages``, asks it how to size the loader
and then builds it; the loop and the checkpoint round trip only call the built object.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint_file import load_stage_part, remove_stage_parts, save_stage_part
from trainer.config import ConfigError, TrainConfig
from trainer.parallel.backprop import BackpropStage
from trainer.parallel.ownership import broadcast_stage_state, move_optimizer_state, owned_state, stage_state
from trainer.parallel.processes import DistEnv
from trainer.parallel.split import (
    REBALANCE_ABOVE_MEAN, above_mean, forward_only_backward, named_stages, ones_backward, pipeline_units,
    rebalanced_stages, split_note, split_stages, unit_label,
)
from trainer.parallel.transport import LocalStage
from trainer.rules.base import Rule, RuleError, StepResult
from trainer.rules.unit_rule import UnitRule
from trainer.units import dry_outputs

REBALANCE_AFTER = 6  # batches of the first epoch after which the cut may move (the first, warm-up, untimed)


class Stepper(Protocol):
    """What turns a batch into updates on this process: a rule, or its stage of a pipeline."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult: ...


class Layout:
    """One process holds every unit: the rule steps the whole model, the optimizer state goes in
    ``checkpoint.pt``, and there is nothing to exchange at an epoch's end."""

    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    @staticmethod
    def collective_timeout(cfg: TrainConfig) -> float | None:
        """How long a collective may wait for another process (None: torch's default)."""
        return None

    @staticmethod
    def loader_batch_size(cfg: TrainConfig, forward_only: bool) -> int:
        """The batch the training loader gives ``stepper.train_step``."""
        return cfg.batch_size

    @classmethod
    def build(cls, rule: Rule, model: nn.Module, env: DistEnv, cfg: TrainConfig, input_shape: tuple[int, ...],
              optimizer: torch.optim.Optimizer) -> Layout:
        """This process's part of the run, once rule, model and optimizer are built."""
        return cls(rule)

    @property
    def notes(self) -> list[str]:
        """What the run's header says about the layout."""
        return []

    def after_step(self, epoch_ends: bool) -> str | None:
        """After every training step (a batch boundary; ``epoch_ends`` on an epoch's last): a line
        to note, or None. A pipeline moves its cut here, once."""
        return None

    def synchronize(self) -> None:
        """At an epoch's end, before evaluation: every process then holds the whole trained model."""

    def checkpoint_fields(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What ``checkpoint.pt`` records of the optimizer and of the stages."""
        return {"optimizer": optimizer.state_dict(), "pipeline": None}

    def save_part(self, out_dir: Path, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """What this process keeps beside ``checkpoint.pt``, written before the checkpoint of ``epoch``."""

    def drop_older_parts(self, out_dir: Path, epoch: int) -> None:
        """Once the checkpoint of ``epoch`` is in place: remove this process's parts of other epochs."""

    def optimizer_state(self, payload: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """This process's optimizer state in the checkpoint ``payload`` of the run folder ``out_dir``."""
        return payload["optimizer"]


@dataclass
class Pipeline(Layout):
    """This process's stage of a pipeline, and what every stage trains (for the epoch-end sync).
    Each rank's optimizer state covers its own stage only: it is kept in a stage part beside
    ``checkpoint.pt`` (``trainer.checkpoint_file``), which records the number of stages and the cut."""

    stepper: LocalStage | BackpropStage  # this process's stage
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
        stepper: LocalStage | BackpropStage
        if rule.pipelining == "local":
            stepper = LocalStage(rule, env, ranges, cfg.micro_batches, cfg.stage_timeout)
        else:
            mine = ranges[env.stage]
            template = probe if mine.start == 0 else dry_outputs(model, units[: mine.start], probe, rule.autocast)[-1]
            try:
                stepper = BackpropStage(units[mine.start : mine.stop], env.stage, env.stages, env.pipeline_group,
                                        probe.device, cfg.micro_batches, cfg.pipeline_schedule, rule.criterion,
                                        template, rule.autocast)
            except ValueError as err:  # a state the engine cannot send (checked on every stage alike)
                raise RuleError(str(err)) from None
        rebalances = rule.pipelining == "local" and cfg.rebalance and bool(costs)  # not a cut set by hand
        return cls(stepper, per_stage, note, env, ranges, names, [unit_label(n, u) for n, u in zip(names, units)],
                   owned, optimizer, costs if rebalances else None)

    @property
    def notes(self) -> list[str]:
        return [self.note]

    def after_step(self, epoch_ends: bool) -> str | None:
        """While the cut may move: time this stage's steps from the second batch on, and after
        ``REBALANCE_AFTER`` batches (or at the first epoch's end, if sooner) move it or keep it, once."""
        if self.costs is None or not isinstance(self.stepper, LocalStage):
            return None
        self.steps += 1
        if self.steps == 1:
            self.stepper.start_timing()
        if self.steps < REBALANCE_AFTER and not epoch_ends:
            return None
        return self._rebalance(self.stepper, self.costs)

    def _rebalance(self, local: LocalStage, costs: list[float]) -> str:
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
            stepper = local.recut(ranges)
        except (ConfigError, RuleError) as err:  # alike on every rank: the cut stays everywhere
            return f"kept the cut {head}): the balanced cut at {cut} is refused: {err}"
        broadcast_stage_state(self.per_stage, self.env)
        move_optimizer_state(self.optimizer, self.per_stage, per_stage, self.env)
        was = ", ".join(self.labels[r.start] for r in self.ranges[1:])
        self.stepper, self.per_stage, self.ranges = stepper, per_stage, ranges
        return (f"rebalanced {head}) → cut moved from {was} to {cut} "
                f"(predicted {' / '.join(f'{t:.3g}' for t in predicted)} s)")

    def synchronize(self) -> None:
        """This stage's sends finished, then every rank gets every stage's trained tensors
        (collective over the pipeline)."""
        if isinstance(self.stepper, LocalStage):
            self.stepper.courier.flush()
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
        if saved is not None and isinstance(self.stepper, LocalStage):
            ranges = named_stages(self.names, saved)
            if ranges != self.ranges:
                self.stepper, self.ranges = self.stepper.recut(ranges), ranges
                self.per_stage = stage_state(self.owned, ranges, self.names)
            self.note = split_note(self.env, self.labels, ranges, "at the checkpoint's cut")
        return load_stage_part(out_dir, payload["epoch"], self.env.rank)["optimizer"]
