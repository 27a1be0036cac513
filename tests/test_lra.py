"""LRA-E and recursive LRA (trainer/rules/lra.py) against the equations written out here in plain PyTorch.

The references run in float64 on copies of the weights; the rule runs in float32, its dense maps
through the fused Triton kernels under the interpreter (conftest sets TRITON_INTERPRET=1).
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from conftest import assert_rel_close, write_recipe
from trainer.cli import main
from trainer.config import ConfigError, ModelConfig, OptimConfig
from trainer.loop import train
from trainer.models import build_model
from trainer.recipes import load_recipe
from trainer.session import build_optimizer
from trainer.units import BlockPreActivation, model_units, split_activation
from trainer.rules import RuleContext, build_rule, rule_options_class
from trainer.rules.base import UnitBatch
from trainer.rules.error_maps import ChannelErrorMap, ConvErrorMap, DenseErrorMap


class KeepGrads:
    """An optimizer stand-in that leaves the rule's updates in ``.grad`` for inspection."""

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def make_rule(name, model, input_shape, classes, **options):
    opts = rule_options_class(name)(**options)
    opts.validate()
    return build_rule(name, opts, model, RuleContext(num_classes=classes, input_shape=input_shape))


def mixed_error(z, target, alpha):
    diff = z - target
    return alpha * diff + (1 - alpha) * torch.sign(diff)


def ball(delta, c):
    """The norm-ball projection: c·Δ/‖Δ‖ when ‖Δ‖ ≥ c."""
    norm = delta.norm()
    return delta * (c / norm) if c and norm >= c else delta


# ---- a 3-layer tanh MLP: LRA-E ---------------------------------------------------------------------

def mlp_reference(linears, E, x, y, *, beta, gamma, alpha, weight_update, error_update, max_norm):
    """LRA-E's equations, float64: (error units, targets, {param: Δ}) with the spec's conventions."""
    W = [(lin.weight.detach().double(), lin.bias.detach().double()) for lin in linears]
    E = [e.detach().double() for e in E]
    n = len(y)
    zs, pre = [x.double().flatten(1)], []
    for i, (w, b) in enumerate(W):
        a = zs[-1] @ w.T + b
        pre.append(a)
        zs.append(torch.tanh(a) if i < len(W) - 1 else a)
    errors = [None, None, torch.softmax(pre[-1], 1) - F.one_hot(y, 3).double()]
    targets, actions = [None, None], [None, None]
    for l in (1, 0):  # top-down; E_l is stored D_{l+1} x D_l: d_l = e_{l+1} @ E_l
        actions[l] = errors[l + 1] @ E[l]
        targets[l] = torch.tanh(pre[l] - beta * actions[l])
        errors[l] = mixed_error(zs[l + 1], targets[l], alpha)
    deltas = {}
    for l, (lin, (w, b)) in enumerate(zip(linears, W)):
        g = errors[l]
        if weight_update == "gradient" and l < 2:
            g = g * (1 - zs[l + 1] ** 2)  # tanh'(a)
        deltas[lin.weight] = ball(g.T @ zs[l] / n, max_norm)
        deltas[lin.bias] = ball(g.mean(0), max_norm)
    for l in (0, 1):
        if error_update == "product":  # ΔE_l = -γ·d_l ⊗ e_{l+1}, in the stored D_{l+1} x D_l layout
            delta = -gamma * errors[l + 1].T @ actions[l] / n
        else:  # γ·ΔW_{l+1}ᵀ: E_l has the layout of nn.Linear's W_{l+1}
            delta = gamma * deltas[linears[l + 1].weight]
        deltas[l] = ball(delta, max_norm)
    return errors, targets, zs, deltas


MLP_CASES = [
    # weight_update, error_update, alpha, max_norm
    ("hebbian", "transpose", 1.0, 0.0),
    ("hebbian", "product", 0.7, 0.0),
    ("gradient", "product", 1.0, 0.0),
    ("gradient", "transpose", 0.3, 0.0),
    ("hebbian", "transpose", 1.0, 0.05),  # the norm-ball binds for most tensors
    ("gradient", "product", 0.7, 0.02),
]


@pytest.mark.parametrize("weight_update,error_update,alpha,max_norm", MLP_CASES)
def test_lra_mlp_matches_the_equations(weight_update, error_update, alpha, max_norm):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=[6, 5], activation="tanh"), (1, 3, 3), 3)
    options = dict(beta=0.3, gamma=0.5, alpha=alpha, max_norm=max_norm, weight_update=weight_update,
                   error_update=error_update, weight_init="gaussian", weight_init_std=0.5)
    rule = make_rule("lra", model, (1, 3, 3), 3, **options)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    x, y = torch.randn(7, 1, 3, 3), torch.randint(0, 3, (7,))
    E = [m.weight for m in rule.error_maps]
    errors, targets, zs, deltas = mlp_reference(linears, E, x, y, **{k: options[k] for k in (
        "beta", "gamma", "alpha", "weight_update", "error_update", "max_norm")})

    assert rule.sources == [1, 2]
    outputs = rule.forward_units(x)
    batch = UnitBatch(x, y, outputs, rule.output_error(outputs[-1][0], y)[1])
    rule.align(batch)
    got = batch.error_units  # the error units, by unit index
    for l in range(3):
        assert_rel_close(got[l], errors[l], 1e-4, f"error units e_{l}")
    if alpha == 1.0:  # e = z - y: the targets themselves
        for l in range(2):
            assert_rel_close(outputs[l][0] - got[l], targets[l], 1e-4, f"target y_{l}")

    rule.train_step(x, y, KeepGrads())
    for i, lin in enumerate(linears):
        assert_rel_close(lin.weight.grad, deltas[lin.weight], 1e-4, f"ΔW_{i}")
        assert_rel_close(lin.bias.grad, deltas[lin.bias], 1e-4, f"Δb_{i}")
    for l, emap in enumerate(rule.error_maps):  # γ is E's learning-rate multiple: the step is γ·lr·grad
        assert_rel_close(options["gamma"] * emap.weight.grad, deltas[l], 1e-4, f"ΔE_{l} ({error_update})")
    if max_norm:
        norms = [p.grad.norm().item() for p in model.parameters()]
        norms += [options["gamma"] * p.grad.norm().item() for p in rule.parameters()]
        assert max(norms) <= max_norm * (1 + 1e-5)
        assert sum(abs(v - max_norm) < 1e-5 * max_norm for v in norms) >= 4, "the ball should bind somewhere"


def test_product_update_sign_grows_d_along_the_error():
    """-γ·d ⊗ e applied as a gradient (θ ← θ - η·Δ) moves E so that ⟨E(e), d⟩ grows."""
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="mlp", hidden=[6, 5]), (1, 3, 3), 3)
    rule = make_rule("lra", model, (1, 3, 3), 3, error_update="product", max_norm=0.0)
    x, y = torch.randn(9, 1, 3, 3), torch.randint(0, 3, (9,))
    outputs = rule.forward_units(x)
    error = rule.output_error(outputs[-1][0], y)[1] * len(y)
    emap = rule.error_maps[1]
    d = emap(error)
    rule.train_step(x, y, KeepGrads())
    assert emap.weight.grad is not None
    moved = emap.weight - 1e-3 * emap.weight.grad
    assert ((error @ moved) * d).sum() > (d * d).sum()


def test_gamma_is_the_error_maps_learning_rate_under_sgd_and_adamw():
    """One real optimizer step moves E by -γ·lr·ball(ΔE) (SGD) and by γ·lr per entry (AdamW's first step,
    which a constant factor in the gradient could not change); W by lr·ball(ΔW)."""
    for name, lr in (("sgd", 0.1), ("adamw", 0.01)):
        torch.manual_seed(2)
        model = build_model(ModelConfig(name="mlp", hidden=[6, 5], activation="tanh"), (1, 3, 3), 3)
        rule = make_rule("lra", model, (1, 3, 3), 3, gamma=0.25, max_norm=0.05, error_update="product")
        optimizer = build_optimizer(OptimConfig(name=name, lr=lr, momentum=0.0, weight_decay=0.0), model, rule)
        E = rule.error_maps[0].weight
        assert {g["lr"] for g in optimizer.param_groups if any(q is E for q in g["params"])} == {0.25 * lr}
        x, y = torch.randn(7, 1, 3, 3), torch.randint(0, 3, (7,))
        keep = copy.deepcopy((model, rule))
        keep[1].train_step(x, y, KeepGrads())
        want = keep[1].error_maps[0].weight.grad
        before = E.detach().clone()
        rule.train_step(x, y, optimizer)
        step = E.detach() - before
        if name == "sgd":
            assert (0.25 * want).norm() <= 0.05 * (1 + 1e-5)  # the ball holds for γ·ΔE, the step's direction
            assert_rel_close(step, -0.25 * lr * want.double(), 1e-4, "SGD step of E")
        else:
            assert torch.allclose(step.abs(), torch.full_like(step, 0.25 * lr), rtol=1e-3)


def test_gamma_zero_keeps_the_error_maps_fixed_and_skips_their_update():
    torch.manual_seed(3)
    net = tiny_resnet()
    rule = make_rule("rec_lra", net, (1, 8, 8), 3, gamma=0.0)
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=0.01, weight_decay=0.1), net, rule)
    assert optimizer.param_groups[0]["lr"] == 0.01  # the group whose lr the loop logs is the model's
    before = [p.detach().clone() for p in rule.parameters()]
    stem_weight = net[0][0].weight.detach().clone()
    rule.train_step(torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,)), optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, rule.parameters()))
    assert all(p.grad is None for p in rule.parameters())
    assert not torch.equal(stem_weight, net[0][0].weight)  # the network still learns


# ---- recursive LRA on residual blocks --------------------------------------------------------------

def tiny_resnet() -> nn.Sequential:
    """stem (4 x 8 x 8), a downsampling BasicBlock (8 x 4 x 4), a BasicBlock, a pooling head."""
    stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    net = nn.Sequential(stem, BasicBlock(4, 8, stride=2, downsample=down), BasicBlock(8, 8), head)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial affine parameters
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return net


def block_pre_activation(block: BasicBlock, params: dict, x: torch.Tensor) -> torch.Tensor:
    """a = bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x), with the given parameters (float64)."""
    def bn(t, name):
        return F.batch_norm(t, None, None, params[f"{name}.weight"], params[f"{name}.bias"], training=True)

    out = torch.relu(bn(F.conv2d(x, params["conv1.weight"], stride=block.stride, padding=1), "bn1"))
    out = bn(F.conv2d(out, params["conv2.weight"], padding=1), "bn2")
    if block.downsample is None:
        return out + x
    return out + bn(F.conv2d(x, params["downsample.0.weight"], stride=block.stride), "downsample.1")


def apply_map(emap: nn.Module, weight: torch.Tensor, e: torch.Tensor, dst_shape) -> torch.Tensor:
    """E's action d, written out per kind (float64)."""
    n = len(e)
    if isinstance(emap, DenseErrorMap):
        return (e.reshape(n, -1) @ weight).reshape(n, *dst_shape)
    if isinstance(emap, ChannelErrorMap):
        pooled = e.flatten(2).mean(2) if e.dim() == 4 else e
        return (pooled @ weight)[:, :, None, None].expand(n, *dst_shape)
    d = F.conv2d(e, weight, padding=weight.shape[-1] // 2)
    return F.interpolate(d, size=dst_shape[1:], mode="nearest")


@pytest.mark.parametrize("error_map,vector_error_map,weight_update,shortcut_feedback", [
    ("conv3x3", "dense", "hebbian", False),
    ("conv3x3", "dense", "hebbian", True),
    ("conv1x1", "channel", "gradient", True),
    ("channel", "dense", "hebbian", False),
])
def test_rec_lra_residual_blocks_match_the_equations(error_map, vector_error_map, weight_update, shortcut_feedback):
    torch.manual_seed(0)
    net = tiny_resnet()
    ref_net = copy.deepcopy(net).double()
    beta, gamma, alpha, alpha_skip = 0.4, 0.3, 0.6, 0.3
    rule = make_rule("rec_lra", net, (1, 8, 8), 3, beta=beta, gamma=gamma, alpha=alpha, alpha_skip=alpha_skip,
                     error_skip_every=2, max_norm=0.0, error_map=error_map, vector_error_map=vector_error_map,
                     weight_update=weight_update, shortcut_feedback=shortcut_feedback)
    assert rule.sources == [1, 3, 3]  # unit 1 is 2 below the output: an error skip; units 0 and 2 adjacent
    # only unit 2 (the second block) has an identity shortcut: it feeds unit 1's target
    assert rule.shortcuts == [False, shortcut_feedback, False]
    kinds = {"conv3x3": ConvErrorMap, "conv1x1": ConvErrorMap, "channel": ChannelErrorMap}
    assert isinstance(rule.error_maps[0], kinds[error_map])
    assert isinstance(rule.error_maps[1], DenseErrorMap if vector_error_map == "dense" else ChannelErrorMap)

    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    n = len(y)
    stem, block1, block2, head = ref_net
    params = [dict(m.named_parameters()) for m in ref_net]
    xd = x.double()
    pre = [stem[1](stem[0](xd))]
    pre.append(block_pre_activation(block1, params[1], torch.relu(pre[0]).detach()))
    pre.append(block_pre_activation(block2, params[2], torch.relu(pre[1]).detach()))
    pre.append(head(torch.relu(pre[2]).detach()))
    zs = [torch.relu(a) for a in pre[:3]] + [pre[3]]
    E = [m.weight.detach().double() for m in rule.error_maps]
    shapes = [tuple(z.shape[1:]) for z in zs]
    errors = [None, None, None, (torch.softmax(pre[3], 1) - F.one_hot(y, 3).double()).detach()]
    actions = [None] * 3
    for l, src in ((2, 3), (1, 3), (0, 1)):
        actions[l] = apply_map(rule.error_maps[l], E[l], errors[src], shapes[l])
        shortcut = errors[2] if shortcut_feedback and l == 1 else 0.0  # y_1 = relu(a_1 - β·d_1 - e_2)
        target = torch.relu(pre[l].detach() - beta * actions[l] - shortcut)
        errors[l] = mixed_error(zs[l].detach(), target, alpha_skip if l == 1 else alpha)

    rule.train_step(x, y, KeepGrads())
    # Hebbian: the local backward of <a_l, e_l>/N; gradient: of <z_l, e_l>/N
    local = [(pre if weight_update == "hebbian" else zs)[l] for l in range(4)]
    for l, unit in enumerate(model_units(net, "layer")[0]):
        names = list(params[l])
        wanted = torch.autograd.grad((local[l] * errors[l]).sum() / n, [params[l][k] for k in names])
        for k, want in zip(names, wanted):
            assert_rel_close(dict(unit[1].named_parameters())[k].grad, want, 1e-4, f"unit {l} Δ{k}")
    for l, src in ((2, 3), (1, 3), (0, 1)):  # ΔE = -γ/N · ∂<E(e_src), d>/∂E
        weight = E[l].clone().requires_grad_()
        d = apply_map(rule.error_maps[l], weight, errors[src], shapes[l])
        (want,) = torch.autograd.grad(-gamma / n * (d * actions[l]).sum(), weight)
        assert_rel_close(gamma * rule.error_maps[l].weight.grad, want, 1e-4, f"ΔE_{l} ({type(rule.error_maps[l]).__name__})")


def test_transpose_update_ties_conv_and_channel_maps_to_the_next_units_first_weight():
    """ΔE_l = γ·ΔW_{l+1}ᵀ on residual blocks: a 3x3 map takes the transposed conv of the next block's
    conv1 (its adjoint at stride 1), the channel map from the output takes the head's dense weight."""
    torch.manual_seed(3)
    net = tiny_resnet()
    rule = make_rule("rec_lra", net, (1, 8, 8), 3, gamma=1.0, error_skip_every=0, error_update="transpose",
                     vector_error_map="channel", max_norm=0.5)
    stem, block1, block2, head = net
    assert rule.tied == [block1.conv1.weight, block2.conv1.weight, head[2].weight]
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    rule.train_step(x, y, KeepGrads())
    for emap, weight in zip(rule.error_maps, rule.tied):
        want = weight.grad.transpose(0, 1).flip(2, 3) if weight.dim() == 4 else weight.grad
        assert torch.linalg.vector_norm(weight.grad) <= 0.5 + 1e-6  # ΔW_{l+1} after its norm-ball
        assert_rel_close(emap.weight.grad, want, 1e-4, "ΔE")
    # E = Wᵀ in this layout feeds back exactly the adjoint of block2.conv1: <conv(z, W), e> = <z, E(e)>
    emap, weight = rule.error_maps[1], block2.conv1.weight.detach()
    with torch.no_grad():
        emap.weight.copy_(weight.transpose(0, 1).flip(2, 3))
        z, e = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
        assert_rel_close((z * emap(e)).sum(), (F.conv2d(z, weight, padding=1) * e).sum(), 1e-4, "adjoint")


def test_error_skip_wiring_on_resnet18():
    model = build_model(ModelConfig(name="resnet18", cifar_stem=True), (3, 8, 8), 10)
    # units: stem, 8 blocks, head (9); skips land m, 2m, ... units below the head
    for m, sources, skip_endpoints in [(0, list(range(1, 10)), []), (1, [9] * 9, list(range(9))),
                                       (2, [1, 9, 3, 9, 5, 9, 7, 9, 9], [1, 3, 5, 7]),
                                       (3, [9, 2, 3, 9, 5, 6, 9, 8, 9], [0, 3, 6])]:
        rule = make_rule("rec_lra", model, (3, 8, 8), 10, error_skip_every=m)
        assert rule.sources == sources, m
        assert [rule.alpha_of(l) for l in range(9)] == [0.19 if l in skip_endpoints else 0.24 for l in range(9)], m
    # identity-shortcut targets: unit l+1 is a block (or stage) without a downsampling shortcut
    rule = make_rule("rec_lra", model, (3, 8, 8), 10, shortcut_feedback=True)
    assert rule.shortcuts == [True, True, False, True, False, True, False, True, False]
    rule = make_rule("rec_lra", model, (3, 8, 8), 10, shortcut_feedback=True, granularity="stage")
    assert rule.shortcuts == [True, False, False, False, False]
    assert not any(make_rule("rec_lra", model, (3, 8, 8), 10).shortcuts)


@pytest.mark.parametrize("block", [BasicBlock(4, 4), Bottleneck(8, 2, stride=2, downsample=nn.Sequential(
    nn.Conv2d(8, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8)))])
def test_pre_activations_give_the_unit_outputs(block):
    block.eval()
    x = torch.randn(2, block.conv1.in_channels, 6, 6)
    pre, activation = split_activation(block)
    assert isinstance(pre, BlockPreActivation) and activation == "relu"
    torch.testing.assert_close(torch.relu(pre(x)), block(x))
    cnn = build_model(ModelConfig(name="cnn", width=4), (1, 8, 8), 3).eval()
    rule = make_rule("rec_lra", cnn, (1, 8, 8), 3)
    state = x = torch.randn(2, 1, 8, 8)
    for plain, aligned in zip(model_units(cnn, "block")[0], rule.units):
        z, a = aligned(state)
        state = plain[1](state)
        torch.testing.assert_close(z, state)
    assert [u.activation for u in rule.units] == ["relu", "relu", "relu", "identity"]


# ---- training and configuration ---------------------------------------------------------------------

ADAMW = {"name": "adamw", "lr": 0.01, "weight_decay": 1e-4}


@pytest.mark.parametrize("rule,model,optim", [
    ({"name": "lra", "weight_init": "model"}, {"name": "mlp", "hidden": [32], "activation": "tanh"}, ADAMW),
    ({"name": "lra", "weight_init": "model"}, {"name": "mlp", "hidden": [32], "activation": "tanh"},
     {"name": "sgd", "lr": 0.2, "schedule": "onecycle"}),
    ({"name": "rec_lra", "alpha": 1.0, "alpha_skip": 1.0}, {"name": "cnn", "width": 4}, ADAMW),
])
def test_training_improves_held_out_accuracy(tmp_path, tiny_npz, rule, model, optim):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule=rule, model=model, optim=optim, train={"epochs": 3})
    result = train(load_recipe(path), tmp_path / "run")
    assert result["accuracy"] > 0.75  # chance is 0.25
    state = torch.load(tmp_path / "run" / "checkpoint.pt")["rule"]
    assert state and all(k.startswith("error_maps.") for k in state)  # E is saved; W stays the model's


@pytest.mark.parametrize("rule,model,message", [
    ({"name": "lra", "beta": 0.0}, {}, "beta must be > 0"),
    ({"name": "lra", "alpha": 1.5}, {}, "alpha must be in [0, 1]"),
    ({"name": "rec_lra", "alpha_skip": -0.1}, {}, "alpha_skip must be in [0, 1]"),
    ({"name": "rec_lra", "max_norm": -1.0}, {}, "max_norm must be >= 0"),
    ({"name": "rec_lra", "error_skip_every": -2}, {}, "error_skip_every must be >= 0"),
    ({"name": "rec_lra", "error_map": "conv5x5"}, {}, "error_map: expected one of 'conv1x1', 'conv3x3', 'channel'"),
    ({"name": "lra", "error_map": "conv1x1"}, {}, "unknown key 'error_map'"),
    ({"name": "lra"}, {"name": "cnn", "width": 4}, "LRA-E takes MLPs"),
    ({"name": "rec_lra", "error_update": "transpose"}, {"name": "cnn", "width": 4}, "error_update = 'transpose'"),
    ({"name": "rec_lra", "error_update": "transpose", "error_skip_every": 0}, {"name": "resnet20"},
     "(no error skip: error_skip_every = 0)"),
    ({"name": "rec_lra", "granularity": "layer"}, {"name": "resnet20"}, "block or stage granularity"),
])
def test_bad_options_are_config_errors(tmp_path, tiny_npz, rule, model, message):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule=rule, model=model)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(load_recipe(path), tmp_path / "run")


def test_model_errors_exit_cleanly_from_the_cli(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "lra"}, model={"name": "cnn", "width": 4})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "use name = 'rec_lra'" in err and "Traceback" not in err
