"""A rule inside the user's own loop: ``net = rule.prepare()``, then the loop's own
``loss = criterion(net(x), y); loss.backward(); optimizer.step()`` performs exactly the update
of ``rule.train_step`` (tested rule by rule), so the rules drop into Lightning, accelerate,
``DistributedDataParallel`` or any existing script.

How (as TinyDFA's feedback points, but for every local rule): in training mode the prepared
forward runs the units as ``train_step`` does, each on the detached output of the one below, and
returns the logits through one autograd function, ``_Inject``, whose inputs are the logits, every
unit's signal point and the trainable parameters. Its backward receives ``e = ∂loss/∂logits``
from the user's loss, asks the rule for the units' signals (``UnitRule.signals``) and returns
them as the gradients of the signal points, so autograd runs every unit's local backward; what
the rule writes into ``.grad`` by itself (LRA's fused ΔW, its E updates) is returned as those
parameters' gradients, so gradient hooks (DDP's all-reduce) see every update. The rule's
``after_backward`` (norm-ball projection, alignment angles) runs when the backward ends, after
DDP's gradient averaging: under DDP, N processes of batch b update exactly as one of batch N·b.

Divergence is checked as ``train_step`` checks it (``rule.check_divergence``, one host sync each):
the forward raises ``TrainingDiverged`` on logits whose loss (with ``y``) or spread (without) has
diverged, before the user's loss exists, and the backward on a non-finite ``e`` or signal before
any gradient reaches a parameter; either way ``optimizer.step()`` is never reached (a refused
forward also puts back the running statistics it moved).

In evaluation mode, or under ``torch.no_grad()``, the prepared forward is the plain ``rule(x)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from trainer.rules.batch import UnitBatch, restore_statistics, saved_statistics
from trainer.rules.checks import check_batch
from trainer.units import State, batch_length, primary

if TYPE_CHECKING:  # the rules import this module
    from trainer.rules.base import Rule
    from trainer.rules.unit_rule import UnitRule


def _after_engine(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the current backward has ended: queued from a callback, so it also runs
    after the callbacks queued during the backward (DDP's gradient averaging)."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(fn))


class _AfterBackward(torch.autograd.Function):
    """The identity on the logits; its backward first calls ``check`` on their gradient (before
    any reaches a parameter), then queues ``fn`` for the end of the backward."""

    @staticmethod
    def forward(ctx, fn: Callable[[], None], check: Callable[[torch.Tensor], None],
                logits: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.check = fn, check
        return logits.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        ctx.check(grad)
        _after_engine(ctx.fn)
        return None, None, grad


def after_backward_of(logits: torch.Tensor, fn: Callable[[], None],
                      check: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """``logits``, with ``fn`` run when a backward through them ends (end-to-end rules), once
    ``check`` has seen their gradient (``Rule._check_backward``: a non-finite one raises there)."""
    return _AfterBackward.apply(fn, check, logits)


class _Step:
    """One prepared training forward of a local rule, waiting for its backward."""

    def __init__(self, rule: UnitRule, x: State, y: torch.Tensor | None, outputs: list[State],
                 points: list[torch.Tensor], params: list[nn.Parameter]):
        self.rule, self.x, self.y, self.outputs, self.points, self.params = rule, x, y, outputs, points, params

    def backward(self, error: torch.Tensor) -> list[torch.Tensor | None]:
        """The signal points' gradients (the rule's signals), then the parameters' (what the rule
        wrote into ``.grad`` while forming the signals). Non-finite ones raise before any reaches
        a parameter (``Rule._check_backward``)."""
        batch = UnitBatch(self.x, self.y, self.outputs, error.float(), samples=batch_length(self.x))
        kept = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            signals = self.rule.checked_signals(self.rule.signals(batch), range(len(self.points)), self.points)
            self.rule.local_updates(batch)
            written = [p.grad for p in self.params]
        finally:
            for p, g in zip(self.params, kept):
                p.grad = g
        self.rule._check_backward(self.x, [error, *signals, *written], self.rule.steps_taken)
        _after_engine(lambda: self.rule.after_backward(batch))
        signals = [None if g is None or not t.requires_grad else g.to(t.dtype)
                   for t, g in zip(self.points, signals, strict=True)]
        return signals + written


class _Inject(torch.autograd.Function):
    """The identity on the logits; its backward turns their gradient e into every unit's signal."""

    @staticmethod
    def forward(ctx, step: _Step, logits: torch.Tensor, *points_and_params: torch.Tensor) -> torch.Tensor:
        ctx.step = step
        return logits.clone()

    @staticmethod
    def backward(ctx, error: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, None, *ctx.step.backward(error))


def inject_signals(rule: UnitRule, x: State, y: torch.Tensor | None, outputs: list[State]) -> torch.Tensor:
    """The top unit's logits, through which a backward from any loss trains every unit by ``rule``."""
    params = rule.trainable_parameters()
    points = [rule.signal_point(i, out) for i, out in enumerate(outputs)]
    return _Inject.apply(_Step(rule, x, y, outputs, points, params), primary(outputs[-1]), *points, *params)


class PreparedRule(nn.Module):
    """``rule.prepare()``: the model trained by ``rule`` through the user's own backward.

    ``forward(x, y=None)`` gives the logits (``x``: a batch, or the tuple of a forward's several
    inputs, as ``train_step`` takes it); ``y`` is needed only by what reads the labels after
    the backward (``align_every`` of DFA and the weight-transport rules). Its parameters and
    state_dict are the model's (``model.*``) and the rule's own (``rule.*``: feedback matrices,
    LRA's error maps, which the optimizer must hold when they learn).
    """

    def __init__(self, rule: Rule):
        super().__init__()
        self.model, self.rule = rule.model, rule

    def forward(self, x: State, y: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.rule(x)
        check_batch(self.rule, x, y, labels=False)  # as train_step checks its batch
        if not self.rule.check_divergence:
            return self.rule.prepared_forward(x, y)
        statistics = saved_statistics(self.model)
        logits = self.rule.prepared_forward(x, y)
        why = self.rule._logits_divergence(logits, y)
        if why:  # before the user's loss and backward: no update, and the running statistics put back
            restore_statistics(statistics)
            raise self.rule._divergence_error(why, x, self.rule.steps_taken + 1)
        self.rule.steps_taken += 1
        return logits
