"""DFA, hybrid DFA and binary DFA: signals and updates against hand-written equations, the hybrid
against backprop, storages against each other, the alignment angle, training and config errors."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from trainer.config import ConfigError
from trainer.recipes import load_recipe
from trainer.loop import train
from trainer.rules import RuleContext, RuleError, build_rule
from trainer.rules.base import UnitBatch
from trainer.rules.dfa import DFA, BinaryDFAOptions, DFAOptions

from conftest import write_recipe

C, IN = 5, 12


class GradientRecorder:
    """Stands in for an optimizer: keeps the gradients a rule hands to ``step()``."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.grads: list[torch.Tensor] = []

    def step(self) -> None:
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def three_unit_mlp(hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(IN, hidden), nn.ReLU()),
        nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()),
        nn.Linear(hidden, C),
    )


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 3, 4, generator=gen), torch.randint(0, C, (n,), generator=gen)


def make_rule(model: nn.Module, options: DFAOptions, **ctx) -> DFA:
    name = "bdfa" if isinstance(options, BinaryDFAOptions) else "dfa"
    return build_rule(name, options, model, RuleContext(num_classes=C, input_shape=(1, 3, 4), seed=7, **ctx))


def dfa_update(model: nn.Module, options: DFAOptions, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    recorder = GradientRecorder(model)
    make_rule(model, options).train_step(x, y, recorder)
    return recorder.grads


def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.softmax(1) - nn.functional.one_hot(y, C)) / len(y)


@pytest.mark.parametrize("options", [DFAOptions(), DFAOptions(feedback_init="uniform", feedback_scale=2.5),
                                     BinaryDFAOptions(feedback_storage="seeded")])
def test_updates_follow_the_dfa_equations(options):
    model, (x, y) = three_unit_mlp(), batch()
    rule = make_rule(model, options)
    recorder = GradientRecorder(model)
    rule.train_step(x, y, recorder)

    units = list(model)
    h1 = units[0](x)
    h2 = units[1](h1.detach())
    logits = units[2](h2.detach())
    e = output_error(logits, y)
    expected = []
    for l, h in enumerate((h1, h2)):  # g_l = s/√C · e·B_l, or 1/√(3·D_l) · e·B_l for "auto"
        auto = options.feedback_scale == "auto"
        factor = 1 / math.sqrt(3 * h[0].numel()) if auto else options.feedback_scale / math.sqrt(C)
        g = factor * e @ rule.feedback[l].dense()
        expected += torch.autograd.grad(h, list(units[l].parameters()), g)
    expected += torch.autograd.grad(logits, list(units[2].parameters()), e)  # the top gets e itself
    for got, want in zip(recorder.grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_feedback_is_fixed_by_the_seed_and_saved_with_the_rule():
    a = make_rule(three_unit_mlp(), DFAOptions()).state_dict()
    b = make_rule(three_unit_mlp(), DFAOptions()).state_dict()
    assert sorted(a) == ["feedback.0.matrix", "feedback.1.matrix"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["feedback.0.matrix"][:, :16], a["feedback.1.matrix"])  # one stream per unit
    assert sorted(make_rule(three_unit_mlp(), BinaryDFAOptions()).state_dict()) == ["feedback.0.words", "feedback.1.words"]
    assert make_rule(three_unit_mlp(), BinaryDFAOptions(feedback_storage="seeded")).state_dict() == {}


def test_bdfa_packed_and_seeded_give_identical_updates():
    x, y = batch()
    packed = dfa_update(three_unit_mlp(), BinaryDFAOptions(feedback_storage="packed"), x, y)
    seeded = dfa_update(three_unit_mlp(), BinaryDFAOptions(feedback_storage="seeded"), x, y)
    dense = dfa_update(three_unit_mlp(), DFAOptions(feedback_init="binary"), x, y)
    for p, s, d in zip(packed, seeded, dense, strict=True):
        assert torch.equal(p, s)
        torch.testing.assert_close(p, d, rtol=1e-5, atol=1e-7)


def test_hybrid_with_every_unit_below_the_top_by_bp_is_refused_as_plain_backprop():
    with pytest.raises(RuleError, match=r"single segment \(bp_units puts all 3 of its units into the top's segment\)"):
        make_rule(three_unit_mlp(), DFAOptions(bp_units=["0", "1"]))


def test_hybrid_bp_unit_is_backpropagated_from_the_dfa_signal_above_it():
    model, (x, y) = three_unit_mlp(), batch()
    rule = make_rule(model, DFAOptions(bp_units=["0"], feedback_scale=1.0))
    assert rule.unit_names == ["1", "2"] and [list(s) for s in rule.segments] == [[0, 1], [2]]
    recorder = GradientRecorder(model)
    rule.train_step(x, y, recorder)

    h2 = model[1](model[0](x))  # one segment: BP from unit 1's output down through unit 0
    e = output_error(model[2](h2.detach()), y)
    g2 = e @ rule.feedback[0].dense() / math.sqrt(C)
    expected = torch.autograd.grad(h2, [*model[0].parameters(), *model[1].parameters()], g2)
    for got, want in zip(recorder.grads[:4], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bp_units_take_prefixes_on_the_trainers_resnets():
    from trainer.config import ModelConfig
    from trainer.models import build_model

    model = build_model(ModelConfig(name="resnet20"), (3, 8, 8), C)
    rule = build_rule("dfa", DFAOptions(granularity="block", bp_units=["stem", "layer1"]), model,
                      RuleContext(num_classes=C, input_shape=(3, 8, 8)))
    assert rule.unit_names[0] == "layer2.0" and len(rule.segments[0]) == 5  # stem + 3 blocks + layer2.0
    assert [f.dim for f in rule.feedback] == [math.prod(s) for s in rule.output_shapes[:-1]]


def test_alignment_angle_is_zero_where_feedback_is_the_true_backward_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(IN, 32), nn.ReLU()), nn.Linear(32, C))
    rule = make_rule(model, DFAOptions(align_every=1, feedback_scale=1.0))
    with torch.no_grad():
        rule.feedback[0].matrix.copy_(model[1].weight * math.sqrt(C))  # scale/√C · e·B = e·W_head
    rule.train_step(*batch(), GradientRecorder(model))
    angles = rule.diagnostics()
    assert set(angles) == {"angle", "angle/0", "angle/1"}
    assert angles["angle/0"] < 0.1 and angles["angle/1"] < 0.1 and angles["angle"] == angles["angle/0"]


def test_alignment_angle_is_about_90_degrees_for_independent_feedback_in_high_dimension():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(IN, 2048), nn.BatchNorm1d(2048)), nn.Linear(2048, C))
    reference = copy.deepcopy(model)
    rule = make_rule(model, DFAOptions(align_every=1))
    recorder = GradientRecorder(model)
    rule.train_step(*batch(64), recorder)
    assert 80 < rule.diagnostics()["angle"] < 100
    # the extra BP pass changed neither the update nor the BatchNorm statistics
    torch.testing.assert_close(recorder.grads, dfa_update(reference, DFAOptions(), *batch(64)))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), reference.buffers()))


def test_bf16_autocast_signals_in_the_activation_dtype():
    model, (x, y) = three_unit_mlp(), batch()
    rule = make_rule(model, DFAOptions(align_every=1), amp=True)
    outputs = rule.forward_units(x)
    signals = rule.signals(UnitBatch(x, y, outputs, output_error(outputs[-1].float(), y)))
    assert [s.dtype for s in signals[:-1]] == [torch.bfloat16, torch.bfloat16]
    recorder = GradientRecorder(model)
    rule.train_step(x, y, recorder)
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in recorder.grads)


@pytest.mark.parametrize("rule", [
    {"name": "dfa", "align_every": 2},
    {"name": "bdfa", "feedback_storage": "seeded", "granularity": "stage"},
    {"name": "dfa", "bp_units": ["0"], "feedback_init": "binary"},
])
def test_training_improves_accuracy(tmp_path, tiny_npz, rule):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule=rule, model={"hidden": [64, 64]},
                        optim={"name": "adamw", "lr": 0.01}, train={"epochs": 3, "log_every": 2})
    result = train(load_recipe(path), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if r["split"] == "held-out"]
    assert held_out[-1]["accuracy"] > 0.9  # chance is 0.25
    first_logged_loss = next(r["loss"] for r in records if r["split"] == "train")
    assert held_out[-1]["train_loss"] < 0.5 * first_logged_loss
    assert result["accuracy"] == held_out[-1]["accuracy"]
    if rule.get("align_every"):
        assert {"angle", "angle/0.0", "angle/1.0", "angle/2.0"} <= set(records[0])


@pytest.mark.parametrize("rule, message", [
    ({"name": "dfa", "bp_units": ["stem"]}, "bp_units: 'stem' names no unit; units: 0.0, 1.0"),
    ({"name": "dfa", "feedback_storage": "packed"}, "holds ±1 matrices only"),
    ({"name": "bdfa", "feedback_init": "gaussian"}, "feedback_init: expected one of 'binary'"),
    ({"name": "dfa", "feedback_scale": 0}, "feedback_scale must be positive"),
    ({"name": "dfa", "align_every": -1}, "align_every must be 0"),
])
def test_bad_options_are_clean_config_errors(tmp_path, tiny_npz, rule, message):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule=rule)
    with pytest.raises(ConfigError, match=message):
        train(load_recipe(path), tmp_path / "run")


def test_token_feedback_first_reaches_the_class_token_alone():
    """On token sequences (N, T, D): B_l is C x D and the signal is e·B_l at token 0, zero elsewhere."""
    from trainer.config import ModelConfig
    from trainer.models import build_model

    model = build_model(ModelConfig(name="vit", vit_patch=4, vit_depth=2, vit_width=8, vit_heads=2, vit_mlp=16),
                        (1, 8, 8), C)
    rule = build_rule("dfa", DFAOptions(granularity="children", token_feedback="first", feedback_scale=1.0), model,
                      RuleContext(num_classes=C, input_shape=(1, 8, 8)))
    assert rule.unit_names == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "output"]
    assert [f.dim for f in rule.feedback] == [8, 8]
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % C
    outputs = rule.forward_units(x)
    error = output_error(outputs[-1].detach(), y)
    signals = rule.signals(UnitBatch(x, y, outputs, error))
    for l, feedback in enumerate(rule.feedback):
        assert signals[l].shape == (6, 5, 8)  # the class token and 4 patches
        torch.testing.assert_close(signals[l][:, 0], error @ feedback.dense() / math.sqrt(C))
        assert torch.count_nonzero(signals[l][:, 1:]) == 0
