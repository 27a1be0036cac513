"""Rule ``trace_bp``: which modules it swaps, that only converted conv weights get estimated
gradients, training, checkpoints that load into the plain model, saved-activation bytes, options."""

import json
import math
import typing

import pytest
import torch
from torch import nn

from kernels import PROBES, CompactBatchNorm2d, MaskReLU, TraceConv2d
from trainer.cli import main
from trainer.config import ConfigError, ModelConfig
from trainer.recipes import load_recipe
from trainer.loop import train
from trainer.models import build_model
from trainer.rules import Rule, RuleContext, RuleError, build_rule, rule_options_class
from trainer.rules.trace_bp import Probe

from conftest import write_recipe

SHAPE, CLASSES = (1, 12, 12), 4
TINY_CNN = {"name": "cnn", "width": 4}


class GradientRecorder:
    """Stands in for an optimizer: keeps the gradients a rule hands to ``step()``."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.grads: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        self.grads = {name: p.grad.clone() for name, p in self.params.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            p.grad = None


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY_CNN), SHAPE, CLASSES)


def make_rule(model: nn.Module, name: str = "trace_bp", **options) -> Rule:
    return build_rule(name, rule_options_class(name)(**options), model, RuleContext(num_classes=CLASSES, input_shape=SHAPE))


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def module_types(model: nn.Module, base: type) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, base)]


@pytest.mark.parametrize("options, convs, relu, bn", [
    ({}, [nn.Conv2d, TraceConv2d], MaskReLU, CompactBatchNorm2d),
    ({"keep_first_exact": False, "compact_bn": False}, [TraceConv2d, TraceConv2d], MaskReLU, nn.BatchNorm2d),
    ({"mask_relu": False, "probes": 4, "probe": "orthogonal"}, [nn.Conv2d, TraceConv2d], nn.ReLU, CompactBatchNorm2d),
])
def test_swaps_convs_relus_and_batch_norms_keeping_the_state_dict_keys(options, convs, relu, bn):
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rule = make_rule(model, **options)
    assert rule.model is model
    assert module_types(model, nn.Conv2d) == convs
    assert set(module_types(model, nn.ReLU)) == {relu} and set(module_types(model, nn.BatchNorm2d)) == {bn}
    trace_convs = [m for m in model.modules() if isinstance(m, TraceConv2d)]
    assert all((m.probes, m.probe) == (options.get("probes", 16), options.get("probe", "gaussian")) for m in trace_convs)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("compact_bn, rtol", [(False, 1e-4), (True, 3e-3)])
def test_only_converted_conv_weights_get_estimated_gradients(compact_bn, rtol):
    """Input gradients stay exact, so every other parameter gets BP's gradient: exactly, or up to the
    fp16 rounding of BN's saved normalized input with compact_bn."""
    x, y = batch()
    exact_model, trace_model = tiny_cnn(), tiny_cnn()
    exact, estimated = GradientRecorder(exact_model), GradientRecorder(trace_model)
    make_rule(exact_model, "bp").train_step(x, y, exact)
    make_rule(trace_model, probes=64, compact_bn=compact_bn).train_step(x, y, estimated)
    converted = "0.1.0.weight"
    for name, grad in exact.grads.items():
        if name != converted:
            torch.testing.assert_close(estimated.grads[name], grad, rtol=rtol, atol=rtol * grad.abs().max().item(), msg=name)
    cosine = nn.functional.cosine_similarity(estimated.grads[converted].flatten(), exact.grads[converted].flatten(), 0)
    assert 0.5 < cosine < 0.9999


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors the forward's autograd graph saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("mask_relu", [False, True])
def test_saves_fewer_activation_bytes_than_backprop(mask_relu):
    """The converted conv keeps Xbar (C_in x r fp32) and an int64 seed instead of its 4x6x6 input;
    MaskReLU adds a 1-bit mask per ReLU output (the cnn's max-pools and dense layers still keep those
    outputs, so here the masks only cost; in conv-BN-ReLU-conv nets they replace them)."""
    n, r = 32, 8
    x, _ = batch(n)
    exact_model, trace_model = tiny_cnn(), tiny_cnn()
    make_rule(exact_model, "bp")
    make_rule(trace_model, probes=r, mask_relu=mask_relu, compact_bn=False)
    conv_input, xbar, seed = n * 4 * 6 * 6 * 4, n * 4 * r * 4, 8
    masks = n * (4 * 12 * 12 + 8 * 6 * 6 + 128) // 8 if mask_relu else 0
    exact, estimated = saved_activation_bytes(exact_model, x), saved_activation_bytes(trace_model, x)
    assert estimated == exact - conv_input + xbar + seed + masks
    assert estimated < exact


def test_compact_bn_halves_what_batch_norms_save():
    """fp32 BN inputs (n x 4x12x12 and n x 8x6x6) become fp16; only per-channel vectors differ besides."""
    n = 32
    x, _ = batch(n)
    fp32_bn, fp16_bn = tiny_cnn(), tiny_cnn()
    make_rule(fp32_bn, compact_bn=False)
    make_rule(fp16_bn, compact_bn=True)
    half_of_bn_inputs = n * (4 * 12 * 12 + 8 * 6 * 6) * 2
    saved = saved_activation_bytes(fp32_bn, x) - saved_activation_bytes(fp16_bn, x)
    assert abs(saved - half_of_bn_inputs) <= 4 * 4 * (4 + 8)  # a few per-channel fp32 vectors


def test_trains_and_its_checkpoint_evaluates_as_the_plain_model(tmp_path, tiny_npz, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch path: 10x faster than the interpreter
    path = write_recipe(tmp_path / "r.toml", tiny_npz, model=TINY_CNN, rule={"name": "trace_bp", "probes": 8},
                        optim={"name": "adamw", "lr": 0.01}, train={"epochs": 3})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held_out = [r["accuracy"] for r in records if r["split"] == "held-out"]
    assert held_out[-1] > 0.9  # chance is 0.25
    first_logged_loss = next(r["loss"] for r in records if r["split"] == "train")
    assert [r for r in records if r["split"] == "held-out"][-1]["train_loss"] < 0.5 * first_logged_loss
    saved = torch.load(tmp_path / "run" / "checkpoint.pt")["model"]
    assert list(saved) == list(tiny_cnn().state_dict())
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(held_out[-1])


def test_probe_choices_are_the_kernels():
    assert typing.get_args(Probe) == PROBES


@pytest.mark.parametrize("rule, model, message", [
    ({"probes": 0}, TINY_CNN, "probes must be >= 1, got 0"),
    ({"probe": "sobol"}, TINY_CNN, "probe: expected one of 'gaussian', 'rademacher', 'orthogonal'"),
    ({}, {"name": "mlp"}, r"no convolution of the model to estimate \(it has no Conv2d\); use rule 'bp'"),
])
def test_bad_options_are_clean_config_errors(tmp_path, tiny_npz, rule, model, message):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "trace_bp", **rule}, model=model)
    with pytest.raises(ConfigError, match=message):
        train(load_recipe(path), tmp_path / "run")


def test_a_model_whose_only_conv_is_kept_exact_is_refused():
    with pytest.raises(RuleError, match=r"\(keep_first_exact leaves its only conv exact\)"):
        make_rule(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(CLASSES)))


def test_unsupported_conv_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(RuleError, match=r"^1: padding_mode='reflect' is not supported"):
        make_rule(model)
    assert type(model[1]) is nn.Conv2d  # nothing swapped


def test_trace_bp_converts_a_zoo_model_with_depthwise_convs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch path
    model = build_model(ModelConfig(name="torchvision:mobilenet_v3_small"), (3, 32, 32), CLASSES)
    rule = make_rule(model)
    assert sum(isinstance(m, TraceConv2d) for m in model.modules()) > 40  # every conv but the first
    assert any(isinstance(m, TraceConv2d) and m.groups > 1 for m in model.modules())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % CLASSES
    losses = [rule.train_step(x, y, optimizer).loss.item() for _ in range(6)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
