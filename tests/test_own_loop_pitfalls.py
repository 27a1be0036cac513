"""What a user of the rules in their own loop hit, made loud: a diverging step, Kolen–Pollack's B
outside the optimizer."""

import pytest
import torch
from torch import nn

from trainer.errors import TrainingDiverged
from trainer.rules import RuleContext, RuleError, build_rule, rule_options_class


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU()), nn.Linear(32, 4))


def data(steps: int = 30):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g) * 5, torch.randint(0, 4, (16,), generator=g)) for _ in range(steps)]


def test_a_diverging_train_step_raises_unless_the_user_opts_out():
    rule = build_rule("drtp", rule_options_class("drtp")(), mlp(), RuleContext(num_classes=4, input_shape=(12,)))
    optimizer = torch.optim.SGD(rule.model.parameters(), lr=1e4)
    with pytest.raises(TrainingDiverged, match=r"rule 'drtp': loss (exploded|became).* at step \d+; lower the learning rate"):
        for x, y in data():
            rule.train_step(x, y, optimizer)
    rule = build_rule("drtp", rule_options_class("drtp")(), mlp(), RuleContext(num_classes=4, input_shape=(12,)))
    rule.check_divergence = False
    optimizer = torch.optim.SGD(rule.model.parameters(), lr=1e4)
    losses = [rule.train_step(x, y, optimizer).loss.item() for x, y in data()]
    assert max(losses) > 100 * torch.log(torch.tensor(4.0)).item(), "the same run does explode"


def test_a_sane_run_is_not_stopped():
    rule = build_rule("dfa", rule_options_class("dfa")(), mlp(), RuleContext(num_classes=4, input_shape=(12,)))
    optimizer = torch.optim.SGD(rule.model.parameters(), lr=0.01)
    for x, y in data():
        rule.train_step(x, y, optimizer)
    assert rule.steps_taken == 30


def test_kp_with_an_optimizer_built_before_the_rule_is_refused():
    model = mlp()
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # before the conversion: no B in it
    rule = build_rule("kp", rule_options_class("kp")(), model, RuleContext(num_classes=4, input_shape=(12,)))
    x, y = data(1)[0]
    with pytest.raises(RuleError, match=r"optimizer does not hold the feedback weights B of 2 of 2 layers.*plain FA"):
        rule.train_step(x, y, early)
    late = torch.optim.SGD(rule.model.parameters(), lr=0.1)
    before = [layer.feedback_weight.detach().clone() for _, layer in rule.layers]
    rule.train_step(x, y, late)
    assert all((b - layer.feedback_weight).abs().max() > 0 for b, (_, layer) in zip(before, rule.layers)), "B learns"
