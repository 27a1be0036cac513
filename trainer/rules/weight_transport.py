"""The weight-transport baselines: feedback alignment, sign symmetry and Kolen–Pollack.

Backprop through the whole model, except that every ``nn.Linear`` and ``nn.Conv2d`` sends its input
gradient back through a feedback weight B of W's shape instead of W (``δx = Bᵀ * δy``); weight and
bias gradients stay the exact local ones, everything else backpropagates as usual
(``kernels.feedback_alignment``; docs/rules.md, "Weight-transport baselines")::

    fa    B fixed random, drawn once like W's init               (Lillicrap et al. 2016)
    usf   B = s · sign(W), from the current W at every step      (Liao, Leibo & Poggio 2016)
    brsf  B = |R| ⊙ sign(W), R redrawn every batch
    frsf  B = |R| ⊙ sign(W), R drawn once
    kp    B learns with W's gradient and W's decay: B − W → 0    (Akrout et al. 2019)

``feedback_init`` is the distribution of B (fa, kp) or R (brsf, frsf) and sets usf's s: ``match``
(N(0, std(W)²) with W's std at conversion: "like W's init" for any model), ``default`` (PyTorch's
layer init U(±1/√fan_in)), ``xavier`` (normal) or ``xavier_uniform`` (biotorch's). Layers named in
``keep_exact`` (or below a named module) stay exact. fa and frsf may keep B (or |R|) ``seeded``:
regenerated at each backward, no memory.
The converted layers keep the model's parameter names, so a checkpoint evaluates in the plain
model; the feedback state is saved with the model (kp's B is a parameter the optimizer updates).

Alignment diagnostic: every ``align_every`` steps, per layer, the angle between B and W
(``fb_angle/NAME``) and between the layer's weight update and its true BP gradient on the same
batch (``angle/NAME``), from one extra exact forward and backward (BatchNorm statistics restored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from kernels import convert_to_feedback, feedback_layers
from trainer.rules.alignment import angle_degrees, bp_alignment, needs_labels
from trainer.rules.base import ParamOptions, RuleContext, RuleError, StepResult, UnitBatch, byte_text
from trainer.rules.bp import Backprop
from trainer.rules.checks import held_parameters
from trainer.units import call_model

FeedbackInit = Literal["match", "default", "xavier", "xavier_uniform"]


@dataclass
class WeightTransportOptions:
    """Options of ``usf`` and ``brsf`` (and the base of the others).

    feedback_init: the distribution of B (fa, kp) or of R (brsf, frsf), and usf's scale s.
    keep_exact: names (or name prefixes, e.g. "conv1", "fc") of layers left exact (plain BP).
    align_every: measure the angles every k steps (0: never).
    """

    feedback_init: FeedbackInit = "match"
    keep_exact: list[str] = field(default_factory=list)
    align_every: int = 0

    def validate(self) -> None:
        if self.align_every < 0:
            raise ValueError(f"align_every must be 0 (off) or a number of steps, got {self.align_every}")


@dataclass
class StoredFeedbackOptions(WeightTransportOptions):
    """Options of ``fa`` and ``frsf``: B (or |R|) kept ``dense`` or regenerated from a seed (``seeded``)."""

    feedback_storage: Literal["dense", "seeded"] = "dense"


@dataclass
class KolenPollackOptions(WeightTransportOptions):
    """Options of ``kp``: ``kp_decay`` is B's weight decay (unset: ``[optim] weight_decay``, W's,
    which makes B − W shrink by (1 − ηλ) a step)."""

    kp_decay: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.kp_decay is not None and self.kp_decay < 0:
            raise ValueError(f"kp_decay must be >= 0, got {self.kp_decay}")


def check_optimizer_holds(optimizer: torch.optim.Optimizer, feedback: list[nn.Parameter], rule: str) -> None:
    """Kolen–Pollack's B learns through the optimizer: one that does not hold B (built before the
    rule converted the model) would train it as plain FA, so refuse it. A stand-in without
    ``param_groups`` is not checked."""
    held = held_parameters(optimizer)
    if held is None:
        return
    missing = sum(id(b) not in held for b in feedback)
    if missing:
        raise RuleError(f"rule {rule!r}: the optimizer does not hold the feedback weights B of {missing} of "
                        f"{len(feedback)} layers, so B would never learn (plain FA): build the optimizer after the "
                        "rule, from rule.trainable_parameters() (or rule.prepare().parameters())")


class WeightTransport(Backprop):
    """Backprop with feedback weights in place of W's transpose in every dense and conv layer; the
    rule's ``name`` is its mode in ``kernels.feedback_alignment.MODES``."""

    pipelining = ("torch.distributed.pipelining would run its layers and the criterion without the rule's step: "
                  "brsf would redraw R at every micro-batch's forward instead of once a batch, and align_every's "
                  "BP pass through the whole model and kp's check that the optimizer holds B would not run; train "
                  "it on one process or data-parallel")

    def __init__(self, model: nn.Module, options: WeightTransportOptions, ctx: RuleContext):
        try:
            model = convert_to_feedback(model, self.name, init=options.feedback_init,
                                        storage=options.feedback_storage if isinstance(options, StoredFeedbackOptions)
                                        else "dense", seed=ctx.seed,
                                        keep_exact=tuple(options.keep_exact))
        except ValueError as err:
            raise RuleError(str(err)) from None
        self.layers = feedback_layers(model)
        if not self.layers:
            raise RuleError("no nn.Linear or nn.Conv2d of the model takes feedback (all kept exact?); use rule 'bp'")
        super().__init__(model, options, ctx)  # compiles the converted model
        self.steps = 0
        self.angles: dict[str, float] = {}

    def state_nbytes(self) -> int:
        """The feedback weights (or magnitudes) the layers keep: 0 for seeded, usf and brsf."""
        return sum(layer.feedback_nbytes for _, layer in self.layers)

    def describe_lines(self) -> list[str]:
        """Backprop end to end, and each layer whose input gradient goes back through B."""
        return [(f"end to end: backprop, with each of these {len(self.layers)} layers sending its input gradient "
                 "back through a feedback weight B of W's shape"),
                *(f"{name} ({type(layer).__name__}): B {' x '.join(map(str, layer.weight.shape))}, "
                  f"{byte_text(layer.feedback_nbytes)} kept" for name, layer in self.layers)]

    def after_backward(self, batch: UnitBatch) -> None:
        """Every ``align_every`` steps, the angles between each layer's update and BP's."""
        self.steps += 1
        if self.options.align_every and self.steps % self.options.align_every == 0:
            self.angles = self.measure_alignment(batch.x, needs_labels(batch.y, self.name))

    def exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward under the rule's autocast with every feedback layer exact, so that
        its backward is plain BP."""
        for _, layer in self.layers:
            layer.exact = True
        try:
            with self.autocast():
                return call_model(self.model, x)
        finally:
            for _, layer in self.layers:
                layer.exact = False

    def measure_alignment(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Per layer, the angle between B and W and between the update now in ``.grad`` and the
        true BP gradient on (x, y); "angle" and "fb_angle" are their means over the layers."""
        angles = {f"fb_angle/{name}": angle_degrees(layer.current_feedback_weight().flatten(),
                                                    layer.weight.detach().flatten()) for name, layer in self.layers}
        angles["fb_angle"] = sum(angles.values()) / len(angles)
        groups = {name: [layer.weight] for name, layer in self.layers}
        return angles | bp_alignment(self.model, groups, self.exact_forward, self.criterion, x, y)

    def diagnostics(self) -> dict[str, float]:
        return dict(self.angles)


class FeedbackAlignment(WeightTransport):
    """fa: a fixed random B of W's distribution."""

    name, Options = "fa", StoredFeedbackOptions


class UniformSignSymmetry(WeightTransport):
    """usf: B = s · sign(W), sign-concordant with the current W."""

    name, Options = "usf", WeightTransportOptions


class BatchRandomSignSymmetry(WeightTransport):
    """brsf: B = |R| ⊙ sign(W), random magnitudes redrawn every batch."""

    name, Options = "brsf", WeightTransportOptions


class FixedRandomSignSymmetry(WeightTransport):
    """frsf: B = |R| ⊙ sign(W), random magnitudes drawn once."""

    name, Options = "frsf", StoredFeedbackOptions


class KolenPollack(WeightTransport):
    """kp: B receives W's gradient and decay, so it converges to W without reading it."""

    name, Options = "kp", KolenPollackOptions

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        check_optimizer_holds(optimizer, [layer.feedback_weight for _, layer in self.layers], self.name)
        return super().train_step(x, y, optimizer)

    def param_options(self) -> dict[nn.Parameter, ParamOptions]:
        """B's own weight decay when ``kp_decay`` is set (else W's, through ``[optim]``)."""
        if self.options.kp_decay is None:
            return {}
        return {layer.feedback_weight: ParamOptions(weight_decay=self.options.kp_decay) for _, layer in self.layers}
