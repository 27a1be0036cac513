"""A step that diverges changes nothing (``train_step`` of every kind of rule and the prepared
route), and says what it can see went wrong; a ``python:`` rule that breaks its contract, a
``python:`` model that passes the build check but cannot train, and trace_bp probes whose whole
step does not fit in memory are each one clear error (exit 2 from the CLI)."""

import sys

import pytest
import torch
from torch import nn

from trainer.cli import main
from trainer.config import ConfigError, ModelConfig
from trainer.errors import TrainingDiverged
from trainer.models import build_model
from trainer.rules import RuleContext, RuleError, build_rule, rule_options_class

from conftest import write_recipe

CLASSES, SHAPE = 4, (12,)


def mlp(norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    first = [nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh()] if norm else [nn.Linear(12, 16), nn.Tanh()]
    return nn.Sequential(nn.Sequential(nn.Flatten(), *first), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                         nn.Linear(16, CLASSES))


def make(name: str, norm: bool = True):
    rule = build_rule(name, rule_options_class(name)(), mlp(norm), RuleContext(num_classes=CLASSES, input_shape=SHAPE))
    params = list({id(p): p for p in (*rule.model.parameters(), *rule.parameters())}.values())
    return rule, torch.optim.Adam(params, lr=1e-2), params


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def poisoned(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0] = float("nan")
    return x


def snapshot(rule, optimizer) -> dict[str, torch.Tensor]:
    """Everything a step may change: the model's parameters and buffers (BatchNorm statistics),
    the rule's own state, and the optimizer's state."""
    state = {f"model.{k}": v.clone() for k, v in rule.model.state_dict().items()}
    state.update({f"rule.{k}": v.clone() for k, v in rule.state_dict().items()})
    for i, per_param in optimizer.state_dict()["state"].items():
        state.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in per_param.items()})
    return state


def assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a diverged step changed {changed}"


# --- 1. a step that diverges changes nothing ------------------------------------------------------


@pytest.mark.parametrize("name, norm", [("bp", True), ("dfa", True), ("drtp", True), ("lra", False)])
def test_a_diverging_train_step_changes_nothing(name, norm):
    """bp (one step), dfa (error rule), drtp (forward-only: a step per unit) and lra (its own E)."""
    rule, optimizer, params = make(name, norm)
    x, y = batch()
    rule.train_step(x, y, optimizer)  # optimizer state exists, BatchNorm statistics have moved
    before = snapshot(rule, optimizer)
    with pytest.raises(TrainingDiverged, match=rf"rule '{name}': loss became nan at step 2; the batch x holds NaN "
                                               r"values: check the data \(x\).*\(this step was not applied\)"):
        rule.train_step(poisoned(x), y, optimizer)
    assert_unchanged(before, snapshot(rule, optimizer))
    assert all(p.grad is None for p in params) and rule.steps_taken == 1
    rule.train_step(x, y, optimizer)  # and it trains on
    assert rule.steps_taken == 2 and not torch.equal(before["model.2.weight"], rule.model[2].weight)


@pytest.mark.parametrize("name", ["bp", "dfa"])
def test_the_prepared_route_refuses_a_diverging_step(name):
    rule, optimizer, params = make(name)
    net = rule.prepare()
    x, y = batch()
    nn.functional.cross_entropy(net(x, y), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    before = snapshot(rule, optimizer)
    for labels in (y, None):  # the loss of the labels, or the logits alone
        with pytest.raises(TrainingDiverged, match=rf"rule '{name}': (loss|logits) became nan.*the batch x holds NaN"):
            net(poisoned(x), labels)
    assert_unchanged(before, snapshot(rule, optimizer))
    with pytest.raises(TrainingDiverged, match="the loss gradient at the logits, or the signals formed from it, "
                                               "became non-finite"):
        (nn.functional.cross_entropy(net(x, y), y) * float("nan")).backward()  # finite logits, a NaN loss
    assert all(p.grad is None for p in params), "no gradient reached a parameter"
    rule.check_divergence = False  # the same opt-out as train_step's
    assert torch.isnan(net(poisoned(x), y)).any()


def test_the_message_names_the_cause_it_can_see():
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, CLASSES))  # unbounded: huge x explodes
    rule = build_rule("bp", rule_options_class("bp")(), model, RuleContext(num_classes=CLASSES, input_shape=SHAPE))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    with pytest.raises(TrainingDiverged, match=r"at step 1; the batch was empty \(0 samples"):
        rule.train_step(x[:0], y[:0], optimizer)
    with pytest.raises(TrainingDiverged, match=r"loss exploded .* the batch x reaches \|x\| = \d\.\d+e\+06 "
                                               r"\(normalized data stays within a few units\)"):
        rule.train_step(x * 1e6, y, optimizer)
    with torch.no_grad():
        rule.model[2].weight[0, 0] = float("nan")  # damaged weights, before any step
    with pytest.raises(TrainingDiverged, match=r"1 parameter tensor\(s\) were non-finite before the first step "
                                               r"\(e.g. '2.weight'\): the weights it was given are damaged"):
        rule.train_step(x, y, optimizer)


def test_the_trainer_blames_the_data_not_the_learning_rate(tmp_path, tiny_npz, monkeypatch, capsys):
    from trainer import loop

    build = loop.build_session

    def with_a_nan_batch(*args, **kwargs):
        session = build(*args, **kwargs)
        batches = session.data.train.batches

        def spoiled(epoch: int):
            for i, (x, y) in enumerate(batches(epoch)):
                yield (poisoned(x.flatten(1)).view_as(x) if i == 2 else x), y

        session.data.train.batches = spoiled
        return session

    monkeypatch.setattr(loop, "build_session", with_a_nan_batch)
    path = write_recipe(tmp_path / "r.toml", tiny_npz)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert "loss became nan at step 5 (epoch 1); the batch x holds NaN values: check the data (x)" in err, err
    assert "optim.lr" not in err, err


# --- 2. a python: rule that breaks its contract ----------------------------------------------------

CONTRACT_BREAKERS = '''
import torch
from trainer.rules import UnitRule
from trainer.rules.base import UnitOptions


def top_only(rule, batch):
    return [batch.error if i == rule.top else None for i in batch.indices()]


class NotAResult(UnitRule):
    name, Options = "not_a_result", UnitOptions
    signals = top_only

    def train_step(self, x, y, optimizer):
        result = super().train_step(x, y, optimizer)
        return result.loss, result.logits


class NoSignals(UnitRule):
    name, Options = "no_signals", UnitOptions

    def signals(self, batch):
        return None


class ShortSignals(UnitRule):
    name, Options = "short_signals", UnitOptions

    def signals(self, batch):
        return [batch.error]


class WrongShape(UnitRule):
    name, Options = "wrong_shape", UnitOptions

    def signals(self, batch):
        return [torch.zeros(len(batch.y), 7) for _ in batch.indices()]


class BadUnitSignal(UnitRule):
    name, Options = "bad_unit_signal", UnitOptions
    forward_only = True

    def unit_signal(self, index, output, y):
        return output.new_zeros(len(y), 3)
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """Modules of the user's (``contract_breakers``, ``bad_models``) importable from the working directory."""
    (tmp_path / "contract_breakers.py").write_text(CONTRACT_BREAKERS)
    (tmp_path / "bad_models.py").write_text(BAD_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("contract_breakers", "bad_models"):
        monkeypatch.delitem(sys.modules, module, raising=False)


def fails_in_one_line(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("rule, expected", [
    ("NotAResult", "NotAResult.train_step() returned a tuple of 2 items; expected StepResult(loss, logits)"),
    ("NoSignals", "NoSignals.signals() returned None; expected a list of 2, one tensor (or None: no backward) per "
                  "unit of the batch"),
    ("ShortSignals", "ShortSignals.signals() returned a list of 1 items; expected a list of 2"),
    ("WrongShape", "WrongShape.signals() returned a (32, 7) float32 tensor for unit '0.0' (index 0); expected a "
                   "(32, 32) tensor (or None), the shape of its signal point"),
    ("BadUnitSignal", "BadUnitSignal.unit_signal() returned a (32, 3) float32 tensor for unit '0.0' (index 0); "
                      "expected a (32, 32) tensor"),
])
def test_a_rule_that_breaks_its_contract_is_one_line_naming_the_hook(tmp_path, tiny_npz, user_code, capsys, rule,
                                                                      expected):
    name = f"python:contract_breakers:{rule}"
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": name}, train={"epochs": 1})
    fails_in_one_line(capsys, ["run", str(path), "--out", str(tmp_path / "run")],
                      f"{path}: [rule] name: rule {name} broke the rule contract in training: {expected}")


def test_the_contract_is_checked_in_the_api_and_the_prepared_route(user_code):
    name = "python:contract_breakers:NoSignals"
    rule = build_rule(name, rule_options_class(name)(), mlp(), RuleContext(num_classes=CLASSES, input_shape=SHAPE))
    optimizer = torch.optim.SGD(rule.model.parameters(), lr=0.1)
    x, y = batch()
    with pytest.raises(RuleError, match=r"NoSignals.signals\(\) returned None; expected a list of 3"):
        rule.train_step(x, y, optimizer)
    with pytest.raises(RuleError, match=r"NoSignals.signals\(\) returned None; expected a list of 3"):
        nn.functional.cross_entropy(rule.prepare()(x), y).backward()


# --- 3. python: models that pass the build check but cannot train ----------------------------------

BAD_MODELS = '''
import math

from torch import nn


class Linear(nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class IntegerLogits(Linear):
    def forward(self, x):
        return super().forward(x).round().long()


class TwoInTraining(Linear):
    def forward(self, x):
        out = super().forward(x)
        return out[:2] if self.training else out


class Unregistered(nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.layers = [nn.Linear(math.prod(input_shape), num_classes)]  # a plain list: not registered

    def forward(self, x):
        return self.layers[0](x.flatten(1))


class ViewOfTwo(Linear):
    def forward(self, x):
        return self.fc(x.view(2, -1))
'''


@pytest.mark.parametrize("factory, expected", [
    ("IntegerLogits", "returns int64 logits in eval mode; the loss and every rule differentiate them: return "
                      "floating-point scores"),
    ("Unregistered", "has no trainable parameters, so no rule can train it: make its layers attributes of the module"),
    ("TwoInTraining", "returns a (2, 4) tensor in train mode for 32 images; expected (N, C) = (32, 4) logits, C = "
                      "num_classes = 4 (the data's classes): its output has 2 rows for 32 images: keep the batch "
                      "dimension whatever its size"),
    ("ViewOfTwo", "fails in train mode on a training batch of 32 images although it takes 2: fc fails "
                  "(RuntimeError: "),
])
def test_a_model_that_cannot_train_is_one_line_naming_the_model(tmp_path, tiny_npz, user_code, capsys, factory,
                                                                expected):
    name = f"python:bad_models:{factory}"
    path = write_recipe(tmp_path / "r.toml", tiny_npz, model={"name": name}, train={"epochs": 1})
    fails_in_one_line(capsys, ["run", str(path), "--out", str(tmp_path / "run")], f"{path}: [model] name: {name} ",
                      expected)


# --- 4. trace_bp: the whole step's memory, not the probes' alone ---------------------------------


def trace_rule(probes: int = 8):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", width=4), (1, 12, 12), CLASSES)
    return build_rule("trace_bp", rule_options_class("trace_bp")(probes=probes), model,
                      RuleContext(num_classes=CLASSES, input_shape=(1, 12, 12)))


@pytest.fixture
def probes_just_fit(monkeypatch):
    """Free memory = what the probes alone take, and a KiB: the old estimate passed such a step."""
    import trainer.rules.trace_bp as trace_bp

    probe_bytes, last = trace_bp.probe_bytes, []

    def recorded(*args, **kwargs):
        last.append(probe_bytes(*args, **kwargs))
        return last[-1]

    monkeypatch.setattr(trace_bp, "probe_bytes", recorded)
    monkeypatch.setattr(trace_bp, "free_bytes", lambda device: last[-1] + 1024)


def test_trace_bp_refuses_a_step_whose_activations_and_gradients_do_not_fit(probes_just_fit):
    rule = trace_rule()
    before = {k: v.clone() for k, v in rule.model.state_dict().items()}
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, CLASSES, (16,))
    with pytest.raises(ConfigError, match=r"\[rule\] probes = 8: trace_bp's probes need about \S+ GiB of a whole step "
                                          r"\(with activations and gradients\) of about \S+ GiB at batch 16 .* but cpu "
                                          r"has \S+ GiB free; lower rule.probes"):
        rule.train_step(x, y, torch.optim.SGD(rule.model.parameters(), lr=0.1))
    assert all(torch.equal(before[k], v) for k, v in rule.model.state_dict().items()), "refused before the step"


def test_trace_bp_refusal_is_one_line_from_the_cli(tmp_path, tiny_npz, probes_just_fit, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, model={"name": "cnn", "width": 4},
                        rule={"name": "trace_bp", "probes": 8}, train={"epochs": 1})
    fails_in_one_line(capsys, ["run", str(path), "--out", str(tmp_path / "run")],
                      "[rule] probes = 8: trace_bp's probes need about ", "GiB of a whole step",
                      "GiB free; lower rule.probes (16 to 64 are usual) or train.batch_size")


def test_the_step_estimate_covers_what_a_training_forward_saves():
    """``step_bytes`` measures a sample's activations without moving the model, and with the probes'
    X·Z it covers what a real training forward saves for backward."""
    from trainer.memory import SavedActivationMeter
    from trainer.rules.trace_bp import conv_shapes, probe_bytes, step_bytes

    rule = trace_rule(probes=8)
    model = rule.model.train()
    x = torch.randn(16, 1, 12, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_sample, gradients = step_bytes(model, x[:1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert gradients == sum(4 * p.numel() for p in model.parameters())
    with SavedActivationMeter(exclude=[*model.parameters(), *model.buffers()]) as meter:
        model(x)
    convs = conv_shapes(model, x[:1])
    assert meter.peak <= len(x) * per_sample + probe_bytes(convs, len(x), 8)  # X·Z and the backward's products
    assert len(x) * per_sample > meter.peak - 4 * 8 * len(x) * sum(c.c_in for c in convs) > 0  # all but X·Z
