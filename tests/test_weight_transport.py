"""The weight-transport rules (fa, usf, brsf, frsf, kp), sign-DFA and shallow learning in the trainer:
their updates against the equations, recipes, diagnostics, checkpoints, resume and evaluation.
The feedback layers themselves are tested in test_feedback_alignment.py."""

import json
import math

import pytest
import torch
from torch import nn

from trainer.cli import main
from trainer.config import ConfigError, OptimConfig, build_section
from trainer.loop import train
from trainer.recipes import builtin_recipes, load_recipe
from trainer.rules import RuleContext, RuleError, build_rule, rule_options_class
from trainer.rules.base import UnitBatch
from trainer.session import build_optimizer

from conftest import assert_rel_close, write_recipe

C = 4
FEEDBACK_RULES = ["fa", "usf", "brsf", "frsf", "kp"]
# the B-W angle in degrees soon after the start: random B is orthogonal to W (90 in expectation);
# cos(sign(W), W) = E|w| / sqrt(E w²) (about 0.8-0.87: 30-37 deg); |R|·sign(W) multiplies that by
# E|r| / sqrt(E r²) again (about 50 deg); kp's B starts as fa's
FB_ANGLE_AT_START = {"fa": (80, 100), "usf": (20, 45), "brsf": (35, 65), "frsf": (35, 65), "kp": (75, 100)}
TINY_CNN = {"name": "cnn", "width": 3}


class KeepGrads:
    """An optimizer stand-in that leaves the rule's updates in ``.grad``."""

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def make_rule(name: str, model: nn.Module, shape=(1, 3, 4), **options):
    opts = build_section(rule_options_class(name), options, f"[rule] (rule {name!r})")  # validated as a recipe is
    return build_rule(name, opts, model, RuleContext(num_classes=C, input_shape=shape, seed=3))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Tanh()),
                         nn.Sequential(nn.Linear(9, 7), nn.ReLU()), nn.Linear(7, C))


def batch(n: int = 6):
    return torch.randn(n, 1, 3, 4), torch.randint(0, C, (n,))


@pytest.mark.parametrize("name", FEEDBACK_RULES)
def test_feedback_rules_send_the_input_gradient_through_b(name):
    """On an MLP: ΔW_l = δ_l ⊗ x_l exactly, with δ_{l} = (δ_{l+1} · B_{l+1}) ⊙ φ'(a_l) going down."""
    model = mlp()
    rule = make_rule(name, model)
    x, y = batch()
    rule.train_step(x, y, KeepGrads())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    feedback = [layer.current_feedback_weight() for layer in linears]
    h = [x.flatten(1)]
    a = []
    for layer, act in zip(linears, (torch.tanh, torch.relu, None)):
        a.append(h[-1] @ layer.weight.T.detach() + layer.bias.detach())
        h.append(act(a[-1]) if act else a[-1])
    delta = (h[-1].softmax(1) - nn.functional.one_hot(y, C)) / len(y)
    for l in (2, 1, 0):
        assert_rel_close(linears[l].weight.grad, delta.T @ h[l], 1e-5, f"ΔW_{l}")
        assert_rel_close(linears[l].bias.grad, delta.sum(0), 1e-5, f"Δb_{l}")
        if l:
            upstream = delta @ feedback[l]
            delta = upstream * (1 - torch.tanh(a[l - 1]) ** 2 if l == 1 else (a[l - 1] > 0).float())


def test_kp_gives_b_the_weight_gradient_and_decays_it_like_w():
    model = mlp()
    rule = make_rule("kp", model, kp_decay=0.3)
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.01), model, rule)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    layer = model[1][0]
    assert decays[id(layer.feedback_weight)] == 0.3 and decays[id(layer.weight)] == 0.01
    rule.train_step(*batch(), KeepGrads())
    assert torch.equal(layer.feedback_weight.grad, layer.weight.grad)


def test_sdfa_projects_the_sign_of_the_error():
    model = mlp()
    rule = make_rule("sdfa", model, granularity="layer", feedback_scale=1.0)
    x, y = batch()
    outputs = rule.forward_units(x)
    error = (outputs[-1].detach().softmax(1) - nn.functional.one_hot(y, C)) / len(y)
    signals = rule.signals(UnitBatch(x, y, outputs, error))
    for l, feedback in enumerate(rule.feedback):
        expected = (torch.sign(error) / len(y)) @ feedback.dense() / math.sqrt(C)
        assert_rel_close(signals[l], expected, 1e-6, f"g_{l}")
    assert torch.equal(signals[-1], error)


def test_shallow_trains_the_top_unit_only():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    rule = make_rule("shallow", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = batch()
    for _ in range(3):
        rule.train_step(x, y, optimizer)
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert moved == [False, False, False, False, True, True]  # only the head's weight and bias


def test_a_model_with_every_layer_exact_is_refused():
    with pytest.raises(RuleError, match="no nn.Linear or nn.Conv2d of the model takes feedback"):
        make_rule("fa", mlp(), keep_exact=["0", "1", "2"])


def test_seeded_storage_is_for_fa_and_frsf_only(tmp_path, tiny_npz):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "usf", "feedback_storage": "seeded"})
    with pytest.raises(ConfigError, match="unknown key 'feedback_storage'"):
        load_recipe(path)


@pytest.mark.parametrize("rule", [{"name": "fa", "feedback_storage": "seeded"}, {"name": "usf"}, {"name": "brsf"},
                                  {"name": "frsf"}, {"name": "kp"}, {"name": "sdfa"}, {"name": "shallow"}])
def test_each_rule_trains_and_its_checkpoint_evaluates_in_the_plain_model(tmp_path, tiny_npz, capsys, rule):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={**rule, **({"align_every": 3} if rule["name"] in
                                                                        FEEDBACK_RULES else {})},
                        model=TINY_CNN, optim={"name": "adamw", "lr": 0.01}, train={"epochs": 3, "log_every": 3})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in records if r["split"] == "train")
    last = [r for r in records if r["split"] == "held-out"][-1]
    floor = 0.45 if rule["name"] == "shallow" else 0.8  # chance is 0.25; shallow: random conv features
    assert last["accuracy"] > floor and last["train_loss"] < first
    if rule["name"] in FEEDBACK_RULES:
        assert {"angle", "fb_angle"} <= set(records[0]) and any(k.startswith("fb_angle/") for k in records[0])
        # B against W: random (fa) is orthogonal, sign-concordant feedback is not, kp's B turns towards W
        angles = [r["fb_angle"] for r in records if "fb_angle" in r]
        low, high = FB_ANGLE_AT_START[rule["name"]]
        assert low < angles[0] < high, (rule["name"], angles[0])
        if rule["name"] == "kp":
            assert angles[-1] < angles[0] - 1, angles
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(last["accuracy"])


def test_brsf_resume_equals_an_uninterrupted_run(tmp_path, tiny_npz, monkeypatch):
    """R is redrawn from (seed, step): the step counter is saved, so the draws continue."""
    import trainer.loop

    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "brsf"}, model=TINY_CNN,
                        optim={"name": "adamw", "lr": 0.01}, train={"epochs": 2, "log_every": 1})
    train(load_recipe(path), tmp_path / "full")
    save = trainer.loop.save_checkpoint

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(path), tmp_path / "cut")
    monkeypatch.setattr(trainer.loop, "save_checkpoint", save)
    train(load_recipe(path), tmp_path / "cut", resume=True)
    full, cut = (torch.load(tmp_path / name / "checkpoint.pt")["model"] for name in ("full", "cut"))
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_recipes_of_the_baselines_validate():
    recipes = builtin_recipes()
    for name in ["mnist5k_fa", "mnist5k_usf", "mnist5k_brsf", "mnist5k_frsf", "mnist5k_kp",
                 *(f"cifar10_resnet20_{r}" for r in ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp"])]:
        recipe = load_recipe(recipes[name])
        assert recipe.model.name in ("cnn", "resnet20"), name
