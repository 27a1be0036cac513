"""DRTP and tpSGD: signals and local losses against the equations, forward-only memory and
updates, layer isolation in recurrent nets, learning, recipes and option errors."""

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, ModelConfig, build_section
from trainer.loop import train
from trainer.models import build_model
from trainer.recipes import load_recipe
from trainer.rules.base import UnitBatch
from trainer.session import build_session
from trainer.units import primary
from trainer.rules import RuleContext, build_rule
from trainer.memory import SavedActivationMeter
from trainer.rules.target_projection import DRTPOptions, TpSGDOptions

from conftest import write_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHAPE, CLASSES = (1, 4, 4), 3


def make_rule(name: str, model_cfg: ModelConfig | None = None, shape: tuple[int, ...] = SHAPE, **options):
    """A rule on a small tanh MLP (or ``model_cfg``), its model, and a batch."""
    torch.manual_seed(0)
    cfg = model_cfg or ModelConfig(name="mlp", hidden=[16, 12], activation="tanh")
    model = build_model(cfg, shape, CLASSES)
    options_cls = DRTPOptions if name == "drtp" else TpSGDOptions
    ctx = RuleContext(num_classes=CLASSES, input_shape=shape, seed=5)
    rule = build_rule(name, build_section(options_cls, options, "test"), model, ctx)
    x, y = torch.randn(6, *shape), torch.tensor([0, 1, 2, 2, 1, 0])
    return rule, model, x, y


def projected_labels(rule, index: int, y: torch.Tensor) -> torch.Tensor:
    """Reference ``t_l = onehot(y) · P_l`` with the documented scale ``target_scale / √C``."""
    return F.one_hot(y, CLASSES).float() @ rule.targets[index].dense() * rule.options.target_scale / math.sqrt(CLASSES)


@pytest.mark.parametrize("init, storage", [("gaussian", "dense"), ("binary", "packed"), ("binary", "seeded")])
def test_drtp_signal_is_minus_the_projected_label(init, storage):
    rule, _, x, y = make_rule("drtp", target_init=init, target_storage=storage, target_scale=2.0)
    outputs = rule.forward_units(x)
    _, error = rule.output_error(primary(outputs[-1]), y)
    signals = rule.signals(UnitBatch(x, y, outputs, error))
    for index in range(len(outputs) - 1):
        torch.testing.assert_close(signals[index], -projected_labels(rule, index, y) / len(y))
    torch.testing.assert_close(signals[-1], (F.softmax(primary(outputs[-1]), 1) - F.one_hot(y, CLASSES)) / len(y))


@pytest.mark.parametrize("sequence_target", ["every_step", "last_step"])
def test_drtp_signal_on_sequences_follows_the_sequence_target(sequence_target):
    cfg = ModelConfig(name="rnn", rnn_cell="elman", rnn_hidden=8, rnn_layers=2)
    rule, _, _, y = make_rule("drtp", cfg, (1, 5, 4), sequence_target=sequence_target)
    outputs = rule.forward_units(torch.randn(6, 1, 5, 4))
    signal = rule.unit_signal(0, primary(outputs[0]), y)
    expected = -projected_labels(rule, 0, y) / len(y)  # per step: N x H
    if sequence_target == "every_step":
        torch.testing.assert_close(signal, expected[:, None].expand(6, 5, 8) / 5)
    else:
        torch.testing.assert_close(signal[:, -1], expected)
        assert signal[:, :-1].abs().sum() == 0


@pytest.mark.parametrize("storage", ["dense", "packed", "seeded"])
def test_one_hot_fast_path_equals_the_general_projection(storage):
    rule, _, _, y = make_rule("drtp", target_init="binary", target_storage=storage)
    for target in rule.targets:
        torch.testing.assert_close(target.project_labels(y), target.project(F.one_hot(y, CLASSES).float()))


def reference_local_loss(loss: str, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, P: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """The local losses written out by hand (z, t: N x D)."""
    diff = z - t
    if loss == "mse":
        return diff.square().mean()
    if loss == "l1":
        return diff.abs().mean()
    if loss == "smooth_l1":
        return torch.where(diff.abs() < 1, 0.5 * diff.square(), diff.abs() - 0.5).mean()
    logits = scale * z @ P.T / math.sqrt(z.shape[1])
    return -(logits.log_softmax(1)[torch.arange(len(y)), y]).mean()


@pytest.mark.parametrize("loss", ["mse", "l1", "smooth_l1", "ce"])
def test_tpsgd_signal_is_the_gradient_of_the_local_loss(loss):
    rule, _, x, y = make_rule("tpsgd", loss=loss, target_scale=3.0)
    outputs = rule.forward_units(x)
    for index, out in enumerate(outputs[:-1]):
        z = primary(out).detach().requires_grad_()
        expected = reference_local_loss(loss, z, projected_labels(rule, index, y), y, rule.targets[index].dense(), 3.0)
        (expected_signal,) = torch.autograd.grad(expected, z)
        torch.testing.assert_close(rule.unit_signal(index, primary(out), y), expected_signal)
        torch.testing.assert_close(rule.local_losses[index], expected.detach())


@pytest.mark.parametrize("name", ["drtp", "tpsgd"])
def test_forward_only_gives_the_updates_of_one_joint_step(name):
    cfg = ModelConfig(name="cnn", width=4, activation="tanh")
    results = []
    for forward_only in (True, False):
        rule, model, x, y = make_rule(name, cfg, (1, 8, 8), forward_only=forward_only)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            rule.train_step(x, y, optimizer)
        results.append(model.state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(value, results[1][key], msg=key)


def saved_activation_peak(depth: int, forward_only: bool) -> int:
    hidden = [256] * (depth - 1)
    rule, model, _, _ = make_rule("tpsgd", ModelConfig(name="mlp", hidden=hidden, activation="tanh"), (1, 16, 16),
                                  loss="mse", forward_only=forward_only)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, CLASSES, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with SavedActivationMeter(exclude=[*model.parameters(), *rule.buffers()]) as meter:
        rule.train_step(x, y, optimizer)
    assert meter.current == 0, "every graph is freed by the end of a step"
    return meter.peak


def test_forward_only_peak_activation_memory_does_not_grow_with_depth():
    shallow, deep = saved_activation_peak(4, True), saved_activation_peak(16, True)
    assert deep < 1.10 * shallow, (shallow, deep)
    assert shallow >= 64 * 256 * 4, "at least one unit's input is saved"
    joint_shallow, joint_deep = saved_activation_peak(4, False), saved_activation_peak(16, False)
    assert joint_deep > 3 * joint_shallow, "the meter sees the memory of all units held together"
    assert joint_deep > 4 * deep


class RecordingSGD(torch.optim.SGD):
    """SGD that records which parameters have a gradient at each step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.stepped: list[set[int]] = []

    def step(self, closure=None):
        self.stepped.append({id(p) for group in self.param_groups for p in group["params"] if p.grad is not None})
        return super().step(closure)


@pytest.mark.parametrize("sequence_target", ["every_step", "last_step"])
def test_rnn_layers_get_no_gradient_from_the_layer_above(sequence_target):
    cfg = ModelConfig(name="rnn", rnn_cell="gru", rnn_hidden=8, rnn_layers=3)
    rule, model, _, y = make_rule("tpsgd", cfg, (1, 6, 5), loss="mse", sequence_target=sequence_target)
    x = torch.randn(6, 1, 6, 5)
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    rule.train_step(x, y, optimizer)
    units = [{id(p) for p in unit.parameters()} for unit in rule.units]
    assert optimizer.stepped == units, "each step moves exactly one unit: its own loss, its own parameters"

    outputs = rule.forward_units(x)
    signal = rule.unit_signal(1, primary(outputs[1]), y)
    assert signal.shape == (6, 6, 8)
    if sequence_target == "last_step":
        assert signal[:, :-1].abs().sum() == 0 and signal[:, -1].abs().sum() > 0
    rule.local_backward(outputs, [None, signal, None, None])
    assert all(p.grad is None for p in model.layer1.parameters())
    assert all(p.grad is not None for p in model.layer2.parameters())


@pytest.mark.parametrize("rule_options", [{"name": "drtp"}, {"name": "tpsgd", "loss": "mse"},
                                          {"name": "tpsgd", "target_init": "binary", "target_storage": "seeded"}])
def test_a_few_epochs_learn_the_tiny_set(tmp_path, tiny_npz, rule_options):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule=rule_options, train={"epochs": 4},
                        model={"hidden": [32, 32], "activation": "tanh"})
    result = train(load_recipe(path), tmp_path / "run")
    assert result["accuracy"] > 0.9  # chance is 0.25


@pytest.mark.parametrize("recipe", ["mnist5k_drtp", "mnist5k_tpsgd", "mnist5k_rnn_tpsgd", "cifar10_resnet18_tpsgd"])
def test_recipes_build_and_take_a_step(tmp_path, tiny_npz, recipe):
    overrides = ["data.name='npz'", f"data.path='{tiny_npz}'", "train.device='cpu'", "train.compile=false",
                 "train.batch_size=8"]
    session = build_session(load_recipe(RECIPES / f"{recipe}.toml", overrides))
    x, y = next(session.data.train.batches(0))
    before = copy.deepcopy(session.model.state_dict())
    result = session.rule.train_step(x, y, session.optimizer)
    assert torch.isfinite(result.loss) and result.logits.shape == (8, 4)
    assert all(not torch.equal(before[k], v) for k, v in session.model.state_dict().items() if v.is_floating_point())
    assert set(session.rule.diagnostics()) >= {"local_loss", *(f"local_loss/{n}" for n in session.rule.unit_names)}


@pytest.mark.parametrize("rule, key, value, expected", [
    ("drtp", "target_storage", "packed", "target_storage = 'packed' holds ±1 matrices only; use target_init"),
    ("drtp", "target_scale", 0, "target_scale must be positive"),
    ("tpsgd", "loss", "hinge", "loss: expected one of 'mse', 'l1', 'smooth_l1', 'ce'"),
    ("tpsgd", "sequence_target", "first_step", "sequence_target: expected one of 'every_step', 'last_step'"),
    ("drtp", "granularity", "neuron", "granularity: expected one of 'layer', 'block', 'stage'"),
    ("drtp", "loss", "mse", "unknown key 'loss'"),
])
def test_bad_options_give_clean_errors(tmp_path, tiny_npz, rule, key, value, expected):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": rule, key: value})
    with pytest.raises(ConfigError, match=re.escape(expected)) as err:
        load_recipe(path)
    assert "[rule]" in str(err.value)
