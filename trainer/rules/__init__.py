"""The learning rules, by the name a recipe's ``[rule] name`` uses."""

from __future__ import annotations

from torch import nn

from trainer.rules.base import ParamOptions, Rule, RuleContext, RuleError, StepResult, UnitRule
from trainer.rules.bp import Backprop
from trainer.rules.dfa import DFA, BinaryDFA, SignDFA
from trainer.rules.lra import LocalRepresentationAlignment, RecursiveLRA
from trainer.rules.shallow import Shallow
from trainer.rules.target_projection import TargetProjection, TargetProjectionSGD
from trainer.rules.trace_bp import TraceBackprop
from trainer.rules.weight_transport import (
    BatchRandomSignSymmetry,
    FeedbackAlignment,
    FixedRandomSignSymmetry,
    KolenPollack,
    UniformSignSymmetry,
)

RULES: dict[str, type[Rule]] = {rule.name: rule for rule in (
    Backprop, DFA, BinaryDFA, SignDFA, TargetProjection, TargetProjectionSGD, LocalRepresentationAlignment,
    RecursiveLRA, TraceBackprop, Shallow, FeedbackAlignment, UniformSignSymmetry, BatchRandomSignSymmetry,
    FixedRandomSignSymmetry, KolenPollack,
)}


def rule_options_class(name: str) -> type:
    """The options dataclass of rule ``name``; KeyError with the known names otherwise."""
    if name not in RULES:
        raise KeyError(f"unknown rule {name!r}; rules: {', '.join(sorted(RULES))}")
    return RULES[name].Options


def build_rule(name: str, options: object, model: nn.Module, ctx: RuleContext) -> Rule:
    """Rule ``name`` with its validated options, training ``model``."""
    rule_options_class(name)
    return RULES[name](model, options, ctx).to(ctx.device)


__all__ = ["RULES", "ParamOptions", "Rule", "RuleContext", "RuleError", "StepResult", "UnitRule", "build_rule", "rule_options_class"]
