"""Every model's units, at every granularity, compose to exactly the model's forward; models from
torchvision's zoo, a user's factory and the small ViT build for the data or say why not."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.units import GRANULARITIES, chain_units, model_units, primary

CASES = [
    ("mlp", {}, (1, 28, 28)),
    ("mlp", {"hidden": [], "activation": "tanh"}, (1, 28, 28)),
    ("cnn", {}, (1, 28, 28)),
    ("cnn", {"width": 8}, (3, 32, 32)),
    ("rnn", {"rnn_cell": "lstm", "rnn_hidden": 16, "rnn_layers": 3}, (1, 28, 28)),
    ("resnet20", {}, (3, 32, 32)),
    ("resnet20", {"cifar_shortcut": "pad"}, (3, 32, 32)),
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
            named = model_units(model, granularity)[0]
            torch.testing.assert_close(chain_units([u for _, u in named], x), expected, rtol=0, atol=0)
            params = {id(p) for _, u in named for p in u.parameters()}
            assert params == {id(p) for p in model.parameters()}, "units must cover every parameter once"
            if seen_params is not None and granularity != "children":
                assert len(named) <= seen_params, "coarser granularity has no more units"
            seen_params = len(named)


def test_cifar_resnet_pad_shortcut_is_option_a():
    """The subsampled identity with the new channels zero on both sides (He et al.'s option A, as
    biotorch and akamaster's CIFAR ResNets write it), and no 1x1 convolutions left."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet20", cifar_shortcut="pad"), (3, 33, 31), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) for c in convs)
    shortcut = model.layer2[0].downsample
    x = torch.randn(2, 16, 17, 15)
    want = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 32 // 4, 32 // 4))
    assert torch.equal(shortcut(x), want)
    assert len([m for m in build_model(ModelConfig(name="resnet20"), (3, 32, 32), 10).modules()
                if isinstance(m, nn.Conv2d)]) == 21  # "conv": two 1x1 projections


def test_xavier_weight_init_reinitialises_every_conv_and_linear():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", width=8, weight_init="xavier"), (3, 32, 32), 10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 4
    for m in layers:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound  # U(-a, a), a = sqrt(6/(fi+fo))
        assert m.bias is None or torch.equal(m.bias, torch.zeros_like(m.bias))


def test_resnet_layer_units_carry_the_block_input():
    model = build_model(ModelConfig(name="resnet18", cifar_stem=True), (3, 32, 32), 10).eval()
    named = dict(model_units(model, "layer")[0])
    assert len(named) == 2 + 8 * 2  # stem, two conv layers per basic block, head
    out = named["layer1.0.conv1"](torch.randn(2, 64, 32, 32))
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 64, 32, 32)
    assert primary(out) is out[0]
    r50 = dict(model_units(build_model(ModelConfig(name="resnet50"), (3, 64, 64), 10), "layer")[0])
    assert "layer4.2.conv3" in r50 and len(r50) == 2 + 16 * 3


def test_user_sequential_children_are_units():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert [name for name, _ in model_units(net, "block")[0]] == ["0", "1"]
    with pytest.raises(ValueError, match="cannot split a Linear"):
        model_units(nn.Linear(2, 2), "layer")[0]
    with pytest.raises(ValueError, match="granularity must be one of"):
        model_units(net, "neuron")[0]


# --- models from torchvision's zoo, a user's factory, the small ViT ------------------------------


def test_torchvision_builders_take_the_datas_channels_and_classes():
    model = build_model(ModelConfig(name="torchvision:mobilenet_v3_small"), (1, 32, 32), 7)
    assert model.features[0][0].in_channels == 1, "the first conv takes grey images"
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    vit = build_model(ModelConfig(name="vit", vit_depth=2, vit_width=32, vit_heads=2, vit_mlp=64), (1, 28, 28), 10)
    assert vit(torch.zeros(3, 1, 28, 28)).shape == (3, 10) and vit.conv_proj.in_channels == 1


@pytest.mark.parametrize("cfg, shape, message", [
    (ModelConfig(name="torchvision:vgg99"), (3, 32, 32), "torchvision has no classification model 'vgg99'; e.g. vgg11"),
    (ModelConfig(name="torchvision:alexnet"), (3, 12, 12), "torchvision:alexnet cannot take 3x12x12 inputs: features.2 fails"),
    (ModelConfig(name="torchvision:squeezenet1_1", kwargs={"depth": 3}), (3, 64, 64), "[model] kwargs: torchvision:squeezenet1_1 refused"),
    (ModelConfig(name="vit", vit_patch=5), (1, 28, 28), "multiple of vit_patch = 5"),
])
def test_models_that_cannot_take_the_data_say_why(cfg, shape, message):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(cfg, shape, 10)


def test_a_users_factory_from_the_working_directory(tmp_path, tiny_npz, monkeypatch, capsys):
    from trainer.cli import main

    from conftest import write_recipe

    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "def small(num_classes, input_shape, hidden=16):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], hidden),\n"
        "                         nn.ReLU(), nn.Linear(hidden, num_classes))\n"
        "def broken(num_classes, input_shape):\n"
        "    raise RuntimeError('no GPU here')\n"
        "def not_a_model(num_classes, input_shape):\n"
        "    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, model={"name": "python:my_nets:small", "kwargs": {"hidden": 24}},
                          rule={"name": "fa"}, optim={"name": "adamw", "lr": 0.01}, train={"epochs": 2})
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["accuracy"] > 0.6  # chance is 0.25
    for name, message in [("python:my_nets:broken", "raised RuntimeError: no GPU here"),
                          ("python:my_nets:not_a_model", "returned a int, not an nn.Module"),
                          ("python:no_such_module:f", "cannot import 'no_such_module'"),
                          ("python:my_nets:missing", "my_nets has no callable 'missing'")]:
        assert main(["run", str(recipe), "--out", str(tmp_path / name), "--set", f"model.name={name}",
                     "--set", "model.kwargs={}"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_local_rules_refuse_models_they_cannot_split(tmp_path, tiny_npz, capsys):
    from trainer.cli import main

    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, model={"name": "torchvision:mobilenet_v3_small"}, rule={"name": "dfa"},
                          data={"num_classes": 4})
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "cannot split a MobileNetV3 into units" in capsys.readouterr().err


def test_npz_test_path_trains_on_all_of_path(tmp_path, tiny_npz):
    from trainer.config import DataConfig
    from trainer.data import load_images

    from conftest import make_pattern_images

    x, y = make_pattern_images(60, seed=9)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    train, test, name = load_images(DataConfig(name="npz", path=str(tiny_npz), test_path=str(tmp_path / "test.npz"),
                                               val_fraction=0.0))
    assert (len(train.y), len(test.y), name) == (400, 60, "test")


def test_batchnorm_momentum_reaches_every_batch_norm():
    model = build_model(ModelConfig(name="torchvision:mobilenet_v3_small", batchnorm_momentum=0.1), (3, 32, 32), 10)
    momenta = {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}
    default = build_model(ModelConfig(name="torchvision:mobilenet_v3_small"), (3, 32, 32), 10)
    assert {m.momentum for m in default.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}  # torchvision's own
