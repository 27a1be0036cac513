"""What the rule API checks, so that a mistake in code is one TypeError or ValueError naming the
argument and the fix, as a mistake in a recipe is one line naming the key.

A rule's constructor (and so ``build_rule``) checks its ``model``, ``options`` and ``ctx`` before
the rule's own code reads them (``Rule``'s ``__init__`` wrapper); ``RuleContext`` checks its
fields when made; every ``train_step`` (its divergence wrapper) and the training forward of
``rule.prepare()`` check the batch, and ``train_step`` the optimizer. The checks the recipe path
already runs are not written twice: options go through ``trainer.config.check_section``, which
the recipe reader runs on ``[rule]``; the model through ``kernels``' ``check_module``; class
counts and seeds are bounded by the recipe's limits.

A wrong model output is caught by a dry forward (evaluation mode, no grad: nothing changes): a
local rule runs one at build time to size its matrices; an end-to-end rule runs one on the first
batch of each sample shape, before its step.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from kernels._modules import check_module
from trainer.config import MAX_CLASSES, SEED_LIMIT, SEED_RANGE, build_section, check_section
from trainer.errors import RuleError  # noqa: F401 (re-exported: its home until 0.2.0)
from trainer.rules.positions import IGNORE_INDEX, LAYOUTS, class_dim, label_text, layout_text
from trainer.units import batch_length, call_model, evaluation_mode, sample_shape

if TYPE_CHECKING:
    from trainer.rules.base import Rule, RuleContext

T = TypeVar("T")




def check_context(ctx: RuleContext) -> None:
    """``RuleContext``'s fields, bounded as the recipe keys they come from are (class count, seed);
    ``input_shape`` becomes a tuple and ``device`` a ``torch.device``."""
    where = "RuleContext"
    n = ctx.num_classes
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{where}: num_classes must be an int (the width of the model's logits), got "
                        f"{type(n).__name__} {n!r}")
    if not 1 <= n <= MAX_CLASSES:
        raise ValueError(f"{where}: num_classes must be the number of classes the model's logits score, "
                         f"from 1 to {MAX_CLASSES}, got {n}")
    ctx.num_classes = int(n)
    shape = ctx.input_shape
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        hint = f"; for a flat input write ({shape},)" if isinstance(shape, numbers.Integral) else ""
        raise TypeError(f"{where}: input_shape must be a tuple of ints, one sample's shape such as (1, 28, 28), "
                        f"got {type(shape).__name__} {shape!r}{hint}")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{where}: input_shape must hold sizes >= 1, one sample's shape such as (1, 28, 28) "
                         f"(without the batch), got {tuple(shape)!r}")
    ctx.input_shape = tuple(int(s) for s in shape)
    ctx.device = _device(where, ctx.device)
    for flag in ("compile", "amp"):
        if not isinstance(getattr(ctx, flag), bool):
            raise TypeError(f"{where}: {flag} must be True or False, got {getattr(ctx, flag)!r}")
    smoothing = ctx.label_smoothing
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
        raise TypeError(f"{where}: label_smoothing must be a number in [0, 1), got {type(smoothing).__name__} "
                        f"{smoothing!r}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1) (0: none), got {smoothing!r}")
    if isinstance(ctx.seed, bool) or not isinstance(ctx.seed, numbers.Integral):
        raise TypeError(f"{where}: seed must be an int, got {type(ctx.seed).__name__} {ctx.seed!r}")
    if abs(ctx.seed) >= SEED_LIMIT:
        raise ValueError(f"{where}: seed {SEED_RANGE}, got {ctx.seed}")
    if ctx.output_layout not in LAYOUTS:
        raise ValueError(f"{where}: output_layout must be one of {', '.join(map(repr, LAYOUTS))} (where the logits "
                         f"keep their classes: (N, C), (N, T, C), (T, N, C), (N, C, H, W)), got {ctx.output_layout!r}")
    _check_example_input(ctx)


def _check_example_input(ctx: RuleContext) -> None:
    """``example_input``: None, a tensor or a non-empty tuple (or list) of tensors, each a batch
    (at least one dimension). A single tensor sets ``input_shape`` when it is not given, and must
    agree with it when it is."""
    where, example = "RuleContext: example_input", ctx.example_input
    if example is None:
        return
    if isinstance(example, list):
        example = ctx.example_input = tuple(example)
    tensors = example if isinstance(example, tuple) else (example,)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        if isinstance(example, tuple):
            got = f"a tuple of {', '.join(type(t).__name__ for t in tensors)}" if tensors else "an empty tuple"
        else:
            got = f"{type(example).__name__} {example!r}"[:80]
        raise TypeError(f"{where} must be a batch the model takes: a tensor (e.g. int64 token ids of shape (N, T)) or "
                        f"a tuple of tensors (a forward's several inputs), got {got}")
    if any(t.dim() < 1 for t in tensors):
        raise ValueError(f"{where} must be a batch, with the batch's dimension first (or the sequence's, for "
                         "sequence-first models), got a 0-d tensor")
    if isinstance(example, torch.Tensor):
        shape = tuple(example.shape[1:])
        if ctx.input_shape and ctx.input_shape != shape:
            raise ValueError(f"{where} has samples of shape {shape} but input_shape = {ctx.input_shape}: leave "
                             "input_shape out (the example sets it), or make them agree")
        ctx.input_shape = shape


def _device(where: str, device: object) -> torch.device:
    """``device`` as a ``torch.device`` (a name such as "cuda:0" is taken), one this machine has."""
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"{where}: device must be a torch.device or a name such as 'cpu' or 'cuda:0', got "
                        f"{type(device).__name__} {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{where}: device {device!r} is no device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "meta":
        raise ValueError(f"{where}: device 'meta' holds shapes without values, which no rule can train; use 'cpu' "
                         "or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: device {str(device)!r}, but CUDA is not available here; use device='cpu'")
    return device


def _same_device(tensor_device: torch.device, device: torch.device) -> bool:
    """Whether a tensor on ``tensor_device`` lives on ``device`` ("cuda" means the current GPU)."""
    return tensor_device.type == device.type and (device.index is None or tensor_device.index == device.index)


def rule_arguments(rule: type[Rule], model: object, options: object, ctx: object,
                   context_type: type[RuleContext]) -> object:
    """The options ``rule`` is built with, once ``model``, ``options`` and ``ctx`` (a ``context_type``:
    ``RuleContext``, which base hands in, importing this module) are checked: a dict of option keys
    becomes the rule's ``Options`` dataclass, checked as a recipe's ``[rule]`` is."""
    label = f"rule {_name(rule)!r}"
    check_module(label, "model", model)
    if not isinstance(ctx, context_type):
        raise TypeError(f"{label}: ctx must be a trainer.rules.RuleContext, got {type(ctx).__name__}; make one "
                        "with RuleContext(num_classes=..., input_shape=(C, H, W))")
    away = sorted({str(p.device) for p in model.parameters() if not _same_device(p.device, ctx.device)})
    if away:
        raise ValueError(f"{label}: the model's parameters are on {', '.join(away)} but RuleContext.device is "
                         f"{ctx.device}: move the model with model.to({str(ctx.device)!r}), or make the context "
                         f"with device={away[0]!r}")
    return rule_options(rule, options)


def rule_options(rule: type[Rule], options: object) -> object:
    """``options`` checked against ``rule.Options`` by the recipe reader's own checks (types, then
    the class's ``validate()``); a mapping of its keys is built into one, as ``[rule]`` is."""
    cls, name = getattr(rule, "Options", None), _name(rule)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"rule {name!r}: {rule.__qualname__} has no Options dataclass (Options = {cls!r}): declare "
                        "its options as a @dataclass class attribute Options (UnitOptions for a UnitRule)")
    where = f"rule {name!r}: {cls.__name__}"
    if isinstance(options, Mapping):
        keys = [key for key in options if not isinstance(key, str)]
        if keys:
            raise TypeError(f"{where}: option names must be strings, got {keys[0]!r}")
        return build_section(cls, dict(options), where)
    if type(options) is not cls:
        got = "None" if options is None else f"a {type(options).__qualname__}"
        raise TypeError(f"rule {name!r}: options must be a {cls.__module__}.{cls.__qualname__}, got {got}: make "
                        f"them with {cls.__qualname__}(...) ({cls.__qualname__}() for the defaults), or pass a dict "
                        "of its keys")
    return check_section(options, where)


def _name(rule: type[Rule]) -> str:
    """What messages call ``rule``: its ``name``, or its class name where it declares none."""
    name = getattr(rule, "name", None)
    return name if isinstance(name, str) else rule.__qualname__


def dry_run(rule: str, run: Callable[[], T], what: str, fix: str) -> T:
    """``run()`` (a dry forward of the model), its failure one ValueError naming ``what`` the
    model was given and the ``fix``, with the model's own error (chained for its traceback)."""
    try:
        return run()
    except Exception as err:  # the user's model may raise anything on an input it cannot take
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"rule {rule!r}: the model fails on {what} ({type(err).__name__}: {reason}); {fix}") from err


def check_logits(rule: str, out: object, num_classes: int, what: str, layout: str = "NC") -> None:
    """The model's output for ``what`` must be logits of ``layout`` (``RuleContext.output_layout``:
    (N, C), or per position (N, T, C), (T, N, C), (N, C, H, W)) with C = ``ctx.num_classes``: a
    wider one trains extra classes towards nothing, a narrower one fails in the loss, and local
    rules size their feedback by C."""
    dim = class_dim(layout)
    if isinstance(out, torch.Tensor) and out.dim() == len(layout) and out.shape[dim] == num_classes:
        return
    if isinstance(out, torch.Tensor):
        got = f"a {tuple(out.shape)} tensor"
        if out.dim() == len(layout):
            fix = (f"make the context with num_classes={out.shape[dim]}, or give the model's last layer {num_classes} "
                   "outputs")
        elif layout == "NC":
            fix = ("return (N, C) logits from forward, flattened; or, for one distribution per position (tokens, "
                   "pixels), declare where the classes are: RuleContext(output_layout=\"NTC\", \"TNC\" or \"NCHW\")")
        else:
            fix = f"return {layout} logits from forward, or declare the layout they have (RuleContext.output_layout)"
    else:
        got, fix = f"a {type(out).__name__}", f"return the logits alone from forward, a {layout} tensor"
    raise RuleError(f"rule {rule!r}: the model returns {got} for {what}, but RuleContext.num_classes = "
                    f"{num_classes} needs {layout_text(layout, num_classes)} logits: {fix}")


def check_batch(rule: Rule, x: object, y: object, *, labels: bool = True) -> None:
    """A training batch: ``x`` a tensor of samples of the shape the rule was built for, or the
    tuple of a forward's several inputs (an end-to-end rule, and a local rule with per-position
    logits, check a new sample shape by a dry forward, once), ``y`` class indices of the positions'
    shape (``RuleContext.output_layout``: (N,), (N, T), (T, N) or (N, H, W)) with x's first
    dimension, on its device; ``labels=False``: ``y`` may be None (``prepare()``'s forward)."""
    label, layout = f"rule {rule.name!r}", rule.ctx.output_layout
    inputs = x if isinstance(x, tuple) else (x,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        got = f"a tuple of {', '.join(type(t).__name__ for t in inputs) or 'nothing'}" if isinstance(x, tuple) \
            else type(x).__name__
        raise TypeError(f"{label}: x must be a torch.Tensor batch of inputs (N, *input_shape), got {got} (a forward "
                        "of several inputs takes a tuple of tensors)")
    if any(t.dim() < 1 for t in inputs):
        raise ValueError(f"{label}: x must be a batch (N, *input_shape), got a 0-d tensor")
    away = next((t.device for t in inputs if not _same_device(t.device, rule.ctx.device)), None)
    if away is not None:
        raise ValueError(f"{label}: x is on {away} but the rule trains on {rule.ctx.device} (RuleContext.device): "
                         f"move the batch with x.to({str(rule.ctx.device)!r})")
    if y is not None or labels:
        positions = label_text(layout)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{label}: y must be a torch.Tensor of class indices {positions}, got {type(y).__name__}")
        if y.dim() != len(layout) - 1 or y.dtype != torch.int64:  # what the loss and the label projections index with
            per = "" if layout == "NC" else f" (output_layout = {layout!r}: one per position, {IGNORE_INDEX} for none)"
            raise TypeError(f"{label}: y must hold class indices, an int64 tensor of shape {positions}{per} "
                            f"(y.long()), got {y.dtype} of shape {tuple(y.shape)}")
        if len(y) != batch_length(x):
            n = batch_length(x)
            raise ValueError(f"{label}: y holds {len(y)} labels but x {n} samples; pass one label per sample"
                             if layout == "NC" else f"{label}: y's first dimension is {len(y)} but x's is {n}; pass "
                             f"labels of the positions' shape {positions}")
        if y.device != inputs[0].device:
            raise ValueError(f"{label}: y is on {y.device} but x on {inputs[0].device}; move the labels with "
                             "y.to(x.device)")
    shape = sample_shape(x)
    if shape == rule.checked_input_shape:
        return
    if rule.sized_by_input and layout == "NC":
        built = f"RuleContext.input_shape = {rule.ctx.input_shape}" if rule.ctx.example_input is None else \
            f"RuleContext.example_input's shape {rule.checked_input_shape}"
        fix = (f"pass batches of shape (N, {', '.join(map(str, rule.ctx.input_shape))}), or build the rule with "
               f"input_shape={shape}") if rule.ctx.example_input is None else \
            "pass batches of that shape, or build the rule with an example_input of this one"
        raise ValueError(f"{label}: x has shape {_shapes(x)}, but the rule was built for samples of {built}: {fix}")
    what = f"the batch x of shape {_shapes(x)}"
    model = rule.model
    # two samples are enough for one row per sample; per-position logits and several inputs (a
    # mask need not have the batch's first dimension) are checked on the whole batch
    sample = x[:2].detach() if isinstance(x, torch.Tensor) and layout == "NC" else \
        tuple(t.detach() for t in inputs) if isinstance(x, tuple) else x.detach()

    def forward() -> object:
        with evaluation_mode(model), torch.no_grad():
            return call_model(model.forward, sample)  # not a compiled model(...): no extra compile for one check

    out = dry_run(rule.name, forward, what, "pass batches of the shape the model takes")
    check_logits(rule.name, out, rule.ctx.num_classes, what, layout)
    rule.checked_input_shape = shape


def _shapes(x: torch.Tensor | tuple[torch.Tensor, ...]) -> str:
    """A batch's shape as messages write it (of each input, for several)."""
    return ", ".join(str(tuple(t.shape)) for t in x) if isinstance(x, tuple) else str(tuple(x.shape))


def held_parameters(optimizer: object) -> set[int] | None:
    """The ids of the parameters ``optimizer`` holds; None for a stand-in without ``param_groups``."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    return {id(p) for group in groups for p in group["params"]}


def check_optimizer(rule: Rule, optimizer: object) -> None:
    """The optimizer ``train_step`` steps: one, holding some of the model's trainable parameters
    (holding none, the step would change nothing while the losses look like training; some is
    fine: the rest stay frozen). Checked once per optimizer object."""
    label = f"rule {rule.name!r}"
    if not (callable(getattr(optimizer, "step", None)) and callable(getattr(optimizer, "zero_grad", None))):
        raise TypeError(f"{label}: optimizer must be a torch.optim.Optimizer (with step and zero_grad), got "
                        f"{type(optimizer).__name__}; build it from rule.trainable_parameters()")
    if optimizer is rule.checked_optimizer:
        return
    held = held_parameters(optimizer)
    trainable = [p for p in rule.model.parameters() if p.requires_grad]
    if not trainable:
        raise RuleError(f"{label}: the model has no trainable parameters (none requires grad): a step would change "
                        "nothing; unfreeze the layers to train with p.requires_grad_(True)")
    if held is not None and not any(id(p) in held for p in trainable):
        own = any(id(p) in held for p in rule.parameters())
        why = (" but only the rule's own (rule.parameters() is the rule's own alone: the model is no submodule of "
               "the rule), so only those would learn" if own else ", so the steps would change nothing")
        raise RuleError(f"{label}: the optimizer holds none of the model's {len(trainable)} trainable parameters{why}: "
                        "build it from rule.trainable_parameters() (the model's and the rule's own; or "
                        "rule.prepare().parameters()), after the rule")
    rule.checked_optimizer = optimizer

