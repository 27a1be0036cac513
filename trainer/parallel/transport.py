"""A local rule's pipeline stage: the messages between stages, and the stage that sends them.

The local rules need no backward pass across stages, so their stages do not wait for the stages
above (docs/rules.md, "Unit-parallel training"):

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

``Courier`` carries the messages (point to point, every receive bounded by ``train.stage_timeout``:
a stage that stops ends the job on every rank with ``StageFailed``); ``LocalStage`` is the
``Transport`` the rule's own step engine (``UnitRule.run_units``) runs one stage's units with.
"""

from __future__ import annotations

import collections
import datetime
import time
from typing import Any

import torch
import torch.distributed as dist

from trainer.errors import StageFailed
from trainer.parallel.processes import DistEnv
from trainer.parallel.split import wait_for_device
from trainer.rules.batch import StepResult, Transport, UnitBatch
from trainer.rules.unit_rule import UnitRule
from trainer.units import State, dry_outputs, primary

ACTIVATION, ERROR, ERROR_UNITS = 0, 1, 2  # message tags: states up, e from the top, LRA's error units down
MAX_PENDING_SENDS = 8  # unfinished sends a stage may hold before it waits: back-pressure on a fast stage


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
            wait_for_device(device)
            start = time.perf_counter()
        try:
            work.wait(timeout=self.timeout)
            if device is not None:
                wait_for_device(device)
                self.waited += time.perf_counter() - start
        except RuntimeError as err:
            peer = "a stage" if stage is None else f"stage {stage} (rank {self.env.rank_of(stage)})"
            gone = "timed out" if "imed out" in str(err) else "lost the connection"
            raise StageFailed(f"stage {self.env.stage} (rank {self.env.rank}) waited {doing} {peer} and {gone} after "
                              f"at most {self.timeout.total_seconds():g} s (train.stage_timeout): that stage has "
                              "stopped; see its own error above") from None


class LocalStage(Transport):
    """One stage of a local rule under the cut ``ranges``: the rule's own step engine over the
    stage's units, with this stage as its ``Transport``: activations up from the stage below and
    on to the stage above, each micro-batch's ``e`` from the last stage to every other, and LRA's
    error units down to the stages whose signals read them (``rule.error_sources``).

    ``train_step`` takes the batch every rank's loader gives (only stage 0 reads ``x``; every
    stage reads ``y``, the same on all) and returns, on the last stage, the loss and logits; on
    the others a zero loss and no logits (they see none). While timed (``start_timing``), each
    step's busy seconds are kept: its wall time less its waits for other stages."""

    def __init__(self, rule: UnitRule, env: DistEnv, ranges: list[range], micro_batches: int, timeout_s: float):
        self.stage_of_unit = [s for s, r in enumerate(ranges) for _ in r]
        rule.prepare_pipeline(self.stage_of_unit, micro_batches)
        self.rule, self.env, self.courier = rule, env, Courier(env, timeout_s)
        self.recut_arguments = micro_batches, timeout_s  # train.micro_batches, train.stage_timeout
        self.stage, self.stages = env.stage, env.stages
        self.units = ranges[env.stage]
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
        self.timed: list[float] | None = None

    def recut(self, ranges: list[range]) -> LocalStage:
        """This stage of the same rule under another cut (RuleError where the rule refuses that cut)."""
        return LocalStage(self.rule, self.env, ranges, *self.recut_arguments)

    # --- the steps ------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        if self.timed is None:
            return self.rule.run_units(x, y, optimizer, self, self.units)
        start, waited = time.perf_counter(), self.courier.waited
        out = self.rule.run_units(x, y, optimizer, self, self.units)
        wait_for_device(self.rule.ctx.device)
        self.timed.append(time.perf_counter() - start - (self.courier.waited - waited))
        return out

    def start_timing(self) -> None:
        self.timed, self.courier.timed_device = [], self.rule.ctx.device

    def stop_timing(self) -> list[float]:
        timed, self.timed, self.courier.timed_device = self.timed or [], None, None
        return timed

    # --- the Transport of UnitRule.run_units ---------------------------------------------------

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
            batch.error_units[src] = self.courier.receive([buffer], self.stage_of_unit[src], ERROR_UNITS, "error units")[0]

    def send_error_units(self, batch: UnitBatch) -> None:
        for j, stages in self.sends.items():
            for stage in stages:
                self.courier.send([batch.error_units[j].float()], stage, ERROR_UNITS)
