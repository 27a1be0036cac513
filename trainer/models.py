"""The models a recipe names: MLP, small CNN, recurrent nets, a small ViT, torchvision and CIFAR
ResNets, any torchvision classification builder, and a user's own factory.

How the local rules split them into units is ``trainer.units``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from trainer.config import ConfigError, ModelConfig, import_module
from trainer.passes import uncounted_pass

class LayeredNet(nn.Sequential):
    """A plain feed-forward net stored as stages of layers (no residual connections)."""


ANY_SIZE = "another [model] name (mlp, rnn and the resnets take any size)"
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
    if min(height, width_px) < 4:  # checked before its dense layer is made for 0 inputs
        raise ConfigError(f"[model] name: cnn cannot take {height}x{width_px} images: its two 2x2 max-pools need at "
                          f"least 4x4; use larger images or {ANY_SIZE}")
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


class PadShortcut(nn.Module):
    """He et al.'s option A: the identity, subsampled by ``stride`` and zero-padded from ``c_in`` to
    ``c_out`` channels (no parameters, so the exact gradient goes through it under any rule)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.pad, self.stride = c_out - c_in, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class CifarResNet(nn.Module):
    """ResNet-20/32/56 of He et al. (2016) for 32x32 images: 3 stages of 16/32/64 channels.

    Shortcuts that change shape use a 1x1 conv + BN (``shortcut = "conv"``, option B) or the
    subsampled, zero-padded identity (``"pad"``, option A: He et al.'s CIFAR networks, and biotorch's);
    either way the blocks are torchvision's BasicBlock and the attribute names match torchvision's
    ResNet (conv1 ... layer3, avgpool, fc).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, shortcut: str = "conv"):
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
                    down = (PadShortcut(c_in, c_out, s) if shortcut == "pad" else
                            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=s, bias=False), nn.BatchNorm2d(c_out)))
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


def _vit(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    """A small pre-norm vision transformer with a class token (torchvision's VisionTransformer)."""
    _, height, width = input_shape
    if height != width or height % cfg.vit_patch:
        raise ConfigError(f"[model] vit_patch: the vit takes square images whose side is a multiple of vit_patch = "
                          f"{cfg.vit_patch}; the data's images are {height}x{width}")
    return torchvision.models.VisionTransformer(
        image_size=height, patch_size=cfg.vit_patch, num_layers=cfg.vit_depth, num_heads=cfg.vit_heads,
        hidden_dim=cfg.vit_width, mlp_dim=cfg.vit_mlp, num_classes=num_classes)


AUX_HEADS = ("googlenet", "inception_v3")
"""Builders whose models also return auxiliary classifiers' logits in train mode (a named tuple):
built without them (``aux_logits=False``), so they return the main logits as every rule needs;
``init_weights=True`` keeps torchvision's initialisation (and its FutureWarning away)."""


def _torchvision_model(builder: str, num_classes: int, kwargs: dict) -> nn.Module:
    """Any classification builder of torchvision.models, untrained (weights=None: nothing is downloaded)."""
    known = torchvision.models.list_models(module=torchvision.models)
    if builder not in known:
        close = [name for name in known if name.startswith(builder[:3])][:6] or known[:6]
        raise ConfigError(f"[model] name: torchvision has no classification model {builder!r}; e.g. "
                          f"{', '.join(close)} (torchvision.models.list_models())")
    try:
        defaults = {"aux_logits": False, "init_weights": True} if builder in AUX_HEADS else {}
        return torchvision.models.get_model(builder, weights=None, num_classes=num_classes, **{**defaults, **kwargs})
    except Exception as err:  # noqa: BLE001 -- TypeError, ValueError, AssertionError, or whatever a builder raises on a bad value
        raise ConfigError(f"[model] kwargs: torchvision:{builder} refused {kwargs} ({type(err).__name__}: {err})"
                          ) from None


def _user_model(target: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict) -> nn.Module:
    """``package.module:factory`` from the working directory, called with num_classes, input_shape, kwargs."""
    module_name, factory_name = target.split(":")
    factory = getattr(import_module(module_name, "[model] name"), factory_name, None)
    if not callable(factory):
        raise ConfigError(f"[model] name: {module_name} has no callable {factory_name!r}")
    try:
        model = factory(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    except Exception as err:  # noqa: BLE001 -- a user's model: named with its layer
        raise ConfigError(f"[model] name: python:{target}(num_classes={num_classes}, input_shape={tuple(input_shape)}, "
                          f"**{kwargs}) raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"[model] name: python:{target} returned a {type(model).__name__}, not an nn.Module")
    return model


def _fit_input_channels(model: nn.Module, channels: int) -> None:
    """The documented rule for data with other channels than the model's: its first convolution
    is replaced by one taking the data's channels (same geometry, freshly initialised); grey
    digits into a colour model, or RGB into a grey one."""
    for parent in model.modules():
        for key, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != channels and child.groups == 1:
                    conv = nn.Conv2d(channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                     child.dilation, bias=child.bias is not None, padding_mode=child.padding_mode)
                    setattr(parent, key, conv.to(child.weight.dtype))
                return


class _ForwardFailed(Exception):
    """A dry forward that raised: the last layer entered, and the error."""

    def __init__(self, layer: str, err: Exception):
        super().__init__(layer, err)
        self.layer, self.err = layer, err


@torch.no_grad()
def _dry_forward(model: nn.Module, input_shape: tuple[int, ...], training: bool, samples: int = 2) -> object:
    """One forward on ``samples`` blank images (on the model's device) in train or eval mode,
    leaving the model as it was (modes, BatchNorm statistics, the RNGs that dropout draws from);
    _ForwardFailed names the layer."""
    device = next(model.parameters(), torch.empty(0)).device
    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: entered.append(n))
             for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with uncounted_pass(model, training):
            return model(torch.zeros((samples, *input_shape), device=device))
    except Exception as err:  # noqa: BLE001 -- a user's model: named with its layer
        raise _ForwardFailed(entered[-1] if entered else "its first layer", err) from None
    finally:
        for hook in hooks:
            hook.remove()


def _smallest_side(make: Callable[[tuple[int, int, int]], nn.Module], channels: int, training: bool) -> int | None:
    """The smallest square image side (up to 1024) at which ``make(shape)`` builds and runs in this
    mode: doubling, then bisection (sizes that pool to nothing fail below it); None if none runs."""

    def runs(side: int) -> bool:
        shape = (channels, side, side)
        try:
            _dry_forward(make(shape), shape, training)
        except (_ForwardFailed, ConfigError):
            return False
        return True

    high = next((side for side in (2**k for k in range(11)) if runs(side)), None)
    if high is None:
        return None
    low = high // 2  # fails (or is 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if runs(mid) else (mid, high)
    return high


def _check_logits(out: object, name: str, num_classes: int, training: bool, samples: int = 2) -> None:
    """The loss and every rule take (N, C) floating-point logits with C the data's classes, one
    row a sample: a wider output would train its extra classes towards nothing without a word, a
    narrower one, another N or integer scores fail in the loss."""
    mode = "train" if training else "eval"
    if isinstance(out, torch.Tensor) and tuple(out.shape) == (samples, num_classes):
        if out.is_floating_point():
            return
        raise ConfigError(f"[model] name: {name} returns {str(out.dtype).removeprefix('torch.')} logits in {mode} "
                          "mode; the loss and every rule differentiate them: return floating-point scores (drop an "
                          "argmax, round or integer cast at the end of forward)")
    if isinstance(out, torch.Tensor):
        got = f"a {tuple(out.shape)} tensor"
    else:
        got = f"a {type(out).__name__}" + (f" of {len(out)} items" if isinstance(out, (tuple, list, dict)) else "")
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] != samples:
        fix = (f"its output has {out.shape[0]} rows for {samples} images: keep the batch dimension whatever its size "
               "(no batch size written into a reshape, view or slice)")
    elif isinstance(out, torch.Tensor) and out.dim() == 2:
        fix = (f"its output width {out.shape[1]} must be num_classes = {num_classes}: pass num_classes to the "
               "final layer (e.g. nn.Linear(features, num_classes))")
    elif hasattr(out, "logits"):  # torchvision's GoogLeNetOutputs, InceptionOutputs
        fix = "the trainer trains the main logits alone: leave [model] kwargs aux_logits unset"
    else:
        fix = "return the logits alone from forward, flattened to (N, C)"
    raise ConfigError(f"[model] name: {name} returns {got} in {mode} mode for {samples} images; "
                      f"expected (N, C) = ({samples}, {num_classes}) logits, C = num_classes = {num_classes} (the "
                      f"data's classes): {fix}")


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network named by ``[model]`` for inputs of ``input_shape`` (C, H, W), checked by dry
    forwards to take this size and return (N, num_classes) logits; ``weight_init = "xavier"``
    re-initialises every conv and linear layer; every BatchNorm's momentum is
    set when ``batchnorm_momentum`` is (torchvision's MobileNets use 0.01, tuned for long ImageNet
    runs: in a short run their running statistics lag the weights and evaluation collapses)."""
    try:
        model = _build(cfg, input_shape, num_classes)
    except (MemoryError, RuntimeError) as err:  # torch's CPU allocator raises a RuntimeError
        if isinstance(err, RuntimeError) and "can't allocate memory" not in str(err):
            raise
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"[model] name: {cfg.name}'s parameters do not fit in memory ({type(err).__name__}: "
                          f"{reason}); lower its size keys ([model] hidden, width, rnn_hidden, vit_width, vit_mlp or "
                          "kwargs)") from None
    external = cfg.name.partition(":")[0] in ("torchvision", "python")
    for training in (False, True) if external else (False,):  # another's model may differ in train mode (aux heads)
        try:
            out = _dry_forward(model, input_shape, training)
        except _ForwardFailed as failed:
            raise _size_error(cfg, input_shape, num_classes, model, failed, training) from None
        _check_logits(out, cfg.name, num_classes, training)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"[model] name: {cfg.name} has no trainable parameters, so no rule can train it: make its "
                          "layers attributes of the module (self.fc = nn.Linear(...)) or hold them in nn.ModuleList or "
                          "nn.Sequential (not a plain list or dict), and leave requires_grad on")
    if cfg.weight_init == "xavier":
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    if cfg.batchnorm_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.batchnorm_momentum
    return model


def check_training_batch(model: nn.Module, cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int,
                         batch_size: int) -> None:
    """A ``python:`` model's train-mode logits for a batch of the training's size, on its device,
    before the first step: the build check's two images cannot see a forward that depends on the
    batch size (a batch written into a reshape or slice), which would otherwise fail inside the
    rule's first step. The built-in and torchvision models take any batch."""
    if not cfg.name.startswith("python:") or batch_size == 2:
        return
    try:
        out = _dry_forward(model, input_shape, True, batch_size)
    except _ForwardFailed as failed:
        reason = " ".join(str(failed.err).split())[:200]
        raise ConfigError(f"[model] name: {cfg.name} fails in train mode on a training batch of {batch_size} images "
                          f"although it takes 2: {failed.layer} fails ({type(failed.err).__name__}: {reason}); keep "
                          "the batch dimension whatever its size (no batch size written into a reshape, view or "
                          "slice)") from None
    _check_logits(out, cfg.name, num_classes, True, batch_size)


def _size_error(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int, model: nn.Module,
                failed: _ForwardFailed, training: bool) -> ConfigError:
    """A size the model cannot take, refused at build time naming the layer that fails and the
    smallest size that runs, not deep in the first training step."""
    kind = cfg.name.partition(":")[0]
    if kind == "torchvision":  # built for any size: only the input changes
        smallest = _smallest_side(lambda shape: model, input_shape[0], training)
    else:
        smallest = _smallest_side(lambda shape: _build(cfg, shape, num_classes), input_shape[0], training)
    needs = f"; it needs images of at least {smallest}x{smallest}" if smallest else ""
    other = "a model built for this size (e.g. [model] kwargs)" if kind in ("torchvision", "python") else ANY_SIZE
    reason = " ".join(str(failed.err).split())[:200]
    return ConfigError(f"[model] name: {cfg.name} cannot take {'x'.join(map(str, input_shape))} inputs: {failed.layer} "
                       f"fails ({type(failed.err).__name__}: {reason}){needs}: use larger images ([data] image_size "
                       f"for image folders) or {other}")


def _build(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Models from torchvision or a user's factory take the data's channels (``_fit_input_channels``)."""
    kind, _, target = cfg.name.partition(":")
    if kind in ("torchvision", "python"):
        if kind == "torchvision":
            model = _torchvision_model(target, num_classes, cfg.kwargs)
        else:
            model = _user_model(target, input_shape, num_classes, cfg.kwargs)
        _fit_input_channels(model, input_shape[0])
        return model
    if cfg.name == "vit":
        model = _vit(input_shape, num_classes, cfg)
        _fit_input_channels(model, input_shape[0])
        return model
    if cfg.name == "mlp":
        return _mlp(input_shape, num_classes, cfg.hidden, cfg.activation)
    if cfg.name == "cnn":
        return _cnn(input_shape, num_classes, cfg.width, cfg.activation)
    if cfg.name == "rnn":
        return _rnn(input_shape, num_classes, cfg.rnn_cell, cfg.rnn_hidden, cfg.rnn_layers)
    if cfg.name in ("resnet20", "resnet32", "resnet56"):
        return CifarResNet(int(cfg.name[6:]), num_classes, input_shape[0], cfg.cifar_shortcut)
    return _torchvision_resnet(cfg.name, num_classes, input_shape[0], cfg.cifar_stem)
