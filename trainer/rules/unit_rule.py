"""The base of the local rules: units with detached inputs, each trained by its own signal, and the
step engine that runs them (one process, or a pipeline stage's slice of the units)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from trainer.rules import positions
from trainer.rules.base import Rule, RuleContext, describe_value
from trainer.rules.batch import StepResult, Transport, UnitBatch
from trainer.rules.checks import RuleError, check_logits, dry_run
from trainer.rules.prepared import inject_signals
from trainer.units import (
    Granularity, State, cut_landing, detach_state, dry_outputs, model_units, primary,
    sample_shape,
)


@dataclass
class UnitOptions:
    """Options every local rule has.

    granularity: what a unit is (layer, block or stage of the models the trainer knows; children:
    each block of any model's main block stack; see ``trainer.units.model_units``): backprop runs
    inside a unit, the rule's signal between units.
    units: the submodules (qualified names) after which to cut any model, in execution order;
    UnitEnd markers in a model's forward cut it too (``trainer.graph_units``).
    """

    granularity: Granularity = "layer"
    units: list[str] = field(default_factory=list)


Unit = tuple[str, nn.Module]


class UnitRule(Rule):
    """Base of the local rules: units with detached inputs, each trained by its own signal.

    One step (``train_step``): every unit runs on the detached output of the one below
    (``forward_units``); the top unit's output error ``e = ∂loss/∂logits`` is formed; ``signals``
    gives one gradient per unit; all local backwards run in one autograd call; ``after_backward``
    may read or change the ``.grad`` they wrote; the optimizer steps once. A rule whose signals
    need only the labels may set ``forward_only``: then each unit runs forward, gets
    ``unit_signal``, runs its backward and steps before the next unit runs, and its graph is
    freed at once (the top unit gets ``e``; there is no ``after_backward``).

    Hooks a rule overrides: ``group_units`` (what the trained units are, from the model's units
    at ``options.granularity``), ``signals`` (or ``unit_signal`` for forward-only rules),
    ``signal_point`` (where in a unit's output the signal enters) and ``after_backward``.
    ``model_units`` are the model's own units, ``units`` / ``unit_names`` the grouped ones (each
    compiled once when the context asks), ``output_shapes`` the per-sample shape of each grouped
    unit's output.
    """

    Options: ClassVar[type[UnitOptions]]
    pipelining = "local"
    sized_by_input = True
    forward_only: bool = False
    last_loss: torch.Tensor | None = None  # the task loss of the last step

    def __init__(self, model: nn.Module, options: UnitOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        if not ctx.input_shape and ctx.example_input is None:
            raise ValueError(f"rule {self.name!r} needs RuleContext.input_shape (one sample's shape, e.g. (1, 28, 28)) "
                             "or RuleContext.example_input (a batch the model takes, e.g. int64 token ids)")
        example = ctx.example_batch()
        try:
            self.model_units, note = model_units(model, options.granularity, options.units,
                                                 inputs=len(example) if isinstance(example, tuple) else 1)
        except ValueError as err:
            raise RuleError(str(err)) from None
        fix = ("Cut it into units: name submodules to cut after (units = [...]), use granularity = \"children\", put "
               "UnitEnd markers in its forward, or use rule 'bp'")
        if len(self.model_units) < 2:
            raise RuleError(
                f"rule {self.name!r} found a single unit in {type(model).__name__} ({note or 'granularity ' + repr(options.granularity)}): "
                f"a local rule would train it as plain backprop. {fix}")
        self.notes = (note,) if note else ()
        grouped = self.group_units(self.model_units)
        self.unit_names = [name for name, _ in grouped]
        self.units = [unit for _, unit in grouped]  # a plain list: the model owns the parameters
        self._refuse_one_segment(model, fix)
        self.probe_shapes = self._probe_shapes(example)  # before compiling: no extra eval-mode compile
        # each unit's output at one position (per sample for output_layout "NC")
        self.output_shapes = [positions.feature_shape(shape, ctx.output_layout) for shape in self.probe_shapes]
        self.checked_input_shape = sample_shape(example)
        if ctx.compile:
            # Compiled modules share one code object, so dynamo counts every unit, in train and in
            # eval mode, as a recompile of it: lift the limit, or units past the 8th run eagerly.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * len(self.units))
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 16 * len(self.units))
            for unit in self.units:
                unit.compile()

    # --- hooks -------------------------------------------------------------------------------

    def group_units(self, units: list[Unit]) -> list[Unit]:
        """The units this rule trains, from the model's units (default: each as it is)."""
        return units

    def signals(self, batch: UnitBatch) -> Sequence[torch.Tensor | None]:
        """One signal per unit of the batch, the gradient its local backward starts from (None:
        no backward for that unit). The default: ``unit_signal`` below the top, ``e`` for the top."""
        return [batch.error if index == self.top else self.unit_signal(index, primary(batch.output_of(index)), batch.y)
                for index in batch.indices()]

    def unit_signal(self, index: int, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The signal of unit ``index`` (below the top) from its output and the labels alone."""
        raise NotImplementedError(f"rule {self.name!r} defines neither signals() nor unit_signal()")

    def signal_point(self, index: int, output: State) -> torch.Tensor:
        """The tensor of unit ``index``'s output that its signal is the gradient of (default h_l)."""
        return primary(output)

    def local_updates(self, batch: UnitBatch) -> None:
        """Updates the rule writes into ``.grad`` itself beside the local backwards (LRA's fused ΔW
        and product-form ΔE), right after ``signals``: once a (micro-)batch, in ``train_step`` and in
        ``prepare()``'d training alike, so ``signals`` itself has no side effects. Default: none."""

    def error_sources(self, index: int) -> tuple[int, ...]:
        """The units whose error units the signal of unit ``index`` needs besides ``e`` (LRA: the
        unit its error map reads); a pipeline sends those down from the stages above."""
        return ()

    def unit_rule_parameters(self, index: int) -> list[nn.Parameter]:
        """The rule's own learned parameters that unit ``index``'s updates train (LRA's E_l)."""
        return []

    def prepare_pipeline(self, stage_of_unit: list[int], micro_batches: int) -> None:
        """Called before a pipeline trains this rule (``stage_of_unit[l]``: the stage of unit l);
        raises RuleError for what cannot be pipelined exactly."""

    def describe_unit(self, index: int) -> list[str]:
        """What ``describe`` adds about unit ``index``: its matrices (shape, bytes), its signal."""
        return []

    @property
    def top(self) -> int:
        """The index of the top (output) unit."""
        return len(self.units) - 1

    def describe_lines(self) -> list[str]:
        """One line per unit: its name, its output's shape for the example batch, where its cut
        landed (the module or operation after which its signal enters) and ``describe_unit``."""
        landed = {name: cut_landing(name, unit) for name, unit in self.model_units}
        lines = [f"{len(self.units)} units; output shapes for the example batch ({self.ctx.describe_input()})"]
        for index, name in enumerate(self.unit_names):
            where = ("ends at the model's output, the logits: gets e = ∂loss/∂logits" if index == self.top
                     else f"signal enters after {landed[name]}")
            extra = "".join(f"; {text}" for text in self.describe_unit(index))
            lines.append(f"unit {index} {name!r}: output {self.probe_shapes[index]}, {where}{extra}")
        return lines

    # --- the step ----------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        return self.run_units(x, y, optimizer)

    def run_units(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                  transport: Transport | None = None, indices: range | None = None) -> StepResult:
        """The step engine: one batch through the units ``indices`` (all: one process; a pipeline
        stage's slice), with ``transport`` supplying what other stages compute (the slice's input,
        ``e``, error units from above) and taking what they need. Returns the loss and logits where
        the slice holds the top unit, else ``StepResult.unseen``.

        Error rules: the batch goes through as ``transport.micro_batches`` micro-batches; each one's
        local backwards run once its error is known (at most ``transport.window`` wait), and their
        updates add up to the whole batch's: one ``after_backward`` and one optimizer step.
        Forward-only rules: each unit runs, updates and steps before the next (``forward_only_unit``)."""
        transport = transport or Transport()
        indices = indices if indices is not None else range(len(self.units))
        holds_top = self.top in indices
        if self.forward_only:
            state = x if indices.start == 0 else transport.receive_input(len(y))
            for index in indices:
                state = self.forward_only_unit(index, state, y, optimizer)
            if not holds_top:
                transport.send_output(state)
                return StepResult.unseen(self.ctx.num_classes, y.device)
            return StepResult(self.last_loss, primary(state))
        micro = transport.micro_batches  # a pipeline's (a batch of one tensor); else the batch whole, any inputs
        xs, ys = ([x], [y]) if micro == 1 else (x.chunk(micro), y.chunk(micro))
        in_flight: collections.deque[tuple[State, list[State], torch.Tensor, torch.Tensor | None]] = collections.deque()
        losses, logits = [], []
        batch: UnitBatch | None = None
        for m, y_m in enumerate(ys):
            inputs = xs[m] if indices.start == 0 else transport.receive_input(len(y_m))
            outputs = self.forward_units(inputs, indices)
            error = None
            if holds_top:
                loss, error = self.output_error(primary(outputs[-1]), y_m)
                if len(ys) > 1:
                    error = error * (len(y_m) / len(y))  # the micro-batch's part of the batch mean
                transport.publish_error(error)
                losses.append(loss * len(y_m) if len(ys) > 1 else loss)
                logits.append(primary(outputs[-1]).detach())
            else:
                transport.send_output(outputs[-1])
            in_flight.append((inputs, outputs, y_m, error))
            while len(in_flight) > transport.window:
                batch = self._local_step(*in_flight.popleft(), indices.start, len(y), transport)
        while in_flight:
            batch = self._local_step(*in_flight.popleft(), indices.start, len(y), transport)
        self.after_backward(batch)
        self.step(optimizer)
        if not holds_top:
            return StepResult.unseen(self.ctx.num_classes, y.device)
        self.last_loss = losses[0] if len(ys) == 1 else torch.stack(losses).sum() / len(y)
        return StepResult(self.last_loss, logits[0] if len(ys) == 1 else torch.cat(logits))

    def _local_step(self, inputs: State, outputs: list[State], y: torch.Tensor, error: torch.Tensor | None,
                    first: int, samples: int, transport: Transport) -> UnitBatch:
        """One micro-batch's signals and local backwards, once its error (and any error units from
        above) is here."""
        if error is None:
            error = transport.receive_error(len(y))
        batch = UnitBatch(inputs if first == 0 else primary(inputs), y, outputs, error, first=first, samples=samples)
        transport.receive_error_units(batch)
        points = [self.signal_point(i, out) for i, out in zip(batch.indices(), outputs)]
        signals = self.checked_signals(self.signals(batch), batch.indices(), points)
        self.local_updates(batch)
        transport.send_error_units(batch)
        self.local_backward(points, signals)
        return batch

    def forward_only_unit(self, index: int, state: State, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> State:
        """One unit of a forward-only step: forward, signal, backward, step; the unit's graph goes
        with ``out``, and its detached output is returned (the top unit sets ``last_loss``)."""
        with self.autocast():
            out = self.units[index](detach_state(state))
        loss = self.forward_only_backward(index, out, y)
        if loss is not None:
            self.last_loss = loss
        self.step(optimizer)
        return detach_state(out)

    def forward_only_backward(self, index: int, out: State, y: torch.Tensor) -> torch.Tensor | None:
        """Unit ``index``'s local backward in a forward-only step, from its output: ``unit_signal``
        below the top, ``e`` at the top (whose loss is returned; None below)."""
        loss = None
        if index < self.top:
            signal = self.unit_signal(index, primary(out), y)
        else:
            loss, signal = self.output_error(primary(out), y)
        points = [self.signal_point(index, out)]
        self.local_backward(points, self.checked_signals([signal], range(index, index + 1), points))
        return loss

    def checked_signals(self, signals: object, indices: Sequence[int],
                        points: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The rule's signals for the units ``indices``, checked where they are consumed against
        their signal points: a list with one tensor of the point's shape (or None) per unit. A
        user's rule that returns None, another count or another shape gets a ``RuleError`` naming
        its class and hook (``signals``, or ``unit_signal`` when it only defines that), not an
        autograd error."""
        hook = "signals" if type(self).signals is not UnitRule.signals else "unit_signal"
        where = f"{type(self).__name__}.{hook}()"
        names = [self.unit_names[i] for i in indices]
        if not isinstance(signals, (list, tuple)) or len(signals) != len(points):
            raise RuleError(f"{where} returned {describe_value(signals)}; expected a list of {len(points)}, one tensor (or "
                            f"None: no backward) per unit of the batch, for units {names}")
        for name, index, point, signal in zip(names, indices, points, signals):
            if signal is not None and not (isinstance(signal, torch.Tensor) and signal.shape == point.shape):
                raise RuleError(f"{where} returned {describe_value(signal)} for unit {name!r} (index {index}); expected a "
                                f"{tuple(point.shape)} tensor (or None), the shape of its signal point "
                                f"(signal_point({index}, output))")
        return list(signals)

    def prepared_forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``prepare()``'s training forward: the units as in ``train_step``, their signals injected
        by the backward of the logits (``trainer.rules.prepared``)."""

        return inject_signals(self, x, y, self.forward_units(x))

    def forward(self, x: State) -> torch.Tensor:
        state: State = x
        with self.autocast():
            for unit in self.units:
                state = unit(state)
        return primary(state)

    def forward_units(self, x: State, indices: range | None = None) -> list[State]:
        """Run the units (all, or ``indices``) each on the detached output of the one below; keep
        each unit's graph."""
        outputs: list[State] = []
        state: State = x
        with self.autocast():
            for index in indices if indices is not None else range(len(self.units)):
                state = self.units[index](detach_state(state))
                outputs.append(state)
        return outputs

    @staticmethod
    def local_backward(tensors: Sequence[torch.Tensor], signals: Sequence[torch.Tensor | None]) -> None:
        """All local backwards in one autograd call: ``tensors[l]`` gets ``signals[l]``.

        The unit graphs are disjoint (inputs are detached), so nothing flows between units and
        no gradient is computed for unit inputs.
        """
        pairs = [(t, g) for t, g in zip(tensors, signals, strict=True) if g is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])

    def output_error(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and ``e = ∂loss/∂logits`` (softmax − one-hot, over N or over the labelled
        positions, with label smoothing; zero at a position labelled ``IGNORE_INDEX``)."""
        leaf = logits.detach().float().requires_grad_()
        loss = self.criterion(leaf, y)
        (error,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), error

    def _refuse_one_segment(self, model: nn.Module, fix: str) -> None:
        """However the units came about (bp_units merging every unit below the top into its segment,
        a cut after the model's last module, units without parameters), fewer than two of them
        that hold parameters would be plain backprop of one segment under the rule's name."""
        holding = [name for name, unit in zip(self.unit_names, self.units) if next(unit.parameters(), None) is not None]
        if len(holding) >= 2:
            return
        if len(self.units) == 1:
            why = f"bp_units puts all {len(self.model_units)} of its units into the top's segment"
            fix = "Leave at least one unit below the top out of bp_units (it gets the feedback), or use rule 'bp'"
        else:
            named = ", ".join(map(repr, holding)) or "none"
            why = (f"of its units {', '.join(map(repr, self.unit_names))}, only {named} holds parameters; a unit "
                   "without any (after a cut at the model's last module, a lone Flatten) learns nothing")
        raise RuleError(f"rule {self.name!r} would train {type(model).__name__} as a single segment ({why}): a local "
                        f"rule would train it as plain backprop. {fix}")

    def _probe_shapes(self, example: State) -> list[tuple[int, ...]]:
        """The shape of each unit's output ``h_l`` for the example batch (``RuleContext.example_batch``),
        from one dry forward in eval mode (so BatchNorm running statistics are not touched); the
        logits' must be of the context's class count and layout."""
        what = self.ctx.describe_input()
        fix = ("set input_shape to the shape of one sample of your data, without the batch"
               if self.ctx.example_input is None else "give an example_input the model takes (a batch, or the tuple of "
               "its forward's several inputs)")
        outputs = dry_run(self.name, lambda: dry_outputs(self.model, self.units, example), what, fix)
        check_logits(self.name, primary(outputs[-1]), self.ctx.num_classes, what, self.ctx.output_layout)
        return [tuple(primary(out).shape) for out in outputs]
