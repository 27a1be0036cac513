"""The ``Rule`` interface: a rule owns how a batch becomes parameter updates.

The training loop only calls ``rule.train_step(x, y, optimizer)`` and ``rule(x)`` (evaluation),
so every learning rule plugs in without touching the loop; a user's own loop may instead call
``net = rule.prepare()`` and keep its ``loss.backward(); optimizer.step()`` (``trainer.rules.prepared``). A rule steps the optimizer itself:
end-to-end rules once per batch, forward-only rules once per unit, right after that unit's
forward (the optimizer skips parameters whose ``.grad`` is None, so per-unit steps through one
optimizer only move that unit).

``UnitRule`` is the base of the local rules (DFA, DRTP, LRA, ...): it splits the model into
units, compiles each one, runs them with detached inputs, and sends all local backwards out in
one autograd call over the disjoint unit graphs. A local rule says only how it groups the
model's units, what signal each unit gets, and what happens after the local backward.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import functools
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from trainer.errors import TrainingDiverged, divergence
from trainer.units import Granularity, State, detach_state, dry_outputs, model_units, primary


class RuleError(ValueError):
    """A rule cannot train this model with these options (a unit it cannot use, a bad option
    combination). The session adds the recipe's file and section to the message."""


@dataclass
class StepResult:
    """What one training step reports: the batch loss and the logits (both detached)."""

    loss: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def unseen(cls, num_classes: int, device: torch.device, dtype: torch.dtype = torch.float32) -> StepResult:
        """What a pipeline stage below the last reports: a zero loss and no logits (it sees none)."""
        return cls(torch.zeros((), device=device), torch.empty((0, num_classes), device=device, dtype=dtype))


@dataclass(frozen=True)
class ParamOptions:
    """How the optimizer treats one parameter, relative to the recipe's ``[optim]``."""

    lr_scale: float = 1.0  # its learning rate is lr_scale · optim.lr
    weight_decay: float | None = None  # None: optim.weight_decay (for tensors of dimension >= 2)


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


def _checks_divergence(train_step):  # noqa: ANN001, ANN202 (a decorator of every rule's train_step)
    """``train_step`` that raises ``TrainingDiverged`` when the step's loss has diverged (NaN,
    infinite or exploded, ``trainer.errors.divergence``) unless ``rule.check_divergence`` is off.
    A subclass's train_step calling its parent's is checked once, by the outermost call."""
    @functools.wraps(train_step)
    def checked(self: Rule, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        if self._in_step:
            return train_step(self, x, y, optimizer)
        self._in_step = True
        try:
            result = train_step(self, x, y, optimizer)
        finally:
            self._in_step = False
        self.steps_taken += 1
        if self.check_divergence:
            why = divergence(float(result.loss), self.ctx.num_classes)
            if why:
                raise TrainingDiverged(
                    f"rule {self.name!r}: {why} at step {self.steps_taken}; lower the learning rate (a rate tuned "
                    "for another rule often diverges), or set rule.check_divergence = False to go on")
        return result

    checked.checks_divergence = True
    return checked


class Rule(nn.Module, abc.ABC):
    """Base class of learning rules. Subclasses set ``name`` and ``Options`` (a dataclass).

    The rule is an nn.Module so that its own state (fixed feedback matrices as buffers, learned
    error matrices as parameters) moves with ``.to()`` and is saved by ``state_dict()``. The model
    is held without registering it, so the rule's state never duplicates the model's; ``train()``
    and ``eval()`` set the model's mode too.

    ``train_step`` raises ``TrainingDiverged`` on a diverged loss (one host sync a step); set
    ``check_divergence = False`` to go on regardless (the trainer's loop does, and decides itself).
    ``preparable`` says whether ``prepare()`` can express the rule's update through autograd; a
    rule that cannot sets it to the reason. ``pipelining`` says how ``train.pipeline_stages``
    runs it: ``"local"`` (every stage runs the rule's own step engine on its units,
    ``UnitRule.run_units``), ``"torch"`` (end to end, through ``torch.distributed.pipelining``), or
    the reason it cannot be pipelined.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    notes: tuple[str, ...] = ()  # what the rule decided for the user (e.g. where it cut the model), printed
    preparable: ClassVar[bool | str] = True
    pipelining: ClassVar[str] = ("it declares no pipeline schedule (a UnitRule subclass runs its own step engine "
                                 "on each stage; set pipelining = \"torch\" for an end-to-end backprop variant)")
    check_divergence: bool = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("train_step")
        if step is not None and not getattr(step, "__isabstractmethod__", False) \
                and not getattr(step, "checks_divergence", False):
            cls.train_step = _checks_divergence(step)

    def __init__(self, model: nn.Module, options: object, ctx: RuleContext):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: see the class docstring
        self.options, self.ctx = options, ctx
        self.criterion = ctx.criterion()
        self._in_step, self.steps_taken = False, 0

    @abc.abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        """Turn one batch into parameter updates (including the optimizer step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation."""
        return self.model(x)

    def train(self, mode: bool = True) -> Rule:
        """The rule's and the model's mode (dropout, BatchNorm statistics)."""
        super().train(mode)
        self.model.train(mode)
        return self

    def prepare(self) -> nn.Module:
        """The rule as a module for your own loop: ``loss = criterion(net(x), y); loss.backward();
        optimizer.step()`` performs exactly ``train_step``'s update (``trainer.rules.prepared``).
        Its parameters are the model's and the rule's own (LRA's E maps, Kolen–Pollack's B)."""
        from trainer.rules.prepared import PreparedRule  # noqa: PLC0415 (prepared imports this module)

        if self.preparable is not True:
            raise RuleError(f"rule {self.name!r} cannot be prepared for loss.backward(): {self.preparable}; "
                            "call rule.train_step(x, y, optimizer) in your loop instead")
        return PreparedRule(self)

    def prepared_forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The training forward of ``prepare()``'d end-to-end rules: the model's logits, with
        ``after_backward`` queued to run when their backward ends."""
        from trainer.rules.prepared import after_backward_of  # noqa: PLC0415

        with self.autocast():
            logits = self.model(x)
        return after_backward_of(logits, lambda: self.prepared_after_backward(x, y))

    def prepared_after_backward(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """What ``prepare()``'d training runs when a backward ends (``train_step``'s after-backward)."""

    def param_options(self) -> dict[nn.Parameter, ParamOptions]:
        """Optimizer settings of parameters that differ from the recipe's ``[optim]`` (e.g. LRA's γ
        as its error maps' learning-rate multiple); they get groups of their own, so the settings
        hold under AdamW too."""
        return {}

    def state_nbytes(self) -> int:
        """Bytes of the rule's own state (fixed feedback matrices, learned error maps), wherever it
        lives: by default the tensors of ``state_dict()``."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values() if torch.is_tensor(t))

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


@dataclass
class UnitBatch:
    """One batch through the units, as a rule's hooks see it.

    On one process it holds every unit. A pipeline stage (``trainer.pipeline``) holds a slice of
    the units (``first`` is the index of ``outputs[0]``) and one micro-batch of ``samples``: then
    ``error`` is the micro-batch's part of the whole batch's mean loss gradient, so that the
    local backwards of the micro-batches add up to the update of the whole batch.
    """

    x: torch.Tensor  # the input of unit ``first``
    y: torch.Tensor | None  # None: a prepare()'d forward given no labels
    outputs: list[State]  # each unit's output, with its graph
    error: torch.Tensor  # e = ∂loss/∂logits of the top unit (a batch mean: softmax − one-hot over N)
    first: int = 0  # the unit index of outputs[0]
    samples: int = 0  # N, the samples the update averages over (0: len(y); the whole batch for a micro-batch)
    errors: dict[int, torch.Tensor] = field(default_factory=dict)  # error units by unit index (LRA): from above, then own

    def __post_init__(self) -> None:
        self.samples = self.samples or len(self.y)

    def indices(self) -> range:
        """The unit indices of ``outputs``."""
        return range(self.first, self.first + len(self.outputs))

    def output_of(self, index: int) -> State:
        return self.outputs[index - self.first]

    def input_of(self, index: int) -> torch.Tensor:
        """What unit ``index`` read: the batch, or the (detached) output of the unit below."""
        return self.x if index == self.first else primary(self.outputs[index - self.first - 1]).detach()


class Transport:
    """What a slice of units exchanges with the stages that hold the others, during ``run_units``.

    This default is one process holding every unit: one micro-batch, nothing to send or receive.
    A pipeline stage (``trainer.pipeline``) sends and receives these between processes.
    """

    micro_batches: int = 1  # the batch goes through as this many micro-batches (error rules)
    window: int = 0  # micro-batches whose local backward may wait for their error (a stage: S − 1 − s)

    def receive_input(self, samples: int) -> State:
        """The input state of the slice's first unit (the output of the stage below)."""
        raise RuntimeError("one process holds the first unit: its input is the batch")

    def send_output(self, state: State) -> None:
        """The slice's top output, for the stage above."""

    def publish_error(self, error: torch.Tensor) -> None:
        """``e`` of the micro-batch just run, from the stage holding the top unit to the others."""

    def receive_error(self, samples: int) -> torch.Tensor:
        """``e`` of the oldest micro-batch still waiting, from the stage holding the top unit."""
        raise RuntimeError("one process holds the top unit: it forms e itself")

    def receive_error_units(self, batch: UnitBatch) -> None:
        """Into ``batch.errors``: the error units of units above the slice that its signals need."""

    def send_error_units(self, batch: UnitBatch) -> None:
        """The slice's error units that stages below need (after ``signals`` formed them)."""


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
    forward_only: bool = False
    last_loss: torch.Tensor | None = None  # the task loss of the last step

    def __init__(self, model: nn.Module, options: UnitOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        if not ctx.input_shape:
            raise ValueError(f"rule {self.name!r} needs RuleContext.input_shape (one sample's shape, e.g. (1, 28, 28))")
        try:
            self.model_units, note = model_units(model, options.granularity, options.units)
        except ValueError as err:
            raise RuleError(str(err)) from None
        if len(self.model_units) < 2:
            raise RuleError(
                f"rule {self.name!r} found a single unit in {type(model).__name__} ({note or 'granularity ' + repr(options.granularity)}): "
                "a local rule would train it as plain backprop. Cut it into units: name submodules to cut after "
                "(units = [...]), use granularity = \"children\", put UnitEnd markers in its forward, or use rule 'bp'")
        self.notes = (note,) if note else ()
        grouped = self.group_units(self.model_units)
        self.unit_names = [name for name, _ in grouped]
        self.units = [unit for _, unit in grouped]  # a plain list: the model owns the parameters
        self.output_shapes = self._probe_output_shapes()  # before compiling: no extra eval-mode compile
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

    def after_backward(self, batch: UnitBatch) -> None:
        """Runs after the local backwards, before the optimizer step (``.grad`` holds the updates;
        on a pipeline stage, once per batch after the micro-batches' backwards, with the last one)."""

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

    @property
    def top(self) -> int:
        """The index of the top (output) unit."""
        return len(self.units) - 1

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
        xs, ys = x.chunk(transport.micro_batches), y.chunk(transport.micro_batches)
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
        batch = UnitBatch(primary(inputs), y, outputs, error, first=first, samples=samples)
        transport.receive_error_units(batch)
        signals = self.signals(batch)
        transport.send_error_units(batch)
        self.local_backward([self.signal_point(i, out) for i, out in zip(batch.indices(), outputs)], signals)
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
        self.local_backward([self.signal_point(index, out)], [signal])
        return loss

    def prepared_forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``prepare()``'s training forward: the units as in ``train_step``, their signals injected
        by the backward of the logits (``trainer.rules.prepared``)."""
        from trainer.rules.prepared import inject_signals  # noqa: PLC0415

        return inject_signals(self, x, y, self.forward_units(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        """The loss and ``e = ∂loss/∂logits`` (softmax − one-hot, over N, with label smoothing)."""
        leaf = logits.detach().float().requires_grad_()
        loss = self.criterion(leaf, y)
        (error,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), error

    def _probe_output_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each unit's output ``h_l``, from one dry forward in eval mode
        (so BatchNorm running statistics are not touched)."""
        zeros = torch.zeros((2, *self.ctx.input_shape), device=self.ctx.device)
        return [tuple(primary(out).shape[1:]) for out in dry_outputs(self.model, self.units, zeros)]
