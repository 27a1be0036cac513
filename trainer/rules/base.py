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
import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from trainer.errors import TrainingDiverged, divergence, input_cause, logit_divergence
from trainer.rules import positions
from trainer.rules.checks import (
    RuleError, check_batch, check_context, check_logits, check_optimizer, dry_run, rule_arguments,
)
from trainer.rules.positions import OutputLayout
from trainer.units import (
    Granularity, State, batch_length, call_model, cut_landing, detach_state, dry_outputs, model_units, primary,
    sample_shape,
)

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
    # where the logits keep classes and positions: "NC" (one row per sample), "NTC" / "TNC" (one per
    # token), "NCHW" (one per pixel); labels have the positions' shape (trainer.rules.positions)
    output_layout: OutputLayout = "NC"
    # an example batch the rules' dry forwards run on instead of float zeros of input_shape: a tensor
    # (int64 token ids, ...) or a tuple of a forward's several inputs (ids and a mask)
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_context(self)  # a bad field fails here, naming it, not later inside a rule

    def criterion(self) -> nn.Module:
        """The task loss: the mean cross-entropy over the samples, or over the labelled positions."""
        return positions.criterion(self.output_layout, self.label_smoothing)

    def example_batch(self) -> State:
        """What the dry forwards run on, on ``device``: ``example_input``, else two float zero
        samples of ``input_shape``."""
        if self.example_input is None:
            return torch.zeros((2, *self.input_shape), device=self.device)
        if isinstance(self.example_input, tuple):
            return tuple(t.to(self.device) for t in self.example_input)
        return self.example_input.to(self.device)

    def describe_input(self) -> str:
        """The dry forwards' input, as messages name it."""
        if self.example_input is None:
            return f"inputs of RuleContext.input_shape = {self.input_shape}"
        return f"RuleContext.example_input ({_describe(self.example_input)})"


def _checks_divergence(train_step):  # noqa: ANN001, ANN202 (a decorator of every rule's train_step)
    """``train_step`` that raises ``TrainingDiverged`` when the step's loss has diverged (NaN,
    infinite or exploded, ``trainer.errors.divergence``) unless ``rule.check_divergence`` is off,
    before any update lands: the rule's ``step`` calls wait until the loss is known (``Rule.step``)
    and the running statistics its forward moved are put back, so a diverged step changes no
    parameter, optimizer state or BatchNorm statistic. What the rule returns is checked
    (``_check_step_result``). A subclass's train_step calling its parent's is checked once, by the
    outermost call, which first checks the batch and the optimizer (``trainer.rules.checks``),
    before anything changes."""
    @functools.wraps(train_step)
    def checked(self: Rule, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        if self._in_step:
            return train_step(self, x, y, optimizer)
        check_batch(self, x, y)
        check_optimizer(self, optimizer)
        guarded = self.check_divergence
        statistics = _saved_statistics(self.model) if guarded else []
        self._in_step, self._held = True, [] if guarded else None
        try:
            result = train_step(self, x, y, optimizer)
            _check_step_result(self, result, y)
            why = divergence(float(result.loss), self.ctx.num_classes) if guarded else None
            if why:
                _restore(statistics)
                raise self._divergence_error(why, x, self.steps_taken + 1)
            held = self._held or []
        except BaseException:
            for held_optimizer, _ in self._held or []:  # a step that failed leaves no gradients for the next
                held_optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            self._in_step, self._held = False, None
        for held_optimizer, grads in held:  # the steps land, in order, each with the gradients it had
            for p, grad in grads or ():
                p.grad = grad
            apply_step(held_optimizer)
        self.steps_taken += 1
        return result

    checked.checks_divergence = True
    return checked


def apply_step(optimizer: torch.optim.Optimizer) -> None:
    """Apply the gradients now in ``.grad`` and clear them (set to None, so later partial steps
    through the same optimizer skip these parameters)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def input_peak(x: State) -> torch.Tensor:
    """The batch's largest |x| as a 0-d float tensor on its device, without a host sync (NaN or inf
    when x holds one; 0 for an empty or integer batch; the largest over a forward's several
    inputs): what ``trainer.errors.input_cause`` reads."""
    floats = [t for t in (x if isinstance(x, tuple) else (x,)) if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros((), device=primary(x).device)
    peaks = [t.detach().abs().amax().float() for t in floats]
    return peaks[0] if len(peaks) == 1 else torch.stack(peaks).amax()


def _saved_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the buffers a training forward moves (BatchNorm's running statistics and batch
    count), for ``_restore`` after a diverged step."""
    return [(buffer, buffer.clone()) for name, buffer in model.named_buffers()
            if name.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


def _describe(value: object) -> str:
    """A value as a contract error names it: None, a (shape) dtype tensor, or its type."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    return f"a {type(value).__name__}" + (f" of {len(value)} items" if isinstance(value, (list, tuple)) else "")


def byte_text(count: int) -> str:
    """A byte count as a reader takes it in: "704 B", "1.2 kB", "513 MB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def _check_step_result(rule: Rule, result: object, y: torch.Tensor) -> None:
    """What every consumer of ``train_step`` reads: a ``StepResult`` of a one-element loss tensor
    and the batch's logits: (N, C) for its N samples, or of ``RuleContext.output_layout`` with
    the labels' positions; a user's rule that returns anything else gets a ``RuleError`` naming
    its class and the hook, not a failure further on in the loop."""
    layout = rule.ctx.output_layout
    if isinstance(result, StepResult):
        loss, logits = result.loss, result.logits
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            got = f"a StepResult whose loss is {_describe(loss)}"
        elif not (isinstance(logits, torch.Tensor) and logits.dim() == len(layout)
                  and positions.label_shape(logits.shape, layout) == tuple(y.shape)):
            got = f"a StepResult whose logits are {_describe(logits)}"
        else:
            return
    else:
        got = _describe(result)
    want = f"({len(y)}, C) logits" if layout == "NC" else f"{layout} logits with the labels' positions {tuple(y.shape)}"
    raise RuleError(f"{type(rule).__name__}.train_step() returned {got}; expected StepResult(loss, logits) "
                    f"(trainer.rules.StepResult): the batch's mean loss as a 0-d tensor and its {want}, both detached")


def _checks_arguments(init):  # noqa: ANN001, ANN202 (a decorator of every rule's __init__)
    """``__init__`` that checks ``model``, ``options`` and ``ctx`` (``trainer.rules.checks``) before
    the rule's own code reads them (a subclass may read its options before calling its parent's),
    handing it the options as its ``Options`` dataclass (a dict of keys is built into one). A
    chain of __init__ calls through the class hierarchy is checked once, by the outermost."""
    @functools.wraps(init)
    def checked(self: Rule, model: nn.Module, options: object, ctx: RuleContext, *args: object,
                **kwargs: object) -> None:
        if "_arguments_checked" not in self.__dict__:
            options = rule_arguments(type(self), model, options, ctx)
            self.__dict__["_arguments_checked"] = True
        init(self, model, options, ctx, *args, **kwargs)

    checked.checks_arguments = True
    return checked


class Rule(nn.Module, abc.ABC):
    """Base class of learning rules. Subclasses set ``name`` and ``Options`` (a dataclass).

    The rule is an nn.Module so that its own state (fixed feedback matrices as buffers, learned
    error matrices as parameters) moves with ``.to()`` and is saved by ``state_dict()``. The model
    is held without registering it, so the rule's state never duplicates the model's; ``train()``
    and ``eval()`` set the model's mode too. So ``rule.parameters()`` is the rule's own alone
    (often none): an optimizer of your own is built from ``rule.trainable_parameters()``.

    The constructor checks ``model``, ``options`` and ``ctx`` before a subclass's code reads them,
    and ``train_step`` its batch and optimizer (``trainer.rules.checks``).
    ``train_step`` raises ``TrainingDiverged`` on a diverged loss (one host sync a step); set
    ``check_divergence = False`` to go on regardless (the trainer's loop does, and decides itself).
    ``preparable`` says whether ``prepare()`` can express the rule's update through autograd; a
    rule that cannot sets it to the reason. ``per_position`` likewise says whether it trains
    per-position logits (``RuleContext.output_layout`` other than "NC"), or why not.
    ``pipelining`` says how ``train.pipeline_stages`` runs it: ``"local"`` (every stage runs the
    rule's own step engine on its units, ``UnitRule.run_units``), ``"torch"`` (end to end, through
    ``torch.distributed.pipelining``), or the reason it cannot be pipelined.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    notes: tuple[str, ...] = ()  # what the rule decided for the user (e.g. where it cut the model), printed
    preparable: ClassVar[bool | str] = True
    per_position: ClassVar[bool | str] = True
    pipelining: ClassVar[str] = ("it declares no pipeline schedule (a UnitRule subclass runs its own step engine "
                                 "on each stage; set pipelining = \"torch\" for an end-to-end backprop variant)")
    check_divergence: bool = True
    sized_by_input: ClassVar[bool] = False  # its state is sized by ctx.input_shape: every batch must have it

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("train_step")
        if step is not None and not getattr(step, "__isabstractmethod__", False) \
                and not getattr(step, "checks_divergence", False):
            cls.train_step = _checks_divergence(step)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "checks_arguments", False):
            cls.__init__ = _checks_arguments(init)

    @_checks_arguments
    def __init__(self, model: nn.Module, options: object, ctx: RuleContext):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: see the class docstring
        self.options, self.ctx = options, ctx
        if ctx.output_layout != "NC" and self.per_position is not True:
            raise RuleError(f"rule {self.name!r} cannot train per-position logits (RuleContext.output_layout = "
                            f"{ctx.output_layout!r}): {self.per_position}; use a rule that can (dfa, bdfa, sdfa, "
                            "shallow, bp, trace_bp, fa, usf, brsf, frsf, kp), or one (N, C) row of logits per sample")
        self.criterion = ctx.criterion()
        self._in_step, self.steps_taken = False, 0
        # the steps waiting for the loss (``step``): each optimizer with the gradients it had then
        self._held: list[tuple[torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]] | None]] | None = None
        # what trainer.rules.checks has seen work: a sample shape (by a dry forward), an optimizer
        self.checked_input_shape: tuple[int, ...] | None = None
        self.checked_optimizer: torch.optim.Optimizer | None = None

    @abc.abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        """Turn one batch into parameter updates (including the optimizer step)."""

    def forward(self, x: State) -> torch.Tensor:
        """Logits for evaluation (``x``: a batch, or the tuple of a forward's several inputs)."""
        return call_model(self.model, x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer of your own must hold, each once: the model's trainable parameters and
        the rule's own learned ones (LRA's error maps, Kolen–Pollack's B). ``rule.parameters()``
        is the rule's own alone (the model is not a submodule), so an optimizer built from it
        would train no model parameter."""
        return list({id(p): p for p in (*self.model.parameters(), *self.parameters()) if p.requires_grad}.values())

    def describe(self) -> str:
        """What the rule trains and holds, for a reader: the rule, the logits' layout, then
        ``describe_lines`` (a local rule: each unit, where its cut landed and its matrices)."""
        own = self.state_nbytes()
        head = (f"rule {self.name!r} ({type(self).__name__}) on {type(self.model).__name__}, output layout "
                f"{self.ctx.output_layout}, {sum(p.numel() for p in self.trainable_parameters()):,} trainable "
                f"parameters, rule state {byte_text(own)}")
        return "\n".join([head, *(f"  {line}" for line in self.describe_lines())])

    def describe_lines(self) -> list[str]:
        """The lines ``describe`` lists under its head (default: backprop end to end)."""
        return ["end to end: the loss's gradient reaches every parameter through the model's backward"]

    def __repr__(self) -> str:
        return self.describe()

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
        ``after_backward`` queued to run when their backward ends (if their gradient is finite)."""
        from trainer.rules.prepared import after_backward_of  # noqa: PLC0415

        with self.autocast():
            logits = call_model(self.model, x)
        return after_backward_of(logits, lambda: self.prepared_after_backward(x, y),
                                 lambda error: self._check_backward(x, [error], self.steps_taken))

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

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the gradients now in ``.grad`` and clear them (``apply_step``). Inside a
        ``train_step`` checked for divergence the step waits until the batch's loss is known to be
        sound: its gradients are set aside (``.grad`` None, as after a step) and the steps land
        afterwards one by one, in order, each with its own gradients, so the update is the same
        (no unit reads another's parameters after its step) and a diverged step changes nothing.
        A forward-only rule then holds every unit's gradients until its top unit's loss is known.
        An optimizer stand-in without ``param_groups`` keeps its gradients in place meanwhile."""
        if self._held is None:
            apply_step(optimizer)
            return
        groups = getattr(optimizer, "param_groups", None)
        grads = None if groups is None else [(p, p.grad) for g in groups for p in g["params"] if p.grad is not None]
        for p, _ in grads or ():
            p.grad = None
        self._held.append((optimizer, grads))

    def _divergence_error(self, why: str, x: torch.Tensor, step: int) -> TrainingDiverged:
        """The error of a diverged step (``why``), before its update, naming the likely cause it can
        see: the batch (``input_cause``: empty, non-finite or huge), weights that were non-finite
        before the step (damaged ones at the first step; an earlier update's overflow later), else
        the learning rate."""
        cause = input_cause(float(input_peak(x)), batch_length(x))
        if cause is None:
            tensors = [*self.model.named_parameters(), *self.named_parameters(prefix="rule"),
                       *self.named_buffers(prefix="rule")]
            bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad and step == 1:
                cause = (f"{len(bad)} parameter tensor(s) were non-finite before the first step (e.g. {bad[0]!r}): "
                         "the weights it was given are damaged (a corrupted checkpoint or state_dict?); load sound "
                         "ones")
            elif bad:
                cause = (f"lower the learning rate: an earlier update left {len(bad)} parameter tensor(s) non-finite "
                         f"(e.g. {bad[0]!r}; or weights loaded since then are damaged)")
        fix = cause or "lower the learning rate (a rate tuned for another rule often diverges)"
        return TrainingDiverged(f"rule {self.name!r}: {why} at step {step}; {fix}, or set rule.check_divergence = "
                                "False to go on (this step was not applied)", cause)

    def _logits_divergence(self, logits: torch.Tensor, y: torch.Tensor | None) -> str | None:
        """Why a ``prepare()``'d training forward's logits show divergence (one host sync): the loss
        of the labels when given, as ``train_step`` checks it, else their spread
        (``trainer.errors.logit_divergence``)."""
        logits = logits.detach().float()
        if y is not None:
            return divergence(float(self.criterion(logits, y)), self.ctx.num_classes)
        dim = positions.class_dim(self.ctx.output_layout)
        spread = float((logits.amax(dim) - logits.amin(dim)).amax()) if logits.numel() else math.nan
        return logit_divergence(spread, self.ctx.num_classes)

    def _check_backward(self, x: torch.Tensor, tensors: Sequence[torch.Tensor | None], step: int) -> None:
        """In a ``prepare()``'d backward, before any gradient reaches a parameter: raise
        ``TrainingDiverged`` when ``e = ∂loss/∂logits`` or the signals formed from it are not
        finite (one host sync), unless ``check_divergence`` is off."""
        present = [t for t in tensors if t is not None]
        if not (self.check_divergence and present):
            return
        if not bool(torch.stack([torch.isfinite(t).all() for t in present]).all()):
            raise self._divergence_error("the loss gradient at the logits, or the signals formed from it, became "
                                         "non-finite", x, step)


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

    x: State  # the input of unit ``first``: the batch (a tuple for a forward's several inputs), or h of the unit below
    y: torch.Tensor | None  # None: a prepare()'d forward given no labels
    outputs: list[State]  # each unit's output, with its graph
    error: torch.Tensor  # e = ∂loss/∂logits of the top unit (a mean: softmax − one-hot over N, or the positions)
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
            raise RuleError(f"{where} returned {_describe(signals)}; expected a list of {len(points)}, one tensor (or "
                            f"None: no backward) per unit of the batch, for units {names}")
        for name, index, point, signal in zip(names, indices, points, signals):
            if signal is not None and not (isinstance(signal, torch.Tensor) and signal.shape == point.shape):
                raise RuleError(f"{where} returned {_describe(signal)} for unit {name!r} (index {index}); expected a "
                                f"{tuple(point.shape)} tensor (or None), the shape of its signal point "
                                f"(signal_point({index}, output))")
        return list(signals)

    def prepared_forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``prepare()``'s training forward: the units as in ``train_step``, their signals injected
        by the backward of the logits (``trainer.rules.prepared``)."""
        from trainer.rules.prepared import inject_signals  # noqa: PLC0415

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
