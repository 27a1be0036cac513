"""The library checks its arguments as the CLI does: ``build_rule``, a rule's constructor,
``RuleContext``, the options classes, ``train_step`` and ``prepare()``'s forward raise a
TypeError/ValueError (RuleError is one) naming the argument and the fix, before anything changes,
for wrong types, impossible values and mismatches; ``convert_to_feedback`` refuses to convert a
model again to another feedback. The last test gives generated arguments (hypothesis) to all of them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kernels import convert_to_feedback
from trainer.config import build_section
from trainer.rules import RULES, RuleContext, RuleError, build_rule, rule_options_class
from trainer.rules.dfa import DFAOptions
from trainer.rules.weight_transport import StoredFeedbackOptions

CLASSES, FEATURES = 4, 12


def mlp(classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU()),
                         nn.Linear(16, classes))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, CLASSES)))


def context(**fields: object) -> RuleContext:
    return RuleContext(**{"num_classes": CLASSES, "input_shape": (FEATURES,), **fields})


def batch(n: int = 8, shape: tuple[int, ...] = (FEATURES,)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a step could change: parameters and buffers (BatchNorm's running statistics)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items()), "the refused step changed the model"


# --- the model, the context and the options at build time --------------------------------------


@pytest.mark.parametrize("name", ["dfa", "bp", "kp"])
def test_a_model_that_is_no_module_is_refused_naming_it(name):
    for bad in (None, [nn.Linear(FEATURES, CLASSES)]):
        with pytest.raises(TypeError, match=rf"rule '{name}': model must be an nn.Module, got {type(bad).__name__}"):
            build_rule(name, rule_options_class(name)(), bad, context())


def test_a_model_on_another_device_than_the_context_is_refused():
    for name in ("bp", "dfa"):
        with pytest.raises(ValueError, match=r"model's parameters are on meta but RuleContext.device is cpu: move the "
                                             r"model with model.to\('cpu'\)"):
            build_rule(name, rule_options_class(name)(), mlp().to("meta"), context())


@pytest.mark.parametrize("ctx", [None, {"num_classes": CLASSES, "input_shape": (FEATURES,)}])
def test_a_context_that_is_no_rule_context_is_refused_naming_it(ctx):
    for name in ("dfa", "bp"):
        with pytest.raises(TypeError, match=rf"rule '{name}': ctx must be a trainer.rules.RuleContext, got "
                                            rf"{type(ctx).__name__}; make one with RuleContext\("):
            build_rule(name, rule_options_class(name)(), mlp(), ctx)


@pytest.mark.parametrize("name, options, given", [
    ("lra", DFAOptions(), "DFAOptions"),  # today: AttributeError ... 'error_update'
    ("dfa", StoredFeedbackOptions(), "StoredFeedbackOptions"),  # today: AttributeError ... 'granularity'
    ("fa", DFAOptions(), "DFAOptions"),  # today: AttributeError ... 'keep_exact'
    ("bdfa", DFAOptions(), "DFAOptions"),  # a parent class's options: bdfa's own keys would be missing
])
def test_options_of_another_rule_are_refused_naming_the_class_wanted(name, options, given):
    wanted = rule_options_class(name)
    with pytest.raises(TypeError, match=rf"rule '{name}': options must be a {wanted.__module__}.{wanted.__qualname__}, "
                                        rf"got a {given}: make them with {wanted.__qualname__}\(\.\.\.\)"):
        build_rule(name, options, mlp(), context())


@pytest.mark.parametrize("name", ["dfa", "bp", "fa"])
def test_missing_options_are_refused_with_the_defaults_named(name):
    wanted = rule_options_class(name).__qualname__
    with pytest.raises(TypeError, match=rf"options must be .*{wanted}, got None: .*\({wanted}\(\) for the defaults\)"):
        build_rule(name, None, mlp(), context())


def test_a_dict_of_options_is_built_through_the_recipe_checks():
    # fa reads its options before its parent's constructor runs: it gets the dataclass too
    for name, keys in (("dfa", {"feedback_scale": 2, "granularity": "layer"}), ("fa", {"feedback_init": "default"})):
        rule = build_rule(name, keys, mlp(), context())
        assert rule.options == build_section(rule_options_class(name), keys, "test")
    with pytest.raises(ValueError, match=r"rule 'dfa': DFAOptions feedback_scale: expected a number or one of 'auto', got 'x'"):
        build_rule("dfa", {"feedback_scale": "x"}, mlp(), context())
    with pytest.raises(ValueError, match=r"rule 'dfa': DFAOptions: unknown key 'scale'; allowed keys: granularity"):
        build_rule("dfa", {"scale": 2.0}, mlp(), context())


@pytest.mark.parametrize("name, key, value", [
    ("dfa", "feedback_scale", -1.0),  # today accepted
    ("dfa", "feedback_scale", "x"),  # today: TypeError unsupported operand type(s) for /
    ("dfa", "granularity", "rows"),
    ("dfa", "bp_units", "stem"),  # a string where a list of names belongs
    ("drtp", "target_storage", "packed"),  # packed holds binary matrices only
    ("lra", "beta", 0.0),
    ("rec_lra", "error_skip_every", -1),
    ("kp", "kp_decay", -0.5),
    ("trace_bp", "probes", 0),
    ("fa", "align_every", 1.5),
])
def test_option_values_are_checked_as_the_recipe_reader_checks_them(name, key, value):
    """One validation path: the API's message is the recipe reader's, under another prefix."""
    cls = rule_options_class(name)
    with pytest.raises(ValueError) as recipe:
        build_section(cls, {key: value}, "<where>")
    with pytest.raises(ValueError) as api:
        build_rule(name, cls(**{key: value}), cnn() if name == "trace_bp" else mlp(), context(
            input_shape=(1, 6, 6) if name == "trace_bp" else (FEATURES,)))
    assert str(api.value).removeprefix(f"rule {name!r}: {cls.__name__}") == str(recipe.value).removeprefix("<where>")
    assert key in str(api.value)


def test_build_rule_refuses_a_rule_name_that_is_no_string_or_no_rule():
    with pytest.raises(TypeError, match=r"rule name must be a string such as 'dfa' .* got NoneType None"):
        build_rule(None, DFAOptions(), mlp(), context())
    with pytest.raises(ValueError, match=r"unknown rule 'dfa2'; rules: bdfa, bp, brsf"):
        build_rule("dfa2", DFAOptions(), mlp(), context())
    with pytest.raises(KeyError):  # what the recipe reader catches
        rule_options_class("dfa2")


@pytest.mark.parametrize("fields, error, message", [
    ({"num_classes": 0}, ValueError, r"num_classes must be the number of classes .* from 1 to 1048576, got 0"),
    ({"num_classes": -3}, ValueError, r"num_classes must be .* got -3"),
    ({"num_classes": 2.5}, TypeError, r"num_classes must be an int .* got float 2.5"),
    ({"input_shape": 12}, TypeError, r"input_shape must be a tuple of ints, .* got int 12; for a flat input write \(12,\)"),
    ({"input_shape": (-12,)}, ValueError, r"input_shape must hold sizes >= 1, .* got \(-12,\)"),
    ({"input_shape": (1, 2.5)}, ValueError, r"input_shape must hold sizes >= 1"),
    ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\)"),
    ({"seed": 2**40}, ValueError, r"seed must be below 2\*\*32"),
    ({"device": "gpu0"}, ValueError, r"device 'gpu0' is no device name; use 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "meta"}, ValueError, r"device 'meta' holds shapes without values"),
    ({"compile": "yes"}, TypeError, r"compile must be True or False, got 'yes'"),
])
def test_rule_context_fields_are_checked_when_it_is_made(fields, error, message):
    with pytest.raises(error, match=rf"^RuleContext: {message}"):
        context(**fields)


def test_rule_context_takes_a_list_shape_and_a_device_name():
    ctx = context(input_shape=[1, 6, 6], device="cpu")
    assert ctx.input_shape == (1, 6, 6) and ctx.device == torch.device("cpu")


# --- mismatches: class count, input shape --------------------------------------------------------


def test_a_class_count_other_than_the_logits_is_refused_at_build_by_a_local_rule():
    with pytest.raises(RuleError, match=r"rule 'dfa': the model returns a \(2, 4\) tensor for inputs of "
                                        r"RuleContext.input_shape = \(12,\), but RuleContext.num_classes = 5 needs "
                                        r"\(N, 5\) logits: make the context with num_classes=4"):
        build_rule("dfa", DFAOptions(), mlp(), context(num_classes=5))


@pytest.mark.parametrize("name", ["bp", "fa"])
def test_a_class_count_other_than_the_logits_is_refused_at_the_first_step_before_it_changes_anything(name):
    model = mlp(classes=10)
    rule = build_rule(name, rule_options_class(name)(), model, context(num_classes=5, input_shape=()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = state(model)
    with pytest.raises(RuleError, match=rf"rule '{name}': the model returns a \(2, 10\) tensor for the batch x of "
                                        r"shape \(8, 12\), but RuleContext.num_classes = 5 needs \(N, 5\) logits"):
        rule.train_step(*batch(), optimizer)
    assert_unchanged(model, before)
    assert rule.steps_taken == 0 and not optimizer.state


def test_an_input_shape_the_model_cannot_take_is_refused_at_build():
    with pytest.raises(ValueError, match=r"rule 'dfa': the model fails on inputs of RuleContext.input_shape = \(13,\) "
                                         r"\(RuntimeError: mat1 and mat2 shapes cannot be multiplied .*\); set "
                                         r"input_shape to the shape of one sample"):
        build_rule("dfa", DFAOptions(), mlp(), context(input_shape=(13,)))


def test_a_batch_of_another_shape_than_a_local_rule_was_built_for_is_refused_before_the_step():
    model = mlp()
    rule = build_rule("dfa", DFAOptions(), model, context())
    before = state(model)
    with pytest.raises(ValueError, match=r"rule 'dfa': x has shape \(8, 13\), but the rule was built for samples of "
                                         r"RuleContext.input_shape = \(12,\): pass batches of shape \(N, 12\)"):
        rule.train_step(*batch(shape=(13,)), torch.optim.SGD(model.parameters(), lr=0.1))
    assert_unchanged(model, before)


def test_a_batch_the_end_to_end_model_cannot_take_is_refused_naming_x():
    model = mlp()
    rule = build_rule("bp", rule_options_class("bp")(), model, context(input_shape=()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = state(model)
    with pytest.raises(ValueError, match=r"rule 'bp': the model fails on the batch x of shape \(8, 13\) \(RuntimeError"):
        rule.train_step(*batch(shape=(13,)), optimizer)
    assert_unchanged(model, before)
    rule.train_step(*batch(), optimizer)  # the shape it takes trains


@pytest.mark.parametrize("y, error, message", [
    (torch.rand(8), TypeError, r"y must hold class indices, an int64 tensor of shape \(N,\) \(y.long\(\)\), got "
                               r"torch.float32 of shape \(8,\)"),
    (torch.zeros(8, 1, dtype=torch.int64), TypeError, r"y must hold class indices, .* got torch.int64 of shape \(8, 1\)"),
    (torch.zeros(3, dtype=torch.int64), ValueError, r"y holds 3 labels but x 8 samples"),
    ([0] * 8, TypeError, r"y must be a torch.Tensor of class indices \(N,\), got list"),
])
def test_labels_are_checked_before_the_step(y, error, message):
    model = mlp()
    rule = build_rule("dfa", DFAOptions(), model, context())
    before = state(model)
    with pytest.raises(error, match=rf"rule 'dfa': {message}"):
        rule.train_step(batch()[0], y, torch.optim.SGD(model.parameters(), lr=0.1))
    assert_unchanged(model, before)


def test_inputs_that_are_no_tensor_are_refused_naming_x():
    model = mlp()
    rule = build_rule("dfa", DFAOptions(), model, context())
    with pytest.raises(TypeError, match=r"rule 'dfa': x must be a torch.Tensor batch of inputs \(N, \*input_shape\), "
                                        r"got list"):
        rule.train_step(batch()[0].tolist(), batch()[1], torch.optim.SGD(model.parameters(), lr=0.1))


def test_the_prepared_forward_checks_its_batch():
    model = mlp()
    net = build_rule("dfa", DFAOptions(), model, context()).prepare()
    net.train()
    with pytest.raises(ValueError, match=r"rule 'dfa': x has shape \(8, 13\), but the rule was built for samples"):
        net(batch(shape=(13,))[0])
    with pytest.raises(TypeError, match=r"rule 'dfa': y must hold class indices"):
        net(batch()[0], torch.rand(8))
    net(batch()[0])  # labels are optional there


# --- the optimizer ---------------------------------------------------------------------------------


NAMES = sorted(RULES)


@pytest.mark.parametrize("name", NAMES)
def test_an_optimizer_holding_none_of_the_models_parameters_is_refused_for_every_rule(name):
    conv = name == "trace_bp"
    model = cnn() if conv else mlp()
    shape = (1, 6, 6) if conv else (FEATURES,)
    rule = build_rule(name, rule_options_class(name)(), model, context(input_shape=shape))
    before = state(model)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(RuleError, match=rf"rule '{name}': the optimizer holds none of the model's \d+ trainable "
                                        r"parameters, so the steps would change nothing: build it from "
                                        r"rule.trainable_parameters\(\)"):
        rule.train_step(*batch(shape=shape), other)
    assert_unchanged(model, before)
    first, *rest = model.parameters()  # an optimizer holding only some of them is fine: the rest stay as they are
    kept = first.detach().clone()
    rule.train_step(*batch(shape=shape), torch.optim.SGD([*rest, *rule.parameters()], lr=0.1))
    assert torch.equal(first, kept)


def test_an_optimizer_that_is_no_optimizer_is_refused_naming_it():
    model = mlp()
    rule = build_rule("dfa", DFAOptions(), model, context())
    with pytest.raises(TypeError, match=r"rule 'dfa': optimizer must be a torch.optim.Optimizer .* got NoneType"):
        rule.train_step(*batch(), None)


def test_a_model_without_trainable_parameters_is_refused_at_the_step():
    model = mlp().requires_grad_(False)
    rule = build_rule("bp", rule_options_class("bp")(), model, context())
    with pytest.raises(RuleError, match=r"rule 'bp': the model has no trainable parameters .* a step would change "
                                        r"nothing"):
        rule.train_step(*batch(), torch.optim.SGD(model.parameters(), lr=0.1))


# --- converting a converted model --------------------------------------------------------------------


def test_convert_to_feedback_refuses_another_mode_on_a_converted_model():
    model = convert_to_feedback(mlp(), "fa")
    b = model[1].feedback_weight.clone()
    assert convert_to_feedback(model, "fa") is model and torch.equal(model[1].feedback_weight, b)  # the same: as it is
    with pytest.raises(ValueError, match=r"convert_to_feedback: 0.1 is already a feedback layer of mode 'fa'; "
                                         r"converting it again cannot change its mode 'fa' to 'kp': convert the "
                                         r"plain model instead"):
        convert_to_feedback(model, "kp")
    with pytest.raises(ValueError, match=r"cannot change its init 'default' to 'xavier', seed"):
        convert_to_feedback(model, "fa", init="xavier", seed=3)
    assert model[1].mode == "fa"


def test_a_weight_transport_rule_on_a_model_another_one_converted_is_refused():
    model = mlp()
    build_rule("fa", StoredFeedbackOptions(), model, context())
    with pytest.raises(RuleError, match=r"already a feedback layer of mode 'fa'; .* mode 'fa' to 'kp'"):
        build_rule("kp", rule_options_class("kp")(), model, context())


# --- generated arguments -------------------------------------------------------------------------------

MODELS = {  # name: (make it, the sample shape it takes)
    "mlp": (mlp, (FEATURES,)), "mlp, 10 logits": (lambda: mlp(classes=10), (FEATURES,)), "cnn": (cnn, (1, 6, 6)),
    "one layer": (lambda: nn.Linear(FEATURES, CLASSES), (FEATURES,)),
    "frozen": (lambda: mlp().requires_grad_(False), (FEATURES,)), "no parameters": (nn.Flatten, (CLASSES,)),
    "meta": (lambda: mlp().to("meta"), (FEATURES,)), "None": (lambda: None, (FEATURES,)),
    "a list of layers": (lambda: [nn.Linear(FEATURES, CLASSES)], (FEATURES,)), "a string": (lambda: "mlp", (FEATURES,)),
}
JUNK = st.one_of(st.none(), st.text(max_size=6), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                 st.booleans(), st.lists(st.integers(-2, 2), max_size=3), st.just({"a": 1}))


def mostly(draw, good: st.SearchStrategy, bad: st.SearchStrategy) -> object:
    """A value of ``good``, or one in ten times of ``bad``: about a third of the calls get far enough
    to train, the rest mix one or more wrong arguments."""
    return draw(bad) if draw(st.integers(0, 9)) == 5 else draw(good)  # not 0: hypothesis favours the ends


@st.composite
def options_for(draw, name: object) -> object:
    """Options for rule ``name``: its own (default, or with junk in one field), another rule's, a
    dict of its keys (valid or junk values, or an unknown key), or junk."""
    cls = RULES[name].Options if isinstance(name, str) and name in RULES else DFAOptions
    fields = [f.name for f in dataclasses.fields(cls)]
    kind = mostly(draw, st.sampled_from(["default", "dict"]), st.sampled_from(["field", "other", "junk"]))
    if kind == "default" or (kind in ("field", "dict") and not fields):
        return cls()
    if kind == "field":
        return dataclasses.replace(cls(), **{draw(st.sampled_from(fields)): draw(JUNK)})
    if kind == "other":
        return RULES[draw(st.sampled_from(NAMES))].Options()
    if kind == "dict":
        keys = draw(st.lists(st.sampled_from(fields), max_size=3, unique=True))
        defaults = dataclasses.asdict(cls())
        return {key: mostly(draw, st.just(defaults[key]), JUNK) for key in keys} | mostly(
            draw, st.just({}), st.just({"unknown_key": 1}))
    return draw(JUNK)


@st.composite
def api_calls(draw) -> dict[str, object]:
    """One call of each: RuleContext's fields, build_rule's arguments, train_step's batch and optimizer."""
    name = mostly(draw, st.sampled_from(NAMES), st.one_of(st.sampled_from(["dfa2", "python:nomodule:Rule", ""]), JUNK))
    model = mostly(draw, st.sampled_from(["mlp", "mlp", "cnn"]), st.sampled_from(sorted(MODELS)))
    shape = MODELS[model][1]
    fields = {
        "num_classes": mostly(draw, st.sampled_from([CLASSES, CLASSES, 10]), st.one_of(st.integers(-2, 3), JUNK)),
        "input_shape": mostly(draw, st.sampled_from([shape, shape, ()]), st.one_of(
            st.sampled_from([(13,), (1, 6, 6)]), st.lists(st.integers(-2, 16), max_size=4), JUNK)),
        "device": mostly(draw, st.sampled_from(["cpu", torch.device("cpu")]), st.sampled_from(["cuda", "gpu", 0, "meta"])),
        "compile": mostly(draw, st.just(False), JUNK.filter(lambda v: v is not True)),  # True compiles: minutes
        "amp": mostly(draw, st.just(False), st.one_of(st.just(True), JUNK)),
        "label_smoothing": mostly(draw, st.floats(0.0, 0.5), st.one_of(st.floats(-1.0, 2.0), JUNK)),
        "seed": mostly(draw, st.integers(0, 2**31), st.one_of(st.integers(-2**40, 2**40), JUNK)),
    }
    return {"name": name, "options": draw(options_for(name)), "model": model, "fields": fields,
            "ctx": mostly(draw, st.just("context"), st.sampled_from(["dict", "junk"])),
            "x": mostly(draw, st.just(shape), st.sampled_from([(13,), (1, 6, 6), (FEATURES,), "list"])),
            "y": mostly(draw, st.just("labels"), st.sampled_from(["float", "short", "None"])),
            "optimizer": mostly(draw, st.just("model"), st.sampled_from(["other", "None"]))}


def call(case: dict[str, object]) -> None:
    """``case``'s calls in order: RuleContext, build_rule, then one train_step."""
    if case["ctx"] == "context":
        ctx = RuleContext(**case["fields"])
    else:
        ctx = case["fields"] if case["ctx"] == "dict" else 3
    model = MODELS[case["model"]][0]()
    rule = build_rule(case["name"], case["options"], model, ctx)
    rule.check_divergence = False
    x = torch.randn(4, *case["x"]) if case["x"] != "list" else [[0.0] * FEATURES] * 4
    y = {"labels": torch.randint(0, CLASSES, (4,)), "float": torch.rand(4), "short": torch.zeros(2, dtype=torch.int64),
         "None": None}[case["y"]]
    optimizer = {"model": lambda: torch.optim.SGD([*model.parameters(), *rule.parameters()], lr=0.01),
                 "other": lambda: torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.01), "None": lambda: None}
    rule.train_step(x, y, optimizer[case["optimizer"]]())


EXAMPLES = 400  # about 60 of them train a step; the rest are refused at RuleContext, build_rule or train_step


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=api_calls())
def test_generated_api_arguments_succeed_or_raise_a_type_or_value_error(case):
    """Every generated call succeeds or raises a one-line TypeError/ValueError: never an
    AttributeError, ZeroDivisionError, IndexError or RuntimeError from deep inside."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch paths: the arguments are the point, not speed
        try:
            call(case)
        except (TypeError, ValueError) as error:
            message = str(error)
            assert message and "\n" not in message, f"{case}: {message!r}"
