"""Feedback-alignment layers (kernels.feedback_alignment) against plain PyTorch: every layer's input
gradient is the reference made with B, weight and bias gradients are the exact local ones, B follows
its mode's rule over steps, seeded B is regenerated and never stored, the converter (forward
bit-identical, keep_exact, refusals), state_dict round trips, autocast, torch.compile, bad input."""

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from kernels._hash import stream_key
from kernels.feedback_alignment import (
    FEEDBACK_STATE_KEYS,
    MODES,
    FeedbackConv2d,
    FeedbackLinear,
    FeedbackMode,
    convert_to_feedback,
    feedback_layers,
    strip_feedback,
)

from conftest import assert_rel_close

RTOL = 1e-5  # float32 reference against the same products
CONFIGS = [("fa", "dense"), ("fa", "seeded"), ("usf", "dense"), ("brsf", "dense"), ("frsf", "dense"),
           ("frsf", "seeded"), ("kp", "dense")]
STATE_KEYS = {  # feedback keys each (mode, storage) adds to a layer's state_dict
    ("fa", "dense"): {"feedback_weight"}, ("fa", "seeded"): {"feedback_scale"},
    ("usf", "dense"): {"feedback_scale"}, ("brsf", "dense"): {"feedback_scale", "feedback_step"},
    ("frsf", "dense"): {"feedback_magnitude"}, ("frsf", "seeded"): {"feedback_scale"},
    ("kp", "dense"): {"feedback_weight"},
}


def conv_net() -> nn.Sequential:
    """Stride, padding (int, 'same', 'valid'), dilation, groups, a depthwise conv, bias or not, odd channels."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False),  # a bias before BN would get ~0 gradient
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 15, (3, 2), padding=(2, 1), dilation=(2, 1), groups=5, bias=False),
        nn.Conv2d(15, 15, 3, padding="same", groups=15),
        nn.ReLU(),
        nn.Conv2d(15, 7, 1, stride=(1, 2), padding="valid"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(7, 3),
    )


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 11, bias=False), nn.ReLU(), nn.Linear(11, 5))


NETS = {"conv": (conv_net, (4, 3, 11, 9)), "mlp": (mlp, (2, 3, 7))}  # the MLP on a 3-d input


def int_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return conv.padding


def input_grad_reference(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dx = B^T * dy in plain PyTorch."""
    if isinstance(layer, nn.Linear):
        return dy @ b
    return torch.nn.grad.conv2d_input(x.shape, b, dy, layer.stride, int_padding(layer), layer.dilation, layer.groups)


def unit_draw(weight: torch.Tensor, key: int, dist: str) -> torch.Tensor:
    """The documented draw, made here independently: a generator seeded with ``key``."""
    gen = torch.Generator().manual_seed(key)
    z = torch.empty_like(weight)
    return z.uniform_(-math.sqrt(3), math.sqrt(3), generator=gen) if dist == "uniform" else z.normal_(generator=gen)


def default_std(weight: torch.Tensor) -> float:
    return 1 / math.sqrt(3 * weight[0].numel())


def random_loss(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.randn_like(y)).sum()


def sgd_steps(model: nn.Module, shape: tuple[int, ...], steps: int, **sgd) -> None:
    opt = torch.optim.SGD(model.parameters(), **({"lr": 0.1} | sgd))
    for _ in range(steps):
        opt.zero_grad()
        random_loss(model(torch.randn(shape))).backward()
        opt.step()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode,storage", CONFIGS)
def test_every_layer_sends_b_back_and_keeps_the_exact_local_gradients(mode, storage, net):
    make, shape = NETS[net]
    model = make()
    plain = copy.deepcopy(model)
    model = convert_to_feedback(model, mode, storage=storage, seed=5)
    layers = feedback_layers(model)
    assert len(layers) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in plain.modules())
    seen = {}
    for name, layer in layers:
        def capture(module, args, out, name=name):
            x = args[0]
            seen[name] = {"x": x.detach()}
            x.register_hook(lambda g: seen[name].__setitem__("dx", g))
            out.register_hook(lambda g: seen[name].__setitem__("dy", g))
        layer.register_forward_hook(capture)
    x = torch.randn(shape, requires_grad=True)
    random_loss(model(x)).backward()
    plain_layers = dict(plain.named_modules())
    for name, layer in layers:
        xs, dx, dy = seen[name]["x"], seen[name]["dx"], seen[name]["dy"]
        b = layer.current_feedback_weight()
        assert not torch.equal(b, layer.weight), name
        assert_rel_close(dx, input_grad_reference(layer, xs, dy, b), RTOL, f"{name} dx")
        ref = plain_layers[name]
        ref(xs).backward(dy)
        assert_rel_close(layer.weight.grad, ref.weight.grad, RTOL, f"{name} dW")
        if ref.bias is not None:
            assert_rel_close(layer.bias.grad, ref.bias.grad, RTOL, f"{name} db")
        if mode == "kp":
            assert torch.equal(layer.feedback_weight.grad, layer.weight.grad), name
            assert layer.feedback_weight.grad.data_ptr() != layer.weight.grad.data_ptr(), name


def test_only_the_gradients_asked_for_are_computed(monkeypatch):
    calls = {"conv2d_input": 0, "conv2d_weight": 0}
    for fn in calls:
        real = getattr(torch.nn.grad, fn)

        def counted(*args, _real=real, _fn=fn, **kwargs):
            calls[_fn] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(torch.nn.grad, fn, counted)
    conv = FeedbackConv2d(3, 4, 3, padding=1, mode="frsf", seed=1)
    plain = nn.Conv2d(3, 4, 3, padding=1)
    plain.load_state_dict(conv.state_dict(), strict=False)
    x = torch.randn(2, 3, 6, 5)
    random_loss(conv(x)).backward()  # x needs no grad
    assert calls == {"conv2d_input": 0, "conv2d_weight": 1}
    conv.zero_grad()
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    xin = x.clone().requires_grad_()
    dy = torch.randn(2, 4, 6, 5)
    conv(xin).backward(dy)
    assert calls == {"conv2d_input": 1, "conv2d_weight": 1}
    assert conv.bias.grad is None
    b = conv.current_feedback_weight()
    assert_rel_close(xin.grad, torch.nn.grad.conv2d_input(x.shape, b, dy, 1, 1), RTOL, "dx")
    kp = FeedbackLinear(5, 3, mode="kp")
    grad_w, grad_b = torch.autograd.grad(random_loss(kp(torch.randn(4, 5))), [kp.weight, kp.feedback_weight])
    assert torch.equal(grad_w, grad_b) and grad_w.data_ptr() != grad_b.data_ptr()  # dB = dW, not aliased
    frozen = nn.Linear(5, 3).requires_grad_(False)
    assert not FeedbackLinear.from_module(frozen, "kp").feedback_weight.requires_grad  # a frozen layer's B too


@pytest.mark.parametrize("mode", ["kp", "brsf"])
def test_exact_eval_and_no_grad_run_the_plain_layer(mode):
    layer = FeedbackConv2d(3, 5, 3, stride=2, padding=1, mode=mode, seed=2)
    plain = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 3, 9, 7)
    layer.exact = True
    assert "exact=True" in repr(layer)
    xin, xref = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(2, 5, 5, 4)
    layer(xin).backward(dy)
    plain(xref).backward(dy)
    assert torch.equal(xin.grad, xref.grad) and torch.equal(layer.weight.grad, plain.weight.grad)
    layer.exact = False
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    layer.eval()
    assert torch.equal(layer(x), plain(x))
    if mode == "kp":
        assert layer.feedback_weight.grad is None  # no feedback backward ran
    else:
        assert layer.feedback_step.item() == 0  # no training forward with feedback ran


def test_bf16_autocast_casts_b_to_the_grad_dtype_and_dw_to_the_weights():
    for layer, shape in ((FeedbackLinear(24, 10, mode="fa", seed=3), (6, 24)),
                         (FeedbackConv2d(4, 6, 3, padding=1, groups=2, mode="fa", seed=3), (2, 4, 7, 7))):
        plain, with_b = copy.deepcopy(layer), copy.deepcopy(layer)
        for m in (plain, with_b):
            m.exact = True
        with torch.no_grad():
            with_b.weight.copy_(layer.current_feedback_weight())
        x = torch.randn(shape)
        outs, xs = [], []
        for m in (layer, plain, with_b):
            xin = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(xin)
            assert y.dtype == torch.bfloat16
            torch.manual_seed(7)
            random_loss(y.float()).backward()
            outs.append(y)
            xs.append(xin)
        assert torch.equal(outs[0], outs[1])
        assert xs[0].grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
        assert_rel_close(xs[0].grad, xs[2].grad, 1e-2, "dx with B")
        assert_rel_close(layer.weight.grad, plain.weight.grad, 1e-2, "dW")
        assert_rel_close(layer.bias.grad, plain.bias.grad, 1e-2, "db")


def test_torch_compile_fullgraph_matches_eager():
    model = nn.Sequential(
        FeedbackConv2d(3, 4, 3, padding=1, mode="brsf", seed=1), nn.ReLU(),
        FeedbackConv2d(4, 4, 3, padding="same", groups=2, mode="fa", storage="seeded", seed=2), nn.Flatten(),
        FeedbackLinear(4 * 5 * 5, 3, mode="kp", seed=3),
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second step draws brsf's next R without recompiling
        x = torch.randn(2, 3, 5, 5)
        dy = torch.randn(2, 3)
        grads = []
        for m, params in ((compiled, model), (eager, eager)):
            params.zero_grad()
            xin = x.clone().requires_grad_()
            y = m(xin)
            y.backward(dy)
            grads.append([y, xin.grad] + [p.grad for p in params.parameters()])
        for i, (got, want) in enumerate(zip(*grads)):
            assert_rel_close(got, want, RTOL, f"tensor {i}")
    assert model[0].feedback_step.item() == eager[0].feedback_step.item() == 2


# ----------------------------------------------------------------------------- B's rules


@pytest.mark.parametrize("storage", ["dense", "seeded"])
def test_fa_and_frsf_feedback_stay_fixed_while_w_trains(storage):
    for mode in ("fa", "frsf"):
        model = convert_to_feedback(conv_net(), mode, storage=storage, seed=4)
        before = {n: (m.current_feedback_weight(), m.weight.detach().clone()) for n, m in feedback_layers(model)}
        sgd_steps(model, (4, 3, 11, 9), steps=3)
        for name, layer in feedback_layers(model):
            b, w = layer.current_feedback_weight(), layer.weight.detach()
            assert not torch.equal(w, before[name][1]), name
            if mode == "fa":
                assert torch.equal(b, before[name][0]), name
            else:  # |R| fixed, signs those of the current W
                assert torch.equal(b, before[name][0].abs() * torch.sign(w)), name


@pytest.mark.parametrize("init", ["default", "xavier", "xavier_uniform", "match"])
def test_usf_is_the_init_std_times_the_sign_of_the_current_w(init):
    model = mlp()
    nn.init.kaiming_normal_(model[2].weight)  # a custom init that 'match' measures
    stds = {"0": model[0].weight.std(correction=0).item(), "2": model[2].weight.std(correction=0).item(),
            "4": model[4].weight.std(correction=0).item()}
    model = convert_to_feedback(model, "usf", init=init)
    sgd_steps(model, (5, 7), steps=2)
    for name, layer in feedback_layers(model):
        w = layer.weight.detach()
        fan_in, fan_out = w.shape[1], w.shape[0]
        s = {"default": 1 / math.sqrt(3 * fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out)),
             "xavier_uniform": math.sqrt(2 / (fan_in + fan_out)), "match": stds[name]}[init]
        assert_rel_close(layer.current_feedback_weight(), s * torch.sign(w), 1e-6, name)


def test_brsf_redraws_the_magnitudes_at_every_training_forward():
    layer = FeedbackLinear(9, 6, mode="brsf", seed=11)
    s = default_std(layer.weight)
    draws = []
    for step in range(1, 4):
        layer(torch.randn(3, 9))
        assert layer.feedback_step.item() == step
        b = layer.current_feedback_weight()
        assert torch.equal(b, layer.current_feedback_weight())  # same step, same B
        want = (torch.tensor(s) * unit_draw(layer.weight, stream_key(11, step), "uniform").abs()) * torch.sign(
            layer.weight.detach())
        assert torch.equal(b, want)
        draws.append(b)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    # Each backward uses its own forward's draw, whatever forwards came after it.
    x1, x2 = torch.randn(3, 9, requires_grad=True), torch.randn(3, 9, requires_grad=True)
    y1 = layer(x1)
    b1 = layer.current_feedback_weight()
    y2 = layer(x2)
    b2 = layer.current_feedback_weight()
    dy = torch.randn(3, 6)
    y1.backward(dy)
    y2.backward(dy)
    assert_rel_close(x1.grad, dy @ b1, RTOL, "first forward's B")
    assert_rel_close(x2.grad, dy @ b2, RTOL, "second forward's B")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_kp_gives_b_w_s_update_so_b_minus_w_decays(optimizer):
    lr, decay = 0.05, 0.1
    model = convert_to_feedback(conv_net(), "kp", seed=6)
    opt = (torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay))
    layers = feedback_layers(model)
    for _ in range(3):
        gaps = [(m.feedback_weight - m.weight).detach().double().norm() for _, m in layers]
        opt.zero_grad()
        random_loss(model(torch.randn(4, 3, 11, 9))).backward()
        opt.step()
        for (name, layer), gap in zip(layers, gaps):
            assert torch.equal(layer.feedback_weight.grad, layer.weight.grad), name
            new_gap = (layer.feedback_weight - layer.weight).detach().double().norm()
            assert abs(new_gap / gap - (1 - lr * decay)) < 1e-5, name
            if optimizer == "adamw":
                state_b, state_w = opt.state[layer.feedback_weight], opt.state[layer.weight]
                assert torch.equal(state_b["exp_avg"], state_w["exp_avg"]), name
                assert torch.equal(state_b["exp_avg_sq"], state_w["exp_avg_sq"]), name


@pytest.mark.parametrize("mode", ["fa", "frsf"])
def test_seeded_feedback_is_regenerated_bit_identically_and_never_stored(mode):
    seeded = FeedbackConv2d(5, 7, 3, groups=1, mode=mode, storage="seeded", seed=123)
    dense = FeedbackConv2d(5, 7, 3, groups=1, mode=mode, storage="dense", seed=123)
    dense.weight = seeded.weight
    b = seeded.current_feedback_weight()
    assert torch.equal(b, seeded.current_feedback_weight())
    assert torch.equal(b, dense.current_feedback_weight())  # the dense B is the same draw, kept
    r = torch.tensor(default_std(seeded.weight)) * unit_draw(seeded.weight, 123, "uniform")
    assert torch.equal(b, r if mode == "fa" else r.abs() * torch.sign(seeded.weight.detach()))
    state = seeded.state_dict()
    assert set(state) == {"weight", "bias", "feedback_scale"} and state["feedback_scale"].dim() == 0
    assert seeded.feedback_nbytes == 0 and dense.feedback_nbytes == seeded.weight.numel() * 4
    assert not any(buf.shape == seeded.weight.shape for buf in seeded.buffers())


@pytest.mark.parametrize("init", ["default", "xavier", "xavier_uniform", "match"])
def test_feedback_is_drawn_from_the_init_distribution(init):
    model = nn.Sequential(nn.Linear(400, 300), nn.Conv2d(32, 48, 5, groups=2))
    for m in model:
        nn.init.kaiming_normal_(m.weight)
    stds = [m.weight.std().item() for m in model]
    model = convert_to_feedback(model, "fa", init=init)
    for (name, layer), std_w in zip(feedback_layers(model), stds):
        b = layer.current_feedback_weight()
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        want = {"default": 1 / math.sqrt(3 * fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out)),
                "xavier_uniform": math.sqrt(2 / (fan_in + fan_out)), "match": std_w}[init]
        assert abs(b.std().item() / want - 1) < 0.02, name
        assert abs(b.mean().item()) < 0.02 * want, name
        if init in ("default", "xavier_uniform"):  # uniform: bounded by sqrt(3) sd
            assert b.abs().max().item() <= math.sqrt(3) * want * (1 + 1e-6), name
        else:  # normal: a 400x300 draw has values beyond sqrt(3) sd
            assert b.abs().max().item() > math.sqrt(3) * want, name


def test_layers_get_their_own_seeds_from_the_base_seed():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    a = convert_to_feedback(copy.deepcopy(model), "fa", seed=1)
    again = convert_to_feedback(copy.deepcopy(model), "fa", seed=1)
    other = convert_to_feedback(copy.deepcopy(model), "fa", seed=2)
    assert a[0].feedback_seed == stream_key(1, 0) and a[1].feedback_seed == stream_key(1, 1)
    assert not torch.equal(a[0].feedback_weight, a[1].feedback_weight)
    assert torch.equal(a[1].feedback_weight, again[1].feedback_weight)
    assert not torch.equal(a[1].feedback_weight, other[1].feedback_weight)


# ----------------------------------------------------------------------------- converter


@pytest.mark.parametrize("mode,storage", CONFIGS)
def test_converted_forward_is_bit_identical(mode, storage):
    for make, shape in NETS.values():
        model = make()
        plain = copy.deepcopy(model)
        convert_to_feedback(model, mode, storage=storage)
        for train in (True, False):
            model.train(train)
            plain.train(train)
            x = torch.randn(shape)
            assert torch.equal(model(x), plain(x)), (make.__name__, train)


def test_torchvision_resnet_and_attention_convert():
    resnet = torchvision.models.resnet18(num_classes=10)
    plain = copy.deepcopy(resnet)
    convert_to_feedback(resnet, "frsf", storage="seeded")
    assert len(feedback_layers(resnet)) == 21  # 20 convs and fc
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(resnet(x), plain(x))
    attention = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 3)})
    convert_to_feedback(attention, "fa")
    assert [name for name, _ in feedback_layers(attention)] == ["head"]
    assert type(attention["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_keep_exact_leaves_named_layers_and_their_children():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(
            stem=nn.Conv2d(3, 4, 3),
            block=nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)),
            block2=nn.Sequential(nn.Conv2d(4, 4, 1)),
            head=nn.Linear(4, 2),
        ))
    model = make()
    kept = [model.stem, model.block[0], model.block[2]]
    convert_to_feedback(model, "fa", seed=9, keep_exact=("stem", "block"))
    assert [model.stem, model.block[0], model.block[2]] == kept and all(type(m) is nn.Conv2d for m in kept)
    assert [name for name, _ in feedback_layers(model)] == ["block2.0", "head"]
    everything = convert_to_feedback(make(), "fa", seed=9)
    assert torch.equal(model.head.feedback_weight, everything.head.feedback_weight)  # same per-layer seeds
    with pytest.raises(ValueError, match=r"keep_exact entries \['blo'\] match no"):
        convert_to_feedback(make(), "fa", keep_exact=["blo"])
    with pytest.raises(TypeError, match="not the str"):
        convert_to_feedback(make(), "fa", keep_exact="stem")


class MyConv(nn.Conv2d):
    pass


class MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize("bad,reason", [
    (nn.Conv1d(4, 4, 3), "Conv1d is not supported"),
    (nn.Conv3d(4, 4, 3), "Conv3d is not supported"),
    (nn.ConvTranspose2d(4, 4, 3), "transposed convolution"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv2d(4, 4, 2, padding="same"), "pads asymmetrically"),
    (MyConv(4, 4, 3), "subclass MyConv"),
    (MyLinear(4, 4), "subclass MyLinear"),
    (nn.LazyLinear(4), "lazy"),
])
def test_unsupported_layers_raise_naming_them_and_nothing_is_swapped(bad, reason):
    model = nn.Sequential(OrderedDict(first=nn.Linear(4, 4), body=nn.Sequential(bad)))
    with pytest.raises(ValueError, match=rf"convert_to_feedback: body\.0: .*{reason}"):
        convert_to_feedback(model, "fa")
    assert type(model.first) is nn.Linear and not feedback_layers(model)
    convert_to_feedback(model, "fa", keep_exact=["body"])
    assert [name for name, _ in feedback_layers(model)] == ["first"]


def test_bad_configurations_are_refused_clearly():
    model = mlp()
    for kwargs, message in [
        ({"mode": "dfa"}, "unknown mode 'dfa'"),
        ({"mode": "fa", "init": "kaiming"}, "unknown init 'kaiming'"),
        ({"mode": "fa", "storage": "packed"}, "unknown storage 'packed'"),
        ({"mode": "usf", "storage": "seeded"}, "usf stores nothing"),
        ({"mode": "brsf", "storage": "seeded"}, r"always regenerated from \(seed, step\)"),
        ({"mode": "kp", "storage": "seeded"}, "kp's B is a trained Parameter"),
        ({"mode": "fa", "seed": -1}, "seed must be an int"),
    ]:
        with pytest.raises(ValueError, match=message):
            convert_to_feedback(model, **kwargs)
    assert not feedback_layers(model)
    with torch.no_grad():
        model[2].weight.fill_(0.5)
    with pytest.raises(ValueError, match=r"convert_to_feedback: 2: init='match' needs a weight with spread"):
        convert_to_feedback(model, "fa", init="match")
    with pytest.raises(ValueError, match="FeedbackLinear.from_module: not an nn.Linear"):
        FeedbackLinear.from_module(nn.Conv2d(2, 2, 1), "fa")
    with pytest.raises(ValueError, match="FeedbackConv2d: padding_mode='circular'"):
        FeedbackConv2d(2, 2, 3, padding_mode="circular")


@pytest.mark.parametrize("storage", ["dense", "seeded"])
def test_a_new_mode_is_one_table_entry(monkeypatch, storage):
    """A sign-concordant variant registered here only, B = s * sign(W) * U with U fixed uniform in
    [0.5, 1.5], trains through convert_to_feedback with dx = B^T dy."""
    half = 0.5 / math.sqrt(3)  # z ~ U(-sqrt 3, sqrt 3), so 1 + half * z ~ U(0.5, 1.5)
    monkeypatch.setitem(MODES, "signed-uniform", FeedbackMode(
        "s * sign(W) * U", lambda w, m: m * torch.sign(w), lambda z, s: s * (1 + half * z), dist="uniform",
        stored_as="feedback_magnitude"))
    model = convert_to_feedback(mlp(), "signed-uniform", init="xavier", storage=storage, seed=7)
    layers = feedback_layers(model)
    start = [layer.weight.detach().clone() for _, layer in layers]
    sgd_steps(model, (5, 7), steps=3)
    seen = {}
    for name, layer in layers:
        def capture(module, args, out, name=name):
            args[0].register_hook(lambda g: seen.__setitem__((name, "dx"), g))
            out.register_hook(lambda g: seen.__setitem__((name, "dy"), g))
        layer.register_forward_hook(capture)
    random_loss(model(torch.randn(5, 7, requires_grad=True))).backward()
    for index, ((name, layer), w0) in enumerate(zip(layers, start)):
        w = layer.weight.detach()
        assert not torch.equal(w, w0), name
        u = 1 + half * unit_draw(w, stream_key(7, index), "uniform")
        assert 0.5 <= u.min() and u.max() <= 1.5
        b = torch.tensor(math.sqrt(2 / sum(w.shape))) * torch.sign(w) * u
        assert_rel_close(layer.current_feedback_weight(), b, 1e-6, f"{name} B")
        assert_rel_close(seen[name, "dx"], seen[name, "dy"] @ b, RTOL, f"{name} dx")
        keys = {k for k in layer.state_dict() if k in FEEDBACK_STATE_KEYS}
        assert keys == ({"feedback_magnitude"} if storage == "dense" else {"feedback_scale"}), name
    assert not any(k.rsplit(".", 1)[1] in FEEDBACK_STATE_KEYS for k in strip_feedback(model.state_dict()))


def test_repr_and_feedback_bytes():
    dense = FeedbackConv2d(3, 4, 3, mode="kp")
    assert "mode='kp', init='default', storage='dense', feedback_bytes=432" in repr(dense)
    assert dense.feedback_nbytes == dense.weight.numel() * dense.weight.element_size()
    assert "storage='none', feedback_bytes=0" in repr(FeedbackLinear(3, 4, mode="usf"))
    assert FeedbackLinear(3, 4, mode="brsf", init="xavier").feedback_nbytes == 0


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mode,storage", CONFIGS)
def test_state_dict_round_trip_restores_b_and_the_step(mode, storage, tmp_path):
    model = conv_net()
    nn.init.kaiming_normal_(model[0].weight)
    plain_keys = set(model.state_dict())
    model = convert_to_feedback(model, mode, init="match", storage=storage, seed=8)
    sgd_steps(model, (4, 3, 11, 9), steps=2)
    keys = set(model.state_dict())
    layer_keys = {f"{name}.{key}" for name, _ in feedback_layers(model) for key in STATE_KEYS[mode, storage]}
    assert keys == plain_keys | layer_keys and all(k.rsplit(".", 1)[1] in FEEDBACK_STATE_KEYS for k in layer_keys)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    torch.manual_seed(1)  # a different init: 'match' measures another std before loading
    fresh = convert_to_feedback(conv_net(), mode, init="match", storage=storage, seed=8)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    for (name, old), (_, new) in zip(feedback_layers(model), feedback_layers(fresh)):
        assert torch.equal(old.current_feedback_weight(), new.current_feedback_weight()), name
        if mode == "brsf":
            assert new.feedback_step.item() == old.feedback_step.item() == 2
    # Resuming continues bit for bit: the next step's gradients agree.
    x, dy = torch.randn(4, 3, 11, 9), torch.randn(4, 3)
    for m in (model, fresh):
        m.zero_grad()
        m(x).backward(dy)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("mode,storage", [("fa", "dense"), ("kp", "dense"), ("brsf", "dense"), ("frsf", "seeded")])
def test_stripped_state_dict_loads_strictly_into_the_plain_model(mode, storage, tmp_path):
    """A converted model's checkpoint, without its feedback state, is the plain model's."""
    model = convert_to_feedback(conv_net(), mode, storage=storage, seed=3)
    sgd_steps(model, (4, 3, 11, 9), steps=2)  # weights and BN statistics move away from a fresh init
    torch.save(model.state_dict(), tmp_path / "converted.pt")
    plain = conv_net()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(torch.load(tmp_path / "converted.pt"), strict=True)
    stripped = strip_feedback(torch.load(tmp_path / "converted.pt"))
    assert not any(key.rsplit(".", 1)[1] in FEEDBACK_STATE_KEYS for key in stripped)
    plain.load_state_dict(stripped, strict=True)
    x = torch.randn(4, 3, 11, 9)
    assert torch.equal(plain.eval()(x), model.eval()(x))


def test_kp_with_an_optimizer_built_before_the_conversion_raises():
    """The optimizer built from the plain model holds W but not B: kp would silently be fa."""
    model = mlp()
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_to_feedback(model, "kp")
    x = torch.randn(8, 7)
    random_loss(model(x)).backward()
    early.step()
    early.zero_grad()
    with pytest.raises(RuntimeError, match=r"optimizer does not hold B.*build the optimizer after convert_to_feedback"):
        model(x)
    with torch.no_grad():
        model.eval()(x)  # evaluation does not train B: nothing to say


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True),
    lambda params: torch.optim.Adam(params, lr=1e-2),
])
def test_kp_with_the_optimizer_built_after_the_conversion_trains_b(make_optimizer):
    model = convert_to_feedback(mlp(), "kp")
    optimizer = make_optimizer(model.parameters())
    before = [layer.feedback_weight.detach().clone() for _, layer in feedback_layers(model)]
    for step in range(4):
        for _ in range(2):  # gradient accumulation: two forwards per step
            random_loss(model(torch.randn(8, 7))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=step % 2 == 0)  # grads kept as zeros on odd steps
    for b, (name, layer) in zip(before, feedback_layers(model)):
        assert not torch.equal(b, layer.feedback_weight), name


def test_match_init_on_a_zero_initialised_layer_names_the_fixes():
    model = mlp()
    nn.init.zeros_(model[4].weight)  # a zero-initialised head, like the trainer's vit
    with pytest.raises(ValueError) as error:
        convert_to_feedback(model, "fa", init="match")
    message = str(error.value)
    assert 'use init="default"' in message  # a Python user's fix
    assert '[rule] feedback_init = "default"' in message  # a recipe user's
    assert "keep_exact=['4']" in message
    convert_to_feedback(model, "fa", init="default")  # which works
