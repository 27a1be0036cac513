"""Every model's units, at every granularity, compose to exactly the model's forward."""

import pytest
import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.units import GRANULARITIES, model_units, primary, run_units

CASES = [
    ("mlp", {}, (1, 28, 28)),
    ("mlp", {"hidden": [], "activation": "tanh"}, (1, 28, 28)),
    ("cnn", {}, (1, 28, 28)),
    ("cnn", {"width": 8}, (3, 32, 32)),
    ("rnn", {"rnn_cell": "lstm", "rnn_hidden": 16, "rnn_layers": 3}, (1, 28, 28)),
    ("resnet20", {}, (3, 32, 32)),
    ("resnet32", {}, (3, 32, 32)),
    ("resnet56", {}, (3, 32, 32)),
    ("resnet18", {"cifar_stem": True}, (3, 32, 32)),
    ("resnet18", {}, (1, 64, 64)),
    ("resnet34", {"cifar_stem": True}, (3, 32, 32)),
    ("resnet50", {}, (3, 64, 64)),
    ("resnet50", {"cifar_stem": True}, (3, 32, 32)),
]


@pytest.mark.parametrize("name, extra, shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_units_compose_to_the_model(name, extra, shape):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, **extra), shape, num_classes=7).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (3, 7)
        seen_params = None
        for granularity in GRANULARITIES:
            named = model_units(model, granularity)
            torch.testing.assert_close(run_units([u for _, u in named], x), expected, rtol=0, atol=0)
            params = {id(p) for _, u in named for p in u.parameters()}
            assert params == {id(p) for p in model.parameters()}, "units must cover every parameter once"
            if seen_params is not None:
                assert len(named) <= seen_params, "coarser granularity has no more units"
            seen_params = len(named)


def test_resnet_layer_units_carry_the_block_input():
    model = build_model(ModelConfig(name="resnet18", cifar_stem=True), (3, 32, 32), 10).eval()
    named = dict(model_units(model, "layer"))
    assert len(named) == 2 + 8 * 2  # stem, two conv layers per basic block, head
    out = named["layer1.0.conv1"](torch.randn(2, 64, 32, 32))
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 64, 32, 32)
    assert primary(out) is out[0]
    r50 = dict(model_units(build_model(ModelConfig(name="resnet50"), (3, 64, 64), 10), "layer"))
    assert "layer4.2.conv3" in r50 and len(r50) == 2 + 16 * 3


def test_user_sequential_children_are_units():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert [name for name, _ in model_units(net, "block")] == ["0", "1"]
    with pytest.raises(TypeError, match="cannot split a Linear"):
        model_units(nn.Linear(2, 2), "layer")
    with pytest.raises(ValueError, match="granularity must be one of"):
        model_units(net, "neuron")
