"""The ``Rule`` interface: a rule owns how a batch becomes parameter updates.

The training loop only calls ``rule.train_step(x, y, optimizer)`` and ``rule(x)`` (evaluation),
so every learning rule plugs in without touching the loop. A rule steps the optimizer itself:
end-to-end rules once per batch, forward-only rules once per unit, right after that unit's
forward (the optimizer skips parameters whose ``.grad`` is None, so per-unit steps through one
optimizer only move that unit).

``UnitRule`` is the base of the local rules (DFA, DRTP, LRA, ...): it splits the model into
units, compiles each one, runs them with detached inputs, and sends all local backwards out in
one autograd call over the disjoint unit graphs.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from trainer.models import State, detach_state, model_units, primary


class RuleError(ValueError):
    """A rule cannot train this model with these options (a unit it cannot use, a bad option
    combination). The session adds the recipe's file and section to the message."""


@dataclass
class StepResult:
    """What one training step reports: the batch loss and the logits (both detached)."""

    loss: torch.Tensor
    logits: torch.Tensor


@dataclass
class RuleContext:
    """What a rule needs to know beyond its own options."""

    num_classes: int
    input_shape: tuple[int, ...] = ()  # one sample's shape, e.g. (C, H, W); local rules size their matrices by it
    device: torch.device = torch.device("cpu")
    compile: bool = False  # torch.compile the forward passes
    amp: bool = False  # bf16 autocast around forward passes (CUDA)
    label_smoothing: float = 0.0
    seed: int = 0  # seeds the rule's fixed random matrices

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)


class Rule(nn.Module, abc.ABC):
    """Base class of learning rules. Subclasses set ``name`` and ``Options`` (a dataclass).

    The rule is an nn.Module so that its own state (fixed feedback matrices as buffers, learned
    error matrices as parameters) moves with ``.to()`` and is saved by ``state_dict()``. The model
    is held without registering it, so the rule's state never duplicates the model's.
    """

    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, model: nn.Module, options: object, ctx: RuleContext):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: see the class docstring
        self.options, self.ctx = options, ctx
        self.criterion = ctx.criterion()

    @abc.abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        """Turn one batch into parameter updates (including the optimizer step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation."""
        return self.model(x)

    def lr_scales(self) -> dict[nn.Parameter, float]:
        """Learning-rate multiples of the rule's own parameters (e.g. LRA's γ for its error maps);
        the optimizer puts them in groups of their own, so the multiple holds under AdamW too."""
        return {}

    def diagnostics(self) -> dict[str, float]:
        """Extra scalars for metrics.jsonl (e.g. alignment angles). Keys without a "/" are also
        shown in the progress line; per-unit keys look like "angle/layer1.0" and are logged only."""
        return {}

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward passes when the context asks for it."""
        if not self.ctx.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)

    @staticmethod
    def step(optimizer: torch.optim.Optimizer) -> None:
        """Apply the gradients now in ``.grad`` and clear them (set to None, so later partial
        steps through the same optimizer skip these parameters)."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class UnitRule(Rule):
    """Base of the local rules: units with detached inputs, each trained by its own signal.

    Subclasses implement ``signals(outputs, logits, y)`` returning one gradient per unit output
    (``None`` for a unit that is not trained by this rule's signal), or override ``train_step``.
    ``self.units`` / ``self.unit_names`` are the model's units at ``options.granularity``
    (or the children of an ``nn.Sequential`` given by a user); ``self.output_shapes`` holds the
    per-sample shape of each unit's output.
    """

    def __init__(self, model: nn.Module, options: object, ctx: RuleContext):
        super().__init__(model, options, ctx)
        named = model_units(model, getattr(options, "granularity", "layer"))
        self.unit_names = [name for name, _ in named]
        self._units = [unit for _, unit in named]  # a plain list: the model owns the parameters
        self.output_shapes = self._probe_output_shapes()  # before compiling: no extra eval-mode compile
        if ctx.compile:
            # Compiled modules share one code object, so dynamo counts every unit, in train and in
            # eval mode, as a recompile of it: lift the limit, or units past the 8th run eagerly.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * len(self._units))
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 16 * len(self._units))
            for unit in self._units:
                unit.compile()

    @property
    def units(self) -> list[nn.Module]:
        return self._units

    @torch.no_grad()
    def _probe_output_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each unit's output ``h_l``, from one dry forward in eval mode
        (so BatchNorm running statistics are not touched)."""
        if not self.ctx.input_shape:
            raise ValueError(f"rule {self.name!r} needs RuleContext.input_shape (one sample's shape, e.g. (1, 28, 28))")
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            state: State = torch.zeros((2, *self.ctx.input_shape), device=self.ctx.device)
            shapes = []
            for unit in self.units:
                state = unit(state)
                shapes.append(tuple(primary(state).shape[1:]))
        finally:
            for module, mode in modes:
                module.train(mode)
        return shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: State = x
        with self.autocast():
            for unit in self.units:
                state = unit(state)
        return primary(state)

    def forward_units(self, x: torch.Tensor) -> list[State]:
        """Run every unit on the detached output of the one below; keep each unit's graph."""
        outputs: list[State] = []
        state: State = x
        with self.autocast():
            for unit in self.units:
                state = unit(detach_state(state))
                outputs.append(state)
        return outputs

    @staticmethod
    def local_backward(outputs: list[State], signals: list[torch.Tensor | None]) -> None:
        """All local backwards in one autograd call: unit l gets ``signals[l]`` at its output.

        The unit graphs are disjoint (inputs are detached), so nothing flows between units and
        no gradient is computed for unit inputs.
        """
        pairs = [(primary(out), g) for out, g in zip(outputs, signals) if g is not None]
        tensors = [out for out, _ in pairs if out.requires_grad]
        grads = [g.to(out.dtype) for out, g in pairs if out.requires_grad]
        if tensors:
            torch.autograd.backward(tensors, grads)

    def output_error(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and ``e = ∂loss/∂logits`` (softmax − one-hot, over N, with label smoothing)."""
        leaf = logits.detach().float().requires_grad_()
        loss = self.criterion(leaf, y)
        (error,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), error

    @abc.abstractmethod
    def signals(self, outputs: list[State], error: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """One signal per unit output (None: the unit gets no update from this rule)."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        outputs = self.forward_units(x)
        logits = primary(outputs[-1])
        loss, error = self.output_error(logits, y)
        with torch.no_grad():
            signals = self.signals(outputs, error, y)
        self.local_backward(outputs, signals)
        self.step(optimizer)
        return StepResult(loss, logits.detach())
