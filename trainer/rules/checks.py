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
from torch import nn

from kernels._modules import check_module
from trainer.config import MAX_CLASSES, SEED_LIMIT, SEED_RANGE, build_section, check_section
from trainer.units import evaluation_mode

if TYPE_CHECKING:
    from trainer.rules.base import Rule, RuleContext

T = TypeVar("T")


class RuleError(ValueError):
    """A rule cannot train this model with these options (a unit it cannot use, a bad option
    combination). The session adds the recipe's file and section to the message."""


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


def rule_arguments(rule: type[Rule], model: object, options: object, ctx: object) -> object:
    """The options ``rule`` is built with, once ``model``, ``options`` and ``ctx`` are checked: a dict
    of option keys becomes the rule's ``Options`` dataclass, checked as a recipe's ``[rule]`` is."""
    from trainer.rules.base import RuleContext  # noqa: PLC0415 (base imports this module)

    label = f"rule {_name(rule)!r}"
    check_module(label, "model", model)
    if not isinstance(ctx, RuleContext):
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


def check_logits(rule: str, out: object, num_classes: int, what: str) -> None:
    """The model's output for ``what`` must be (N, C) logits with C = ``ctx.num_classes``: a wider
    one trains extra classes towards nothing, a narrower one fails in the loss, and local rules
    size their feedback by C."""
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == num_classes:
        return
    if isinstance(out, torch.Tensor):
        got = f"a {tuple(out.shape)} tensor"
        fix = (f"make the context with num_classes={out.shape[1]}, or give the model's last layer {num_classes} "
               "outputs" if out.dim() == 2 else "return (N, C) logits from forward, flattened")
    else:
        got, fix = f"a {type(out).__name__}", "return the logits alone from forward, an (N, C) tensor"
    raise RuleError(f"rule {rule!r}: the model returns {got} for {what}, but RuleContext.num_classes = "
                    f"{num_classes} needs (N, {num_classes}) logits: {fix}")


def check_batch(rule: Rule, x: object, y: object, *, labels: bool = True) -> None:
    """A training batch: ``x`` a tensor of samples of the shape the rule was built for (an
    end-to-end rule checks a new sample shape by a dry forward, once), ``y`` class indices (N,) on
    its device; ``labels=False``: ``y`` may be None (``prepare()``'s forward)."""
    label = f"rule {rule.name!r}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{label}: x must be a torch.Tensor batch of inputs (N, *input_shape), got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{label}: x must be a batch (N, *input_shape), got a 0-d tensor")
    if not _same_device(x.device, rule.ctx.device):
        raise ValueError(f"{label}: x is on {x.device} but the rule trains on {rule.ctx.device} (RuleContext.device): "
                         f"move the batch with x.to({str(rule.ctx.device)!r})")
    if y is not None or labels:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{label}: y must be a torch.Tensor of class indices (N,), got {type(y).__name__}")
        if y.dim() != 1 or y.dtype != torch.int64:  # what the loss and the label projections index with
            raise TypeError(f"{label}: y must hold class indices, an int64 tensor of shape (N,) (y.long()), got "
                            f"{y.dtype} of shape {tuple(y.shape)}")
        if len(y) != len(x):
            raise ValueError(f"{label}: y holds {len(y)} labels but x {len(x)} samples; pass one label per sample")
        if y.device != x.device:
            raise ValueError(f"{label}: y is on {y.device} but x on {x.device}; move the labels with y.to(x.device)")
    shape = tuple(x.shape[1:])
    if shape == rule.checked_input_shape:
        return
    if rule.sized_by_input:
        raise ValueError(f"{label}: x has shape {tuple(x.shape)}, but the rule was built for samples of "
                         f"RuleContext.input_shape = {rule.ctx.input_shape}: pass batches of shape (N, "
                         f"{', '.join(map(str, rule.ctx.input_shape))}), or build the rule with input_shape={shape}")
    what = f"the batch x of shape {tuple(x.shape)}"
    model = rule.model
    sample = x[:2].detach()

    def forward() -> object:
        with evaluation_mode(model), torch.no_grad():
            return model.forward(sample)  # not a compiled model(...): no extra compile for one check

    out = dry_run(rule.name, forward, what, "pass batches of the shape the model takes")
    check_logits(rule.name, out, rule.ctx.num_classes, what)
    rule.checked_input_shape = shape


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
                        f"{type(optimizer).__name__}; build it from rule.model.parameters()")
    if optimizer is rule.checked_optimizer:
        return
    held = held_parameters(optimizer)
    trainable = [p for p in rule.model.parameters() if p.requires_grad]
    if not trainable:
        raise RuleError(f"{label}: the model has no trainable parameters (none requires grad): a step would change "
                        "nothing; unfreeze the layers to train with p.requires_grad_(True)")
    if held is not None and not any(id(p) in held for p in trainable):
        raise RuleError(f"{label}: the optimizer holds none of the model's {len(trainable)} trainable parameters, so "
                        "the steps would change nothing: build it from rule.model.parameters() (or "
                        "rule.prepare().parameters()), after the rule")
    rule.checked_optimizer = optimizer

