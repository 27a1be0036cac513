"""Direct feedback alignment (DFA), its hybrid with backprop, and binary DFA (BDFA).

Every unit below the top gets the output error through its own fixed random matrix,
``g_l = reshape(e · B_l)``, and the top unit gets ``e`` itself; then all local backwards run in one
autograd call (``UnitRule``), nothing flowing between units. ``B_l`` is a ``FixedProjection``
(stream = the unit's index), so the feedback of a unit is the same for the same seed whatever the
storage or the hybrid split.

Hybrid (Han & Yoo 2019): units named in ``bp_units`` are merged into the segment of the unit above
them. A segment is one local-backward region: backprop runs through its BP units from the first
non-BP unit above, which gets the DFA signal (or ``e`` when it is the top). Listing every unit
below the top gives plain backprop.

Alignment diagnostic: every ``align_every`` steps, the angle between each unit's DFA update and its
true backprop gradient on the same batch (one extra full forward and backward, BatchNorm running
statistics restored, ``.grad`` untouched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from trainer.passes import uncounted_pass
from trainer.rules.alignment import bp_alignment, needs_labels
from trainer.rules import positions
from trainer.rules.base import RuleContext, RuleError, UnitBatch, byte_text
from trainer.rules.unit_rule import Unit, UnitOptions, UnitRule
from trainer.rules.projection import FixedProjection, Init, Scale, Storage, check_projection_options
from trainer.units import Granularity, State, detach_state, primary, used_parameters


@dataclass
class DFAOptions(UnitOptions):
    """Options of ``dfa`` (and ``granularity``, see ``UnitOptions``; default block).

    bp_units: unit names or name prefixes ("stem", "layer1") trained by backprop inside the
    segment of the first non-BP unit above them (the hybrid).
    feedback_init: entries of B_l, all of unit variance: gaussian N(0, 1), uniform U(-√3, √3) or
    binary ±1. (Han & Yoo's init from the statistics of the fixed matrices could not be read from
    the paper and is not offered.)
    feedback_scale: "auto" (default) multiplies the projection by ``1/√(3·D_l)``, D_l the width B_l
    projects onto (the unit's output per sample, or per position or token where B_l is sized so):
    each signal entry has variance ``‖e‖²/(3·D_l)``, the size of backprop's gradient
    through a linear layer of fan-in D_l in PyTorch's default initialisation and TinyDFA's
    U[-1, 1)/√D_l feedback, so a sample's signal has norm ≈ ‖e‖/√3 whatever the unit's width. A
    number s multiplies by ``s/√C`` instead (entry variance ``s²·‖e‖²/C`` whatever D_l: the
    default until issue 37, kept by every recipe as ``feedback_scale = 1.0``). Why "auto": s/√C
    gives a unit of width D a signal √(3·D/C) times BP's (8.8x for 256 units and 10 classes,
    ~140x for a 64x32x32 ResNet map), which Adam's normalised steps absorb but plain SGD does not:
    TinyDFA's MNIST MLP (784-256-256-10, SGD 0.01 momentum 0.9, batch 128) diverged at s = 1
    (held-out loss 8,720 ± 3,977 after 10 epochs on mnist5k, 3 seeds, unchecked) and at 0.5 and
    0.3; "auto" gave 0.311 ± 0.023 (90.7 ± 1.0 %), and is best or level with the best constant at
    hidden widths 64 and 1,024 and on a two-conv CNN, where a constant tuned for one width is slow
    or unstable at another (BENCHMARKS.md, "DFA's default feedback scale in a user's own loop").
    No scale makes sdfa learn with plain SGD: sign(e) does not shrink as the error does.
    feedback_storage: dense float32; binary feedback also packed (1 bit an entry) or seeded (none).
    align_every: measure the DFA-vs-BP angle every k steps (0: never).
    token_feedback: for units whose output is a token sequence (N, T, D), e.g. transformer blocks,
    under one (N, C) row of logits per sample (``RuleContext.output_layout = "NC"``): "all" projects
    the sample's error onto every token (B_l is C x T·D), "first" onto the first token alone (the
    class token a ViT reads out; B_l is C x D, the other tokens get a zero signal). With logits per
    token (output_layout "NTC" or "TNC") each token's own error reaches the unit at that token
    through one C x D matrix instead (``trainer.rules.positions``), and "first" is refused.
    """

    granularity: Granularity = "block"
    bp_units: list[str] = field(default_factory=list)
    feedback_init: Init = "gaussian"
    feedback_storage: Storage = "dense"
    feedback_scale: Scale = "auto"
    align_every: int = 0
    token_feedback: Literal["all", "first"] = "all"

    def validate(self) -> None:
        check_projection_options(self.feedback_init, self.feedback_storage)
        if self.feedback_scale != "auto" and self.feedback_scale <= 0:
            raise ValueError(f"feedback_scale must be positive or 'auto', got {self.feedback_scale}")
        if self.align_every < 0:
            raise ValueError(f"align_every must be 0 (off) or a number of steps, got {self.align_every}")


@dataclass
class BinaryDFAOptions(DFAOptions):
    """Options of ``bdfa``: DFA with ±1 feedback (times ``feedback_scale``'s factor, as ``dfa``),
    packed by default (32x less memory than float32) or seeded (regenerated in the kernel, no memory)."""

    feedback_init: Literal["binary"] = "binary"
    feedback_storage: Storage = "packed"


def _matches(unit_name: str, entry: str) -> bool:
    return unit_name == entry or unit_name.startswith(entry + ".")


def segment_bounds(unit_names: list[str], bp_units: list[str]) -> list[range]:
    """Split units into local-backward segments: each non-BP unit (and the top) closes the run
    of BP units below it. Raises RuleError for an entry of ``bp_units`` that names no unit."""
    unknown = [entry for entry in bp_units if not any(_matches(name, entry) for name in unit_names)]
    if unknown:
        raise RuleError(f"bp_units: {', '.join(map(repr, unknown))} names no unit; "
                          f"units: {', '.join(unit_names)}")
    segments, start = [], 0
    for index, name in enumerate(unit_names):
        is_bp = any(_matches(name, entry) for entry in bp_units)
        if not is_bp or index == len(unit_names) - 1:
            segments.append(range(start, index + 1))
            start = index + 1
    return segments


class DFA(UnitRule):
    """Direct feedback alignment, with BP units (hybrid) and an alignment diagnostic."""

    name = "dfa"
    Options = DFAOptions

    def __init__(self, model: nn.Module, options: DFAOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        layout = ctx.output_layout
        if layout != "NC":
            if options.token_feedback == "first":
                raise RuleError(f"token_feedback = 'first' sends a sample's one error to its class token, but "
                                f"output_layout = {layout!r} gives every position its own error, which reaches the "
                                "unit at that position: leave token_feedback at 'all'")
            for index in range(self.top):  # each position's error goes to the same position of h_l
                positions.check_positions(self.name, self.unit_names[index], self.probe_shapes[index],
                                          self.probe_shapes[self.top], layout)
        self.unit_parameters = self._owned_parameters() if options.align_every else []
        self.first_token = [layout == "NC" and options.token_feedback == "first" and len(shape) == 2
                            for shape in self.output_shapes]
        self.feedback = nn.ModuleList(
            self.feedback_matrix(index, shape[-1] if first else math.prod(shape))
            for index, (shape, first) in enumerate(zip(self.output_shapes[:-1], self.first_token)))
        self.steps = 0
        self.angles: dict[str, float] = {}

    def feedback_matrix(self, index: int, dim: int) -> FixedProjection:
        """Unit ``index``'s fixed C x D feedback B_l (D: ``dim``, the unit's width where B_l
        projects), drawn as the options say; each unit its own stream of ``ctx.seed``. A DFA variant
        overrides this alone, returning ``FixedProjection(C, D, matrix=its own B, scale=...)``
        (examples/rules/sparse_dfa.py)."""
        options = self.options
        return FixedProjection(self.ctx.num_classes, dim, init=options.feedback_init,
                               storage=options.feedback_storage, seed=self.ctx.seed,
                               stream=self.segments[index][-1], scale=options.feedback_scale, device=self.ctx.device)

    def group_units(self, units: list[Unit]) -> list[Unit]:
        """One unit per segment: a non-BP unit with the BP units below it (``bp_units``), named
        after its top unit."""
        self.segments = segment_bounds([name for name, _ in units], self.options.bp_units)
        return [(units[s[-1]][0], units[s[0]][1] if len(s) == 1 else nn.Sequential(*(units[i][1] for i in s)))
                for s in self.segments]

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model through its units' plain (uncompiled) forwards: the diagnostics' extra passes
        add no recompilations (compiled units share dynamo's recompile limit)."""
        state: State = x
        for _, unit in self.model_units:
            state = unit.forward(state)
        return primary(state)

    def _owned_parameters(self) -> list[list[nn.Parameter]]:
        """Each unit's own parameters: those its forward actually uses (a ResNet layer unit holds
        its whole block as a submodule but uses only its conv and BN). One dry training-mode pass
        of the uncompiled units on two zero images, statistics restored."""
        owned = []
        state: State = self.ctx.example_batch()
        with uncounted_pass(self.model), torch.enable_grad():
            for _, unit in self.model_units:
                state = unit.forward(state)  # the plain module, not its compiled wrapper
                owned.append(used_parameters(unit, primary(state)))
                state = detach_state(state)
        return owned

    @torch.no_grad()
    def signals(self, batch: UnitBatch) -> list[torch.Tensor]:
        """``scale/√C · u·B_l`` reshaped to unit l's output, in its dtype, with u the projected
        error (``e`` for DFA); ``e`` itself for the top. With per-position logits each position's
        row of u is projected onto the same position of h_l, by the same B_l."""
        layout = self.ctx.output_layout
        projected = positions.rows(self.projected_error(batch), layout)
        signals = []
        for index in batch.indices():
            if index == self.top:
                signals.append(batch.error)
                continue
            h = primary(batch.output_of(index))
            g = self.feedback[index].project(projected, out_dtype=h.dtype)
            if self.first_token[index]:  # the class token alone
                g = torch.cat([g[:, None], g.new_zeros(h.shape[0], h.shape[1] - 1, h.shape[2])], dim=1)
            signals.append(positions.unrows(g, h, layout))
        return signals

    def describe_unit(self, index: int) -> list[str]:
        """Its segment (with BP units) and its feedback matrix B_l: shape, kind and bytes."""
        segment = [self.model_units[i][0] for i in self.segments[index]]
        lines = [f"segment {', '.join(map(repr, segment))} (backprop inside)"] if len(segment) > 1 else []
        if index < self.top:
            b = self.feedback[index]
            per = "sample" if self.ctx.output_layout == "NC" else "position"
            lines.append(f"feedback B {b.num_classes} x {b.dim} ({b.init}, {b.storage}; D = {b.dim} a {per}"
                         f"{', the first token' if self.first_token[index] else ''}), {byte_text(b.nbytes)}")
        return lines

    def projected_error(self, batch: UnitBatch) -> torch.Tensor:
        """What the feedback matrices project: the output error e."""
        return batch.error

    def prepare_pipeline(self, stage_of_unit: list[int], micro_batches: int) -> None:
        if self.options.align_every:
            raise RuleError("align_every measures the DFA-vs-BP angles with a backprop pass through the whole "
                            "model, which a pipeline stage does not run: set align_every = 0 with "
                            "train.pipeline_stages > 1")

    def after_backward(self, batch: UnitBatch) -> None:
        """Every ``align_every`` steps, the DFA-vs-BP angles of the update now in ``.grad``."""
        self.steps += 1
        if self.options.align_every and self.steps % self.options.align_every == 0:
            self.angles = self.measure_alignment(batch.x, needs_labels(batch.y, self.name))

    def measure_alignment(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Angle (degrees) between each unit's update now in ``.grad`` and its BP gradient on
        (x, y); "angle" is the mean over the units that learn from feedback (below the top segment)."""
        groups = {name: owned for (name, _), owned in zip(self.model_units, self.unit_parameters)}
        below_top = {name for index, (name, _) in enumerate(self.model_units) if index not in self.segments[-1]}

        def forward(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.eager_forward(x)

        return bp_alignment(self.model, groups, forward, self.criterion, x, y, mean_over=below_top)

    def diagnostics(self) -> dict[str, float]:
        return dict(self.angles)


class BinaryDFA(DFA):
    """Binary DFA: ±1 feedback, packed (1 bit an entry) or seeded (no memory)."""

    name = "bdfa"
    Options = BinaryDFAOptions


class SignDFA(DFA):
    """sDFA (the DRTP authors' sign-DFA): the feedback projects ``sign(e)/N`` instead of ``e``, only
    which classes to push up or down, not by how much; the top unit still gets ``e``. The 1/N keeps
    the batch mean of every other signal, so learning rates mean the same as for DFA."""

    name = "sdfa"
    Options = DFAOptions

    def projected_error(self, batch: UnitBatch) -> torch.Tensor:
        """sign(e)/N, N the samples, or for per-position logits the positions the loss averages."""
        layout = self.ctx.output_layout
        count = batch.samples if layout == "NC" else positions.labelled_positions(batch.error, layout)
        return torch.sign(batch.error) / count
