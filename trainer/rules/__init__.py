"""The learning rules, by the name a recipe's ``[rule] name`` uses: a built-in rule's, or
``python:package.module:ClassName`` for a ``Rule`` subclass of the user's (docs/rules.md, "Writing a
rule"), imported from the working directory or an installed package as ``python:`` models are."""

from __future__ import annotations

import dataclasses

from torch import nn

from trainer.config import ConfigError, import_module
from trainer.rules.base import ParamOptions, Rule, RuleContext, RuleError, StepResult, UnitBatch
from trainer.rules.unit_rule import UnitOptions, UnitRule
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


PYTHON_RULE = "python:package.module:ClassName"


class UnknownRule(KeyError, ValueError):
    """A rule name no rule has: a failed lookup (KeyError, as the recipe reader catches it) and a bad
    argument of ``build_rule`` (ValueError, as every argument the API refuses)."""

    __str__ = ValueError.__str__  # the message as written, not KeyError's repr of it


def rule_class(name: str) -> type[Rule]:
    """The class of rule ``name``. KeyError with the known names for an unknown built-in name;
    ConfigError naming ``[rule] name`` for a ``python:`` rule that does not import or is not a
    ``Rule`` subclass with an ``Options`` dataclass; TypeError for a name that is no string."""
    if not isinstance(name, str):
        raise TypeError(f"rule name must be a string such as 'dfa' (rules: {', '.join(sorted(RULES))}) or "
                        f"{PYTHON_RULE!r}, got {type(name).__name__} {name!r}")
    kind, _, target = name.partition(":")
    if kind != "python":
        if name not in RULES:
            raise UnknownRule(f"unknown rule {name!r}; rules: {', '.join(sorted(RULES))}, or {PYTHON_RULE!r} for "
                              "your own")
        return RULES[name]
    if target.count(":") != 1 or not all(target.split(":")):
        raise ConfigError(f"[rule] name: expected {PYTHON_RULE!r}, got {name!r}")
    module_name, class_name = target.split(":")
    module = import_module(module_name, "[rule] name")
    rules = [key for key, value in vars(module).items() if isinstance(value, type) and issubclass(value, Rule)
             and value.__module__ == module.__name__]
    found = getattr(module, class_name, None)
    listed = f"its rules: {', '.join(rules)}" if rules else "it defines no Rule subclass"
    if found is None:
        raise ConfigError(f"[rule] name: {module_name} has no {class_name!r} ({listed}); name the rule's class")
    if not (isinstance(found, type) and issubclass(found, Rule)):
        kind = f"the class {found.__qualname__}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise ConfigError(f"[rule] name: {module_name}:{class_name} is {kind}, not a subclass of trainer.rules.Rule "
                          f"({listed}); name the rule's class")
    if found.__abstractmethods__:
        raise ConfigError(f"[rule] name: {name} does not define {', '.join(sorted(found.__abstractmethods__))} "
                          "(a Rule subclass defines train_step; a UnitRule has its own)")
    if not isinstance(getattr(found, "name", None), str):
        raise ConfigError(f"[rule] name: {name} declares no name: set the class attribute name = \"...\" (its "
                          "messages and metrics call it that)")
    options = getattr(found, "Options", None)
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ConfigError(f"[rule] name: {name} has no Options dataclass (Options = {options!r}): declare the schema "
                          "of its [rule] keys as a @dataclass class attribute Options (UnitOptions for a UnitRule)")
    return found


def rule_options_class(name: str) -> type:
    """The options dataclass of rule ``name`` (see ``rule_class`` for what it raises)."""
    return rule_class(name).Options


def build_rule(name: str | type[Rule], options: object, model: nn.Module, ctx: RuleContext) -> Rule:
    """Rule ``name`` (or a rule class, e.g. a recipe's resolved ``rule.rule_class``) with its
    validated options (its ``Options`` dataclass, or a dict of its keys), training ``model``; the
    rule's constructor checks the arguments (``trainer.rules.checks``)."""
    cls = name if isinstance(name, type) and issubclass(name, Rule) else rule_class(name)
    return cls(model, options, ctx).to(ctx.device)


__all__ = ["RULES", "ParamOptions", "Rule", "RuleContext", "RuleError", "StepResult", "UnitBatch", "UnitOptions",
           "UnitRule", "build_rule", "rule_class", "rule_options_class"]
