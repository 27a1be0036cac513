"""Target projection: DRTP and tpSGD, forward-only training whose activation memory is one unit's.

Every unit l below the top gets a target that depends only on the labels, ``t_l = y*·P_l`` with
``P_l`` a fixed random C x D_l matrix (a ``FixedProjection``, stream = the unit's index; for
one-hot labels the projection is a scaled row gather of P_l). Each unit minimises a local loss
``J_l(z_l, t_l)`` of its own output ``z_l``; its signal is ``g_l = ∂J_l/∂z_l``:

- DRTP (Frenkel et al. 2021): ``J_l = −⟨z_l, t_l⟩ / N``, so ``g_l = −t_l / N``: the projected label,
  averaged over the batch like the output error ``e`` (a learning rate then means the same thing
  for every batch size and for the top unit). J_l has no minimum: it keeps pulling, so DRTP wants
  bounded units (tanh, as in the paper, or a normalisation after every layer); unnormalised ReLU
  units grow without end.
- tpSGD (Lomnitz et al. 2022): ``J_l = L(z_l, t_l)`` with L one of mse, l1, smooth_l1 (averaged
  over the batch and the unit's features, as PyTorch's losses), or ce: cross-entropy of the logits
  ``target_scale · z_l·P_lᵀ / √D_l``, a fixed random readout whose class rows are the targets.
  The default is ce: it is the one that also trains ReLU units (a zero-mean target under the
  elementwise losses pulls ReLU outputs down to zero, where they stop learning); the elementwise
  losses want a zero-centred activation such as tanh.

The top unit gets the true output error ``e`` of the task loss in both rules.

Forward-only (the default): since no signal needs the network's output, unit l runs its forward,
its local backward and its own optimizer step (``Rule.step``), and its graph is dropped before
unit l+1 runs on its detached output. Peak activation memory is then about one unit's, whatever
the depth. ``forward_only = false`` runs every unit first, then one joint backward and one step.
Both give the same updates (unit l+1 runs on unit l's output from before unit l's step either
way); only the memory differs.

Recurrent layers (``models.RecurrentLayer``) output hidden-state sequences (N, T, H). Their P_l is
C x H and the class target is the same at every step: ``sequence_target = "last_step"`` puts the
local loss on the last hidden state only, ``"every_step"`` on every step (averaged over T).
Backprop runs through time inside a layer, never from one layer into the one below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import RecurrentLayer
from trainer.rules.base import RuleContext, byte_text
from trainer.rules.unit_rule import UnitOptions, UnitRule
from trainer.rules.projection import FixedProjection, Init, Storage, check_projection_options

SequenceTarget = Literal["every_step", "last_step"]
LocalLoss = Literal["mse", "l1", "smooth_l1", "ce"]

ELEMENTWISE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss,
}


@dataclass
class DRTPOptions(UnitOptions):
    """Options of ``drtp`` (and ``granularity``, see ``UnitOptions``; default layer).

    forward_only: update each unit right after its own forward and free its graph (constant
    activation memory); false: all units forward, then one joint backward and step.
    target_init / target_storage / target_scale: P_l as in DFA's feedback (``FixedProjection``):
    gaussian, uniform or binary entries of unit variance times target_scale/√C, so a target
    entry has standard deviation target_scale/√C whatever D_l; binary P may be stored packed
    (1 bit an entry) or seeded (no memory).
    sequence_target: recurrent layers only: the target on the last time step or on every one.

    Defaults: layer units (the least memory), forward-only, dense gaussian P_l with
    target_scale = 1 (target entries of standard deviation 1/√C), the target on the last step
    (it trains the recurrent recipe better; BENCHMARKS.md).
    """

    forward_only: bool = True
    target_init: Init = "gaussian"
    target_storage: Storage = "dense"
    target_scale: float = 1.0
    sequence_target: SequenceTarget = "last_step"

    def validate(self) -> None:
        check_projection_options(self.target_init, self.target_storage, prefix="target")
        if self.target_scale <= 0:
            raise ValueError(f"target_scale must be positive, got {self.target_scale}")


@dataclass
class TpSGDOptions(DRTPOptions):
    """Options of ``tpsgd``: those of ``drtp`` and the local loss (default ce, see the module)."""

    loss: LocalLoss = "ce"


class TargetProjection(UnitRule):
    """DRTP: each unit moves along its projected label; base of tpSGD, which swaps the local loss."""

    name = "drtp"
    Options = DRTPOptions
    preparable = ("its units learn from projected labels, each stepping right after its own forward, "
                  "which no single backward of a loss expresses")
    per_position = ("each unit's target t_l = P_l·y* is projected from one label per sample onto the unit's whole "
                    "output, and labels per position give a sample no one target")

    def __init__(self, model: nn.Module, options: DRTPOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        self.forward_only = options.forward_only
        self.is_sequence = [isinstance(unit, RecurrentLayer) for unit in self.units]
        self.targets = nn.ModuleList(
            FixedProjection(ctx.num_classes, shape[-1] if sequence else math.prod(shape),
                            init=options.target_init, storage=options.target_storage, seed=ctx.seed,
                            stream=index, scale=options.target_scale, device=ctx.device)
            for index, (shape, sequence) in enumerate(zip(self.output_shapes[:-1], self.is_sequence))
        )
        self.local_losses: list[torch.Tensor | None] = [None] * (len(self.units) - 1)

    def describe_unit(self, index: int) -> list[str]:
        """Its target matrix P_l: shape, kind and bytes."""
        if index == self.top:
            return []
        p = self.targets[index]
        return [f"target P {p.num_classes} x {p.dim} ({p.init}, {p.storage}), {byte_text(p.nbytes)}"]

    def local_loss(self, index: int, z: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``J_l`` of unit ``index`` from its outputs z (N, S, D) and targets (N, 1, D), S = time steps."""
        return -(z * target).sum(-1).mean()

    def target_view(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """The part of a unit's output that meets the target, as (N, S, D): S = 1 for a plain unit,
        T (every step) or 1 (last step) for a recurrent layer."""
        if not self.is_sequence[index]:
            return output.flatten(1).unsqueeze(1)
        if self.options.sequence_target == "last_step":
            return output[:, -1:]
        return output

    def unit_signal(self, index: int, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``g_l = −t_l / (N·S)`` on the outputs that carry a target, zero elsewhere: ``∂J_l/∂z_l``
        written directly, so DRTP's signal needs no autograd and saves no tensor."""
        target = self.targets[index].project_labels(y, output.dtype).unsqueeze(1)
        signal = torch.zeros(output.shape, dtype=output.dtype, device=output.device)
        on_target = self.target_view(index, signal)
        on_target.copy_(target.expand_as(on_target) / -(len(y) * on_target.shape[1]))
        with torch.no_grad():
            self.local_losses[index] = self.local_loss(index, self.target_view(index, output).float(), target, y)
        return signal

    def diagnostics(self) -> dict[str, float]:
        """Each unit's last local loss J_l (the task loss for the top); "local_loss" is their mean
        over the units below the top (DRTP's J_l = −⟨z_l, t_l⟩/N falls as outputs align with targets)."""
        known = {name: loss for name, loss in zip(self.unit_names, (*self.local_losses, self.last_loss))
                 if loss is not None}  # a pipeline stage knows only its own units' losses
        if not known:
            return {}
        losses = torch.stack([loss.float() for loss in known.values()]).tolist()
        out = {f"local_loss/{name}": loss for name, loss in zip(known, losses)}
        below = [loss for name, loss in zip(known, losses) if name != self.unit_names[-1]]
        if below:
            out["local_loss"] = sum(below) / len(below)
        return out


class TargetProjectionSGD(TargetProjection):
    """tpSGD: each unit minimises its own loss against its projected target, by SGD on its own
    parameters alone."""

    name = "tpsgd"
    Options = TpSGDOptions

    def unit_signal(self, index: int, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``g_l = ∂J_l/∂z_l`` by autograd on a detached copy of the output, shaped and typed like it."""
        leaf = output.detach().float().requires_grad_()
        target = self.targets[index].project_labels(y).unsqueeze(1)
        with torch.enable_grad():
            loss = self.local_loss(index, self.target_view(index, leaf), target, y)
            (signal,) = torch.autograd.grad(loss, leaf)
        self.local_losses[index] = loss.detach()
        return signal.to(output.dtype)

    def local_loss(self, index: int, z: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.options.loss == "ce":
            readout = self.targets[index].dense().to(z.device)
            logits = (z @ readout.T) * (self.options.target_scale / math.sqrt(readout.shape[1]))
            return F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(z.shape[1]))
        return ELEMENTWISE_LOSSES[self.options.loss](z, target.expand_as(z))
