"""A model as ordered units, for the local learning rules, and each unit's pre-activation.

A unit is a module whose forward takes one argument and returns one value: a tensor, or a tuple
whose first element is the unit's output ``h_l`` and whose other elements are carried along
(inside a residual block at layer granularity, the block input travels to the addition). Running
the units of a model in order gives exactly the model's output. Units share their parameters
with the model and are not registered in it, so the model's state_dict stays torchvision's.

Rules that need a unit's pre-activation ``a_l`` (LRA's targets ``y_l = φ(a_l − β·d_l)``) run it as
an ``AlignedUnit``, which returns ``(z_l, a_l)`` with ``z_l = φ(a_l)``: a trailing ReLU/Tanh/Sigmoid
is split off (a max-pooling after it is moved before it; they commute), ResNet blocks and the stem
are computed up to their final ReLU, and a unit without a trailing activation has ``z = a``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal, Sequence, Union

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from kernels.local_alignment import phi
from trainer.graph_units import children_cuts, cut_units, markers
from trainer.models import CifarResNet, LayeredNet
from trainer.passes import evaluation_mode  # noqa: F401 (re-exported: its home until 0.2.0)

Granularity = Literal["layer", "block", "stage", "children"]
GRANULARITIES: tuple[str, ...] = ("layer", "block", "stage", "children")
State = Union[torch.Tensor, tuple[torch.Tensor, ...]]
Activation = Literal["relu", "tanh", "sigmoid", "identity"]
ACTIVATION_MODULES: dict[type[nn.Module], Activation] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def call_model(model: Callable[..., Any], x: State) -> Any:
    """``model`` on a batch: one input tensor, or the tuple of a forward's several inputs (token ids
    and a mask: ``RuleContext.example_input`` gives their example), passed as its arguments."""
    return model(*x) if isinstance(x, tuple) else model(x)


def batch_length(x: State) -> int:
    """The length of a batch's first dimension (of its first input): N, or T sequence-first."""
    return len(primary(x))


def sample_shape(x: State) -> tuple:
    """A batch's shape less its first dimension; for several inputs, the tuple of each one's."""
    if isinstance(x, tuple):
        return tuple(tuple(t.shape[1:]) for t in x)
    return tuple(x.shape[1:])


def primary(state: State) -> torch.Tensor:
    """The unit output ``h_l`` of a state (the first element of a carried tuple)."""
    return state[0] if isinstance(state, tuple) else state


def detach_state(state: State) -> State:
    """Cut the graph at a unit boundary: every tensor of the state is detached."""
    if isinstance(state, tuple):  # carried values may include plain numbers (sizes read in a forward)
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in state)
    return state.detach()


def block_depth(block: BasicBlock | Bottleneck) -> int:
    """Conv-BN layers of a residual block: 2 in a BasicBlock, 3 in a Bottleneck."""
    return 3 if isinstance(block, Bottleneck) else 2


# --- units at three granularities -------------------------------------------------------------


class ResNetStem(nn.Module):
    """A ResNet's first unit: conv1, bn1, relu and maxpool (an Identity with the CIFAR stem)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class _Head(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.avgpool, self.fc = net.avgpool, net.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _BlockLayer(nn.Module):
    """Layer ``index`` of a residual block: conv-BN(-ReLU), carrying the block input to the sum.

    The first layer takes the block input x and returns (h, x); middle layers map (h, x) to
    (h', x); the last adds the (downsampled) shortcut of x and applies the block's ReLU.
    """

    def __init__(self, block: BasicBlock | Bottleneck, index: int):
        super().__init__()
        self.block, self.index = block, index

    def forward(self, state: State) -> State:
        x, identity = (state, state) if self.index == 0 else state
        n = self.index + 1
        out = getattr(self.block, f"bn{n}")(getattr(self.block, f"conv{n}")(x))
        if n < block_depth(self.block):
            return self.block.relu(out), identity
        if self.block.downsample is not None:
            identity = self.block.downsample(identity)
        return self.block.relu(out + identity)


def _is_resnet(model: nn.Module) -> bool:
    return isinstance(model, (torchvision.models.ResNet, CifarResNet))


def _resnet_units(model: nn.Module, granularity: str) -> list[tuple[str, nn.Module]]:
    stages = [(name, m) for name, m in model.named_children() if name.startswith("layer")]
    body: list[tuple[str, nn.Module]] = []
    for stage_name, stage in stages:
        if granularity == "stage":
            body.append((stage_name, stage))
            continue
        for block_name, block in stage.named_children():
            if granularity == "block":
                body.append((f"{stage_name}.{block_name}", block))
            else:
                body.extend((f"{stage_name}.{block_name}.conv{i + 1}", _BlockLayer(block, i))
                            for i in range(block_depth(block)))
    return [("stem", ResNetStem(model)), *body, ("head", _Head(model))]


def _layered_units(model: LayeredNet, granularity: str) -> list[tuple[str, nn.Module]]:
    if granularity == "stage":
        return list(model.named_children())
    return [
        (f"{stage_name}.{layer_name}", layer)
        for stage_name, stage in model.named_children()
        for layer_name, layer in stage.named_children()
    ]


def model_units(model: nn.Module, granularity: str, cuts: Sequence[str] = (), inputs: int = 1,
                ) -> tuple[list[tuple[str, nn.Module]], str | None]:
    """The model's ordered (name, unit) pairs, and a note on how they were found (or None).

    Named ``cuts`` (``[rule] units``), ``UnitEnd`` markers in the model, or ``granularity =
    "children"``: cut from the model's traced graph (``trainer.graph_units``; any model; a forward
    of ``inputs`` inputs gives a first unit that takes their tuple). Otherwise,
    at ``granularity``: ResNets give stem, then residual blocks (block), their conv layers (layer)
    or their stages (stage), then the head (pooling and classifier); plain nets (mlp, cnn) have no
    blocks, so block equals layer; recurrent nets (an nn.Sequential): each recurrent layer, then the
    readout; any other nn.Sequential: its children.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if cuts or markers(model):
        note = f"units: {len(cuts)} named cuts and {len(markers(model))} UnitEnd markers"
        return cut_units(model, list(cuts), inputs), note
    if granularity == "children":
        chosen, note = children_cuts(model)
        return cut_units(model, chosen, inputs), note
    return _named_units(model, granularity), None


def _named_units(model: nn.Module, granularity: str) -> list[tuple[str, nn.Module]]:
    """The units of the models whose structure is known (ResNets, the trainer's nets, Sequentials)."""
    if _is_resnet(model):
        return _resnet_units(model, granularity)
    if isinstance(model, LayeredNet):
        return _layered_units(model, granularity)
    if isinstance(model, nn.Sequential):  # a user's own net: its children are the units
        return list(model.named_children())
    raise ValueError(
        f"cannot split a {type(model).__name__} into units by granularity = {granularity!r}: name the cuts "
        "([rule] units = [\"features.3\", ...]), use granularity = \"children\", or put UnitEnd markers in its forward"
    )


def cut_landing(name: str, unit: nn.Module) -> str:
    """Where unit ``name`` ends, i.e. after which module or operation its signal enters: what
    ``cut_units`` recorded for a unit cut from the graph, else the unit module itself."""
    return getattr(unit, "cut_after", None) or f"module {name!r} ({type(unit).__name__})"


@torch.no_grad()
def dry_outputs(model: nn.Module, units: Sequence[nn.Module], x: torch.Tensor,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> list[State]:
    """Every unit's output for the input ``x``, in evaluation mode: the shapes and dtypes of what
    the units produce (and, in a pipeline, of the messages between stages)."""
    outputs, state = [], x
    with evaluation_mode(model), autocast():
        for unit in units:
            state = unit(state)
            outputs.append(state)
    return outputs


def used_parameters(unit: nn.Module, output: torch.Tensor) -> list[nn.Parameter]:
    """The parameters of ``unit`` that its ``output`` depends on (autograd; a ResNet layer unit
    holds its whole block as a submodule but uses only its conv and BN)."""
    candidates = list({id(p): p for p in unit.parameters() if p.requires_grad}.values())
    if not candidates or not output.requires_grad:
        return []
    used = torch.autograd.grad(output.sum(), candidates, allow_unused=True)
    return [p for p, g in zip(candidates, used) if g is not None]


def chain_units(units: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run units in order; equals the model's forward. (Not the step engine, ``UnitRule.run_units``.)"""
    state: State = x
    for unit in units:
        state = unit(state)
    return primary(state)


run_units = chain_units  # its name until 0.2.0, which the step engine's shares; kept for one release


# --- units as (z, a): the pre-activation adapters ----------------------------------------------


class BlockPreActivation(nn.Module):
    """A torchvision BasicBlock/Bottleneck up to its final ReLU: ``a = bn(conv(…)) + shortcut(x)``."""

    def __init__(self, block: BasicBlock | Bottleneck):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, out, depth = self.block, x, block_depth(self.block)
        for i in range(1, depth + 1):
            out = getattr(b, f"bn{i}")(getattr(b, f"conv{i}")(out))
            if i < depth:
                out = b.relu(out)
        return out + (x if b.downsample is None else b.downsample(x))


def split_activation(module: nn.Module) -> tuple[nn.Module, Activation] | None:
    """(pre-activation module, φ) with ``module(x) == φ(pre(x))``; None when no trailing φ is found."""
    if isinstance(module, (BasicBlock, Bottleneck)):
        return BlockPreActivation(module), "relu"
    if isinstance(module, ResNetStem):
        pre = nn.Sequential(module.conv1, module.bn1, module.maxpool)  # max-pooling commutes with ReLU
        return pre, "relu"
    if isinstance(module, nn.Sequential) and len(module):
        *body, last = module
        if type(last) in ACTIVATION_MODULES:
            return nn.Sequential(*body), ACTIVATION_MODULES[type(last)]
        if isinstance(last, (nn.MaxPool1d, nn.MaxPool2d)) and body and type(body[-1]) in ACTIVATION_MODULES:
            return nn.Sequential(*body[:-1], last), ACTIVATION_MODULES[type(body[-1])]  # φ is monotone: commutes
        inner = split_activation(last)
        if inner is not None:
            return nn.Sequential(*body, inner[0]), inner[1]
    return None


class AlignedUnit(nn.Module):
    """A unit run as ``(z, a)``: its output ``z = φ(a)`` (the state passed on) and its pre-activation."""

    def __init__(self, pre: nn.Module, activation: Activation):
        super().__init__()
        self.pre, self.activation = pre, activation
        layers = [m for m in pre.children() if not isinstance(m, nn.Flatten)] if isinstance(pre, nn.Sequential) else []
        # a dense layer (the fused weight update's case): pre is [Flatten,] Linear
        self.linear: nn.Linear | None = layers[0] if len(layers) == 1 and isinstance(layers[0], nn.Linear) else None

    def forward(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.pre(primary(state))
        return phi(a, self.activation), a

    @property
    def has_identity_shortcut(self) -> bool:
        """Whether the unit is residual blocks whose shortcuts are all identities (∂a/∂x has an I term)."""
        blocks = list(self.pre) if isinstance(self.pre, nn.Sequential) else [self.pre]
        blocks = [b.block if isinstance(b, BlockPreActivation) else b for b in blocks]
        return bool(blocks) and all(isinstance(b, (BasicBlock, Bottleneck)) and b.downsample is None for b in blocks)

    @property
    def first_weight(self) -> nn.Parameter | None:
        """The weight of the first dense or conv layer: the one that reads the unit below."""
        layer = next((m for m in self.pre.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
        return None if layer is None else layer.weight


def aligned_unit(unit: nn.Module, is_output: bool) -> AlignedUnit | None:
    """``unit`` as ``(z, a)``; None when its pre-activation cannot be found (a hidden unit that is
    neither a Sequential ending in an activation nor a ResNet block or stem)."""
    split = split_activation(unit)
    if split is not None:
        return AlignedUnit(*split)
    if is_output or isinstance(unit, nn.Sequential):
        return AlignedUnit(unit, "identity")  # no trailing activation: z = a
    return None
