"""The models a recipe names: MLP, small CNN, recurrent nets, torchvision and CIFAR ResNets.

How the local rules split them into units is ``trainer.units``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from trainer.config import ModelConfig

class LayeredNet(nn.Sequential):
    """A plain feed-forward net stored as stages of layers (no residual connections)."""


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int], activation: str) -> LayeredNet:
    act = ACTIVATIONS[activation]
    widths = [int(torch.tensor(input_shape).prod())] + list(hidden)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        flatten = [nn.Flatten()] if i == 0 else []
        layers.append(nn.Sequential(*flatten, nn.Linear(d_in, d_out), act()))
    head = [nn.Flatten()] if not hidden else []
    layers.append(nn.Sequential(*head, nn.Linear(widths[-1], num_classes)))
    return LayeredNet(*(nn.Sequential(layer) for layer in layers))


def _cnn(input_shape: tuple[int, ...], num_classes: int, width: int, activation: str) -> LayeredNet:
    """Two conv-BN-act-pool layers and two dense layers: the usual small CNN for MNIST. A bounded
    activation (tanh) keeps rules whose targets never stop pulling (DRTP) from growing without end."""
    channels, height, width_px = input_shape
    act = ACTIVATIONS[activation]

    def conv(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), act(), nn.MaxPool2d(2)
        )

    flat = 2 * width * (height // 4) * (width_px // 4)
    return LayeredNet(
        nn.Sequential(conv(channels, width), conv(width, 2 * width)),
        nn.Sequential(
            nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), act()),
            nn.Sequential(nn.Linear(128, num_classes)),
        ),
    )


class CifarResNet(nn.Module):
    """ResNet-20/32/56 of He et al. (2016) for 32x32 images: 3 stages of 16/32/64 channels.

    Shortcuts that change shape use a 1x1 conv + BN (option B), so the blocks are torchvision's
    BasicBlock and the attribute names match torchvision's ResNet (conv1 ... layer3, avgpool, fc).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        stages, c_in = [], 16
        for i, c_out in enumerate((16, 32, 64)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(blocks_per_stage):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or c_in != c_out:
                    down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=s, bias=False), nn.BatchNorm2d(c_out))
                blocks.append(BasicBlock(c_in, c_out, stride=s, downsample=down))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class RecurrentLayer(nn.Module):
    """One recurrent layer, a unit of its own: a sequence (N, T, F) in, every hidden state (N, T, H) out.

    An image (N, C, H, W) is read row by row first: H time steps of C*W pixels (row-sequential MNIST).
    Only the hidden-state sequence leaves the layer, so the layer above gets no handle on this
    layer's cell state and local rules can cut the graph between layers.
    """

    CELLS = {"elman": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, cell: str, input_size: int, hidden_size: int):
        super().__init__()
        self.rnn = self.CELLS[cell](input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 1, 3).flatten(2)
        return self.rnn(x)[0]


class LastStepReadout(nn.Module):
    """The classifier of a recurrent net: a linear map of the top layer's last hidden state."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(hidden[:, -1])


class RecurrentNet(nn.Sequential):
    """Stacked recurrent layers (layer1 ... layerK) and a last-step readout; its children are the units."""


def _rnn(input_shape: tuple[int, ...], num_classes: int, cell: str, hidden: int, num_layers: int) -> RecurrentNet:
    channels, _, width_px = input_shape
    sizes = [channels * width_px] + [hidden] * num_layers
    layers = {f"layer{i + 1}": RecurrentLayer(cell, d_in, hidden) for i, d_in in enumerate(sizes[:-1])}
    return RecurrentNet(OrderedDict([*layers.items(), ("readout", LastStepReadout(hidden, num_classes))]))


def _torchvision_resnet(name: str, num_classes: int, in_channels: int, cifar_stem: bool) -> torchvision.models.ResNet:
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if cifar_stem or in_channels != 3:
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network named by ``[model]`` for inputs of ``input_shape`` (C, H, W)."""
    if cfg.name == "mlp":
        return _mlp(input_shape, num_classes, cfg.hidden, cfg.activation)
    if cfg.name == "cnn":
        return _cnn(input_shape, num_classes, cfg.width, cfg.activation)
    if cfg.name == "rnn":
        return _rnn(input_shape, num_classes, cfg.rnn_cell, cfg.rnn_hidden, cfg.rnn_layers)
    if cfg.name in ("resnet20", "resnet32", "resnet56"):
        return CifarResNet(int(cfg.name[6:]), num_classes, input_shape[0])
    return _torchvision_resnet(cfg.name, num_classes, input_shape[0], cfg.cifar_stem)
