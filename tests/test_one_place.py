"""The single homes of issue 36: where a recipe's values came from (recorded once), the one
after-backward hook, side-effect-free signals, DFA's feedback-matrix hook and passes that do not
count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import ConfigError, ModelConfig
from trainer.models import build_model
from trainer.passes import uncounted_pass
from trainer.recipes import load_recipe
from trainer.rules import Rule, RuleContext, build_rule, rule_options_class
from trainer.rules.batch import UnitBatch
from trainer.rules.bp import Backprop
from trainer.rules.dfa import DFA
from trainer.rules.lra import LocalRepresentationAlignment
from trainer.rules.projection import FixedProjection
from trainer.rules.unit_rule import UnitRule


def test_a_recipe_records_where_each_value_came_from_once(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[rule]\nname = "bp"\n[optim]\nname = "sgd"\nlr = 0.2\n')
    recipe = load_recipe(path, ["rule.name=dfa", "train.epochs=2"])
    origins = recipe.origins
    assert origins.sets == {"rule.name": "rule.name=dfa", "train.epochs": "train.epochs=2"}
    assert (origins.file_rule, origins.file_optim_keys, origins.name) == ("bp", ("name", "lr"), "r")
    assert origins.where("train.epochs") == "--set train.epochs=2" and origins.where("optim.lr") == str(path)
    assert recipe.rule.rule_class is DFA  # resolved once, by the reader
    err = origins.blame(ConfigError("[train] epochs: too many"))
    assert str(err) == "--set train.epochs=2: [train] epochs: too many"
    assert ConfigError("[data] path: missing").key == "data.path" and ConfigError("no key here").key == ""


def test_build_rule_takes_the_resolved_class_as_the_name():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    ctx = RuleContext(num_classes=5, input_shape=(3, 4))
    assert type(build_rule(Backprop, rule_options_class("bp")(), model, ctx)) is Backprop


def test_a_rule_with_the_old_after_backward_hooks_is_refused_at_its_definition():
    with pytest.raises(TypeError, match=r"prepared_after_backward\(x, y\) is now after_backward\(self, batch\)"):
        type("Old", (Backprop,), {"prepared_after_backward": lambda self, x, y: None})
    with pytest.raises(TypeError, match=r"Old.after_backward\(self, x, y\) is now after_backward\(self, batch\)"):
        type("Old", (Backprop,), {"after_backward": lambda self, x, y: None})
    type("New", (Backprop,), {"after_backward": lambda self, batch: None})  # the one signature


def test_end_to_end_rules_see_the_batch_in_after_backward_in_train_step_and_prepare():
    seen = []

    class Watching(Backprop):
        def after_backward(self, batch: UnitBatch) -> None:
            seen.append((batch.x.shape, None if batch.y is None else batch.y.shape, batch.outputs[0].shape,
                         batch.error, batch.samples))

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    rule = Watching(model, rule_options_class("bp")(), RuleContext(num_classes=5, input_shape=(3, 4)))
    x, y = torch.randn(7, 3, 4), torch.randint(0, 5, (7,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rule.train_step(x, y, optimizer)
    nn.functional.cross_entropy(rule.prepare()(x), y).backward()  # no labels given to the net
    assert seen == [((7, 3, 4), (7,), (7, 5), None, 7), ((7, 3, 4), None, (7, 5), None, 7)]


def test_lras_signals_change_nothing_and_its_local_updates_write_the_grads():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=[6, 5], activation="tanh"), (1, 3, 3), 3)
    rule = LocalRepresentationAlignment(model, rule_options_class("lra")(gamma=0.5, error_update="product"),
                                        RuleContext(num_classes=3, input_shape=(1, 3, 3)))
    x, y = torch.randn(7, 1, 3, 3), torch.randint(0, 3, (7,))
    outputs = rule.forward_units(x)
    batch = UnitBatch(x, y, outputs, rule.output_error(outputs[-1][0], y)[1])
    before = {n: p.grad for n, p in rule.named_parameters()} | {n: p.grad for n, p in model.named_parameters()}
    signals = rule.signals(batch)
    assert len(signals) == 3 and set(batch.error_units) == {0, 1, 2} and batch.errors is batch.error_units
    after = {n: p.grad for n, p in rule.named_parameters()} | {n: p.grad for n, p in model.named_parameters()}
    assert after == before  # no .grad written by signals
    rule.local_updates(batch)
    written = [n for n, p in [*rule.named_parameters(), *model.named_parameters()] if p.grad is not None]
    assert written, "the fused ΔW or the product-form ΔE land in local_updates"


def test_a_dfa_variant_overrides_the_feedback_matrix_alone():
    class OnesDFA(DFA):
        name = "ones_dfa"

        def feedback_matrix(self, index: int, dim: int) -> FixedProjection:
            return FixedProjection(self.ctx.num_classes, dim, matrix=torch.ones(self.ctx.num_classes, dim), scale=2.0)

    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU()), nn.Linear(7, 5))
    rule = OnesDFA(model, rule_options_class("dfa")(granularity="children"), RuleContext(num_classes=5, input_shape=(3, 4)))
    x, y = torch.randn(4, 3, 4), torch.randint(0, 5, (4,))
    outputs = rule.forward_units(x, range(2))
    error = torch.randn(4, 5)
    [g, top] = rule.signals(UnitBatch(x, y, outputs, error))
    torch.testing.assert_close(g, (error.sum(1, keepdim=True) * 2 / 5 ** 0.5).expand(4, 7))
    assert top is error and rule.feedback[0].init == "custom"
    with pytest.raises(ValueError, match=r"matrix: expected a 5 x 7 \(C x D\) matrix, got \(7, 5\)"):
        FixedProjection(5, 7, matrix=torch.ones(7, 5))


def test_a_pass_that_does_not_count_leaves_modes_statistics_and_randomness():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).eval()
    model[2].train()  # a mixed state, kept as it was
    stats = [b.clone() for b in model.buffers()]
    torch.manual_seed(3)
    expected_draw = torch.rand(1)
    torch.manual_seed(3)
    with uncounted_pass(model, training=True):
        assert all(m.training for m in model.modules())
        model(torch.randn(8, 4))  # moves BatchNorm's statistics and draws dropout's mask
    assert [m.training for m in model.modules()] == [False, False, False, True]
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert torch.equal(torch.rand(1), expected_draw)  # the global stream as if the pass never ran


def test_the_old_homes_still_export_the_moved_names():
    from trainer.rules import base, checks
    from trainer.errors import RuleError

    assert base.UnitRule is UnitRule and base.UnitBatch is UnitBatch and checks.RuleError is RuleError
    assert issubclass(UnitRule, Rule)
