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
import contextlib
import functools
import math
import inspect
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from trainer.errors import TrainingDiverged, divergence, input_cause, logit_divergence
from trainer.rules import positions
from trainer.rules.batch import (  # noqa: F401 (StepResult, UnitBatch and Transport re-exported: their home until 0.2.0)
    StepResult, Transport, UnitBatch, restore_statistics, saved_statistics,
)
from trainer.rules.checks import RuleError, check_batch, check_context, check_optimizer, rule_arguments
from trainer.rules.positions import OutputLayout
from trainer.rules.prepared import PreparedRule, after_backward_of
from trainer.units import State, batch_length, call_model, primary

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
        return f"RuleContext.example_input ({describe_value(self.example_input)})"


def _checks_divergence(train_step):  # a decorator of every rule's train_step
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
        statistics = saved_statistics(self.model) if guarded else []
        self._in_step, self._held = True, [] if guarded else None
        try:
            result = train_step(self, x, y, optimizer)
            _check_step_result(self, result, y)
            why = divergence(float(result.loss), self.ctx.num_classes) if guarded else None
            if why:
                restore_statistics(statistics)
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


def describe_value(value: object) -> str:
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
            got = f"a StepResult whose loss is {describe_value(loss)}"
        elif not (isinstance(logits, torch.Tensor) and logits.dim() == len(layout)
                  and positions.label_shape(logits.shape, layout) == tuple(y.shape)):
            got = f"a StepResult whose logits are {describe_value(logits)}"
        else:
            return
    else:
        got = describe_value(result)
    want = f"({len(y)}, C) logits" if layout == "NC" else f"{layout} logits with the labels' positions {tuple(y.shape)}"
    raise RuleError(f"{type(rule).__name__}.train_step() returned {got}; expected StepResult(loss, logits) "
                    f"(trainer.rules.StepResult): the batch's mean loss as a 0-d tensor and its {want}, both detached")


def _checks_arguments(init):  # a decorator of every rule's __init__
    """``__init__`` that checks ``model``, ``options`` and ``ctx`` (``trainer.rules.checks``) before
    the rule's own code reads them (a subclass may read its options before calling its parent's),
    handing it the options as its ``Options`` dataclass (a dict of keys is built into one). A
    chain of __init__ calls through the class hierarchy is checked once, by the outermost."""
    @functools.wraps(init)
    def checked(self: Rule, model: nn.Module, options: object, ctx: RuleContext, *args: object,
                **kwargs: object) -> None:
        if "_arguments_checked" not in self.__dict__:
            options = rule_arguments(type(self), model, options, ctx, RuleContext)
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
        """Wrap a subclass's ``train_step`` and ``__init__`` in the checks; refuse the hooks renamed
        into ``after_backward(batch)`` (one hook, one signature, for ``train_step`` and ``prepare()``),
        so that a rule written for the old names fails loudly instead of silently losing that work."""
        super().__init_subclass__(**kwargs)
        fix = ("is now after_backward(self, batch): one hook for train_step and prepare(), reading batch.x and "
               "batch.y; rename it")
        if "prepared_after_backward" in cls.__dict__:
            raise TypeError(f"{cls.__name__}.prepared_after_backward(x, y) {fix}")
        hook = cls.__dict__.get("after_backward")
        if callable(hook) and len(inspect.signature(hook).parameters) != 2:
            raise TypeError(f"{cls.__name__}.after_backward{inspect.signature(hook)} {fix}")
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
        if self.preparable is not True:
            raise RuleError(f"rule {self.name!r} cannot be prepared for loss.backward(): {self.preparable}; "
                            "call rule.train_step(x, y, optimizer) in your loop instead")
        return PreparedRule(self)

    def prepared_forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The training forward of ``prepare()``'d end-to-end rules: the model's logits, with
        ``after_backward`` queued to run when their backward ends (if their gradient is finite)."""
        with self.autocast():
            logits = call_model(self.model, x)
        return after_backward_of(logits, lambda: self.after_backward(UnitBatch(x, y, [logits.detach()], None, samples=len(logits))),
                                 lambda error: self._check_backward(x, [error], self.steps_taken))

    def after_backward(self, batch: UnitBatch) -> None:
        """Runs once a batch's backward has ended, before the optimizer step (``.grad`` holds the
        update), in ``train_step`` and in ``prepare()``'d training alike: norm-ball projections,
        alignment angles. Local rules: after the local backwards (on a pipeline stage once a batch,
        with its last micro-batch). End-to-end rules get ``batch.outputs = [logits]`` and no
        ``error``. Default: nothing."""

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


_MOVED = {"UnitOptions", "UnitRule", "Unit"}  # to trainer.rules.unit_rule (0.2.0's home: here)


def __getattr__(name: str) -> object:
    """``UnitRule``, ``UnitOptions`` and ``Unit`` from their old home, for one release: they moved to
    ``trainer.rules.unit_rule``, which imports this module (so this import waits for first use)."""
    if name in _MOVED:
        from trainer.rules import unit_rule  # noqa: PLC0415 (unit_rule imports this module)

        return getattr(unit_rule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
