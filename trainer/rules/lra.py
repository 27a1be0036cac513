"""Local representation alignment: LRA-E (``lra``, MLPs) and recursive LRA (``rec_lra``, CNNs, ResNets).

Targets travel top-down through learned error maps ``E_l`` instead of ``W^T``, one unit at a time
(Ororbia & Mali 2019; Ororbia et al. 2020/2023; ALGORITHMS.md, "LRA-E and recursive LRA"). Units
``l = 0 … L-1`` (L-1 is the output) have a last pre-activation ``a_l`` and output ``z_l = φ(a_l)``::

    e_{L-1} = softmax(ŷ) - y*                              output error units, per sample
    for l = L-2 … 0:
        d_l = E_l(e_src(l))                                src(l) = l+1, or L-1 for error skips
        y_l = φ(a_l - β·d_l [- e_{l+1}])                   target of z_l ([…]: shortcut_feedback)
        e_l = α_l·(z_l - y_l) + (1 - α_l)·sign(z_l - y_l)  error units (L2/L1 mix)
    ΔW_l = e_l ⊗ z_{l-1}                                   weight_update = "hebbian": e_l sent to a_l
         or ∂/∂θ_l of the mixed local loss, y_l fixed      weight_update = "gradient": e_l sent to z_l
    ΔE_l = -γ·d_l ⊗ e_src(l)                               error_update = "product"
         or  γ·ΔW_{l+1}ᵀ                                   error_update = "transpose" (the LRA-E code's)
    every Δ: Δ ← c·Δ/‖Δ‖ if ‖Δ‖ ≥ c                        norm-ball projection, c = max_norm

Conventions. Every Δ is a gradient-like update: it is written into ``.grad`` (a batch mean, so
learning rates mean what they mean for BP) and the loop's optimizer applies θ ← θ - η·Δ (AdamW or
SGD, with their schedules). γ is E's learning rate relative to W's: ΔE goes into ``.grad`` without γ
and the E maps get an optimizer group with ``lr = γ·optim.lr`` and a norm-ball radius of c/γ, so the
step is exactly ``-η·ball_c(γ·ΔE)`` under SGD, and γ still acts under AdamW, which would cancel a
constant factor in the gradient; γ = 0 keeps E fixed (its update is then not computed). A unit's
"Hebbian" update for a conv layer or a residual block is the local backward with ``e_l`` at ``a_l``
(for a dense layer exactly ``e_lᵀ z_{l-1}``); the ``"gradient"`` form sends ``e_l`` to ``z_l``,
which adds ``φ'(a_l)``. Error skips every m units (rec_lra): the units at distance m, 2m, … below
the output take ``d_l`` from ``e_{L-1}`` (error skip connections); all others from the unit above.
``α_l`` is ``alpha_skip`` at skip endpoints and ``alpha`` elsewhere. Forward skips are the residual
connections inside ResNet blocks: a block's ``a_l = bn(conv(…)) + shortcut(x)``, so its error units
train the residual and the shortcut branches alike, and "recursive" means every block produces the
error units of the block (or stem) below it. With ``shortcut_feedback`` the recursion also runs
through the identity shortcuts: where block l+1 adds its input unchanged, moving z_l by -e_{l+1}
moves a_{l+1} by exactly its error units, so that is added to z_l's target (the identity's inverse
is itself: no weight transport). Along the identities the error units then keep their size instead
of shrinking by β per block; downsampling shortcuts (a strided conv) pass nothing.

Pre-activations are read from the units without touching the models: a trailing ReLU/Tanh/Sigmoid
of a unit is split off (max-pooling after it is moved before it; they commute), ResNet blocks and
the stem are computed up to their final ReLU, and a unit without a trailing activation (the head)
has ``z = a``.

Error maps E_l (parameters of the rule: trained by the loop's optimizer, saved in checkpoints):
from a vector to a vector, a dense matrix; between conv units (``error_map``) a 1x1 conv, a 3x3
conv, or a channel map (spatial mean, C_src x C_dst matrix, broadcast), each resampled (nearest)
to the target's size; from a vector (the output, a dense unit) to a conv unit
(``vector_error_map``) a dense matrix, or a channel map broadcast over positions (what BP through
global average pooling gives; the affordable one for ImageNet ResNets, where a dense matrix from
1000 classes to a 56x56 block would hold 800M entries).
The transpose E update ties E_l to the first weight of unit l+1, fed back through its transpose:
a 3x3 map is the transposed conv of a BasicBlock's conv1 (channels swapped, kernel flipped), a
dense or channel map from the output takes the head's dense weight; E_l must be fed by unit l+1.

The fused kernel (``kernels.local_alignment``) computes, for every unit whose E is a dense matrix,
``d``, the target and the error units in one pass (``local_signal``); for dense layers trained by
the Hebbian form it also computes ``ΔW = e_lᵀ z_{l-1}`` with its norm-ball projection in one GEMM
whose prologue recomputes the signal (``local_weight_update``). Conv maps and residual blocks go
through PyTorch and one autograd call over the disjoint unit graphs.

Defaults (the spec's values where it gives them; the deviations were measured on mnist5k):
- ``lra`` (the authors' LRA-E code): β = 0.1, γ = 1, α = 1, E update γ·ΔW_{l+1}ᵀ, W ~ N(0, 0.1²),
  E ~ N(0, 1), Hebbian updates. The spec gives no radius: c = 1 (10 epochs: 96.2% with it, 95.0%
  without). On standardised pixels N(0, 0.1²) saturates tanh: the recipe keeps the model's init
  (93.8% → 96.8%). The product E update trains worse here than the transpose (91.0% vs 95.2%).
- ``rec_lra`` (the paper via a port citing its Algorithm 1, pp. 15-16): β = 0.12, γ = 0.15,
  α = 0.24 and 0.19 at skip endpoints, E update -γ·d ⊗ e, Hebbian updates, c = 1, error skips
  every 2 units (the port's m; the spec gives none). Two deviations: W keeps the model's init
  (unit-Gaussian W, ``weight_init = "gaussian"``: 45.8% on the CNN against 97.6%), and E is a unit
  Gaussian scaled by 1/√fan_in (``error_init = "fan_in"``; ``"gaussian"`` is the paper's), because
  the unscaled one multiplies the error units by about β·√fan_in per unit of the recursion (≈ 8
  per 3x3 map between ResNet-18's 512-channel blocks). The L1 mix α = 0.24 / 0.19 gives every
  active unit a full-size sign error even for samples the network already gets right: on the CNN
  it reaches 80.8% after 3 epochs against 92.6% with α = 1, so the recipes set α = 1. The CIFAR
  ResNet-18 recipe keeps E fixed (γ = 0): learned by the product update under AdamW, E ended 8
  epochs with entries 7-15x their init and 2.6 points lower (two seeds; BENCHMARKS.md, issue 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from kernels import local_signal, local_weight_update
from trainer.config import ConfigError
from trainer.models import State, ResNetStem, primary
from trainer.rules.base import RuleContext, StepResult, UnitRule

Activation = Literal["relu", "tanh", "sigmoid", "identity"]
ACTIVATION_MODULES: dict[type[nn.Module], Activation] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
PHI: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda a: a,
}


# --- options -------------------------------------------------------------------------------------


@dataclass
class LRAOptions:
    """LRA-E on MLPs; defaults from the authors' LRA-E code (module docstring)."""

    beta: float = 0.1  # β: how far the target y_l = φ(a_l - β·d_l) moves from z_l
    gamma: float = 1.0  # γ: E's learning rate as a multiple of optim.lr (0: E stays fixed)
    alpha: float = 1.0  # α: L2 share of the error units (1: e = z - y; 0: e = sign(z - y))
    max_norm: float = 1.0  # c: norm-ball radius of every Δ (per tensor); 0 = no projection
    weight_update: Literal["hebbian", "gradient"] = "hebbian"
    error_update: Literal["product", "transpose"] = "transpose"  # -γ·d ⊗ e, or γ·ΔW_{l+1}ᵀ
    weight_init: Literal["model", "gaussian"] = "gaussian"  # gaussian: conv/linear W ~ N(0, std²), biases 0
    weight_init_std: float = 0.1
    error_init: Literal["gaussian", "fan_in"] = "gaussian"  # E ~ N(0, std²), or N(0, std²/fan_in)
    error_init_std: float = 1.0

    def validate(self) -> None:
        checks = [
            (self.beta > 0, f"beta must be > 0 (β = 0 makes every target equal its output), got {self.beta}"),
            (self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}"),
            (0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.max_norm >= 0, f"max_norm must be >= 0 (0: no norm-ball projection), got {self.max_norm}"),
            (self.weight_init_std > 0, f"weight_init_std must be > 0, got {self.weight_init_std}"),
            (self.error_init_std > 0, f"error_init_std must be > 0, got {self.error_init_std}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class RecLRAOptions(LRAOptions):
    """Recursive LRA on CNNs and ResNets (units = residual blocks); defaults from the paper's port."""

    granularity: Literal["layer", "block", "stage"] = "block"  # ResNets: block or stage
    beta: float = 0.12
    gamma: float = 0.15
    alpha: float = 0.24
    alpha_skip: float = 0.19  # α at the endpoints of error skips
    error_skip_every: int = 2  # m: units at distance m, 2m, … below the output take d from e_{L-1}; 0 = none
    error_update: Literal["product", "transpose"] = "product"
    weight_init: Literal["model", "gaussian"] = "model"
    weight_init_std: float = 1.0
    error_map: Literal["conv1x1", "conv3x3", "channel"] = "conv3x3"  # E between conv units
    vector_error_map: Literal["dense", "channel"] = "dense"  # E from a vector error to a conv unit
    error_init: Literal["gaussian", "fan_in"] = "fan_in"
    shortcut_feedback: bool = False  # y_l also moves by -e_{l+1} where unit l+1 has an identity shortcut

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.alpha_skip <= 1:
            raise ValueError(f"alpha_skip must be in [0, 1], got {self.alpha_skip}")
        if self.error_skip_every < 0:
            raise ValueError(f"error_skip_every must be >= 0 (0: no error skips), got {self.error_skip_every}")


# --- units as (z, a) -----------------------------------------------------------------------------


class BlockPreActivation(nn.Module):
    """A torchvision BasicBlock/Bottleneck up to its final ReLU: ``a = bn(conv(…)) + shortcut(x)``."""

    def __init__(self, block: BasicBlock | Bottleneck):
        super().__init__()
        self.block = block
        self.depth = 3 if isinstance(block, Bottleneck) else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, out = self.block, x
        for i in range(1, self.depth + 1):
            out = getattr(b, f"bn{i}")(getattr(b, f"conv{i}")(out))
            if i < self.depth:
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
        return PHI[self.activation](a), a


def align_unit(unit: nn.Module, name: str, is_output: bool, rule: str) -> AlignedUnit:
    split = split_activation(unit)
    if split is not None:
        return AlignedUnit(*split)
    if is_output or isinstance(unit, nn.Sequential):
        return AlignedUnit(unit, "identity")  # no trailing activation: z = a
    raise ConfigError(
        f"[rule] (rule {rule!r}): cannot find the pre-activation of unit {name!r} ({type(unit).__name__}); "
        "local alignment takes mlp and cnn models, and ResNets at block or stage granularity"
    )


def has_identity_shortcut(unit: AlignedUnit) -> bool:
    """Whether a unit is residual blocks whose shortcuts are all identities (then ∂a/∂x has an I term)."""
    pre = unit.pre
    blocks = list(pre) if isinstance(pre, nn.Sequential) else [pre]
    blocks = [b.block if isinstance(b, BlockPreActivation) else b for b in blocks]
    return bool(blocks) and all(isinstance(b, (BasicBlock, Bottleneck)) and b.downsample is None for b in blocks)


def first_weight(unit: AlignedUnit) -> nn.Parameter | None:
    """The weight of the first dense or conv layer of a unit: the one that reads the unit below."""
    layer = next((m for m in unit.pre.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    return None if layer is None else layer.weight


# --- error maps E_l --------------------------------------------------------------------------------


class DenseErrorMap(nn.Module):
    """``d = flatten(e) @ weight``, weight D_src x D_dst (the kernel's ``P`` layout)."""

    def __init__(self, src_dim: int, dst_shape: tuple[int, ...]):
        super().__init__()
        self.dst_shape, self.fan_in = dst_shape, src_dim
        self.weight = nn.Parameter(torch.empty(src_dim, math.prod(dst_shape)))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return (e.flatten(1).to(self.weight.dtype) @ self.weight).view(-1, *self.dst_shape)


class ConvErrorMap(nn.Module):
    """``d = resample(conv_k(e))``: a k x k conv from C_src to C_dst channels, then nearest resampling
    to the target's size (computed at the source's resolution, the cheaper side going down)."""

    def __init__(self, src_channels: int, dst_shape: tuple[int, ...], kernel_size: int):
        super().__init__()
        self.dst_shape, self.fan_in = dst_shape, src_channels * kernel_size**2
        self.conv = nn.Conv2d(src_channels, dst_shape[0], kernel_size, padding=kernel_size // 2, bias=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        d = self.conv(e.to(self.weight.dtype))
        if tuple(d.shape[2:]) != tuple(self.dst_shape[1:]):
            d = F.interpolate(d, size=self.dst_shape[1:], mode="nearest")
        return d


class ChannelErrorMap(nn.Module):
    """``d[c, h, w] = Σ_c' mean_hw(e)[c'] · weight[c', c]``: the same per-channel signal at every position."""

    def __init__(self, src_channels: int, dst_shape: tuple[int, ...]):
        super().__init__()
        self.dst_shape, self.fan_in = dst_shape, src_channels
        self.weight = nn.Parameter(torch.empty(src_channels, dst_shape[0]))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        pooled = e.flatten(2).mean(2) if e.dim() > 2 else e
        d = pooled.to(self.weight.dtype) @ self.weight
        return d[:, :, None, None].expand(-1, -1, *self.dst_shape[1:])


def error_map_layout(emap: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A forward weight W_{l+1} (or its update) as the E_l that feeds its transpose back: dense and
    channel maps store E as D_src x D_dst, nn.Linear's layout; a conv map is W's transposed conv
    (in/out channels swapped, kernel flipped)."""
    return weight.transpose(0, 1).flip(2, 3) if isinstance(emap, ConvErrorMap) else weight


def build_error_map(src_shape: tuple[int, ...], dst_shape: tuple[int, ...], error_map: str,
                    vector_error_map: str) -> nn.Module:
    """E from a unit of output shape ``src_shape`` to one of ``dst_shape`` (per-sample shapes)."""
    if len(dst_shape) != 3:
        return DenseErrorMap(math.prod(src_shape), dst_shape)
    if len(src_shape) != 3:
        if vector_error_map == "channel":
            return ChannelErrorMap(math.prod(src_shape), dst_shape)
        return DenseErrorMap(math.prod(src_shape), dst_shape)
    if error_map == "channel":
        return ChannelErrorMap(src_shape[0], dst_shape)
    return ConvErrorMap(src_shape[0], dst_shape, 1 if error_map == "conv1x1" else 3)


def error_units(d: torch.Tensor, a: torch.Tensor, z: torch.Tensor, beta: float, alpha: float,
                activation: str) -> torch.Tensor:
    """``e = α(z - y) + (1 - α)sign(z - y)``, ``y = φ(a - β·d)``: the kernel's LRA epilogue, for the
    E maps it does not take (convs and channel maps)."""
    diff = z.float() - PHI[activation](a.float() - beta * d.float())
    return alpha * diff + (1 - alpha) * torch.sign(diff)


def project_to_ball_(grads: list[torch.Tensor], radius: float) -> None:
    """In place, per tensor: ``Δ ← c·Δ/‖Δ‖`` where ``‖Δ‖ ≥ c`` (on the device, no host sync)."""
    for g in grads:
        norm = torch.linalg.vector_norm(g.float())
        g.mul_((radius / norm.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0).to(g.dtype))


# --- the rules ---------------------------------------------------------------------------------------


class LocalRepresentationAlignment(UnitRule):
    """LRA-E: every hidden dense unit gets its target from the unit above through a learned E."""

    name = "lra"
    Options = LRAOptions
    dense_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, options: LRAOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        # the (z, a) units replace the plain ones (their lazy compile never runs) and are compiled instead
        top = len(self.units) - 1
        self._units = [align_unit(unit, name, i == top, self.name)
                       for i, (name, unit) in enumerate(zip(self.unit_names, self.units))]
        self.sources = [self.source_of(l, top) for l in range(top)]
        self.shortcuts = [getattr(options, "shortcut_feedback", False) and has_identity_shortcut(self._units[l + 1])
                          for l in range(top)]  # y_l also takes e_{l+1} through unit l+1's identity shortcut
        shapes = self.output_shapes
        self.check_model(shapes)
        self.error_maps = nn.ModuleList(  # lra has no map options: it takes MLPs, whose maps are all dense
            build_error_map(shapes[src], shapes[l], getattr(options, "error_map", "conv3x3"),
                            getattr(options, "vector_error_map", "dense"))
            for l, src in enumerate(self.sources)
        )
        self.tied = self.tied_weights()  # W_{l+1} of every E_l under the transpose update, else []
        generator = torch.Generator().manual_seed(ctx.seed + 0x5EED)
        self.init_weights(generator)
        if ctx.compile:
            for unit in self._units:
                unit.compile()
        self._weight_params = list({id(p): p for m in self._units for p in m.parameters()}.values())
        self._error_rms: torch.Tensor | None = None

    # wiring: overridden by rec_lra ------------------------------------------------------------------

    def source_of(self, l: int, top: int) -> int:
        """The unit whose error units make ``d_l``."""
        return l + 1

    def alpha_of(self, l: int) -> float:
        return self.options.alpha

    def check_model(self, shapes: list[tuple[int, ...]]) -> None:
        """LRA-E is for MLPs: refuse units with spatial outputs (rec_lra has error maps for them)."""
        spatial = [n for n, s in zip(self.unit_names, shapes) if len(s) != 1]
        if spatial and self.dense_only:
            raise ConfigError(f"[rule] (rule 'lra'): LRA-E takes MLPs, but unit {spatial[0]!r} has a spatial "
                              "output; use name = 'rec_lra' for conv nets and ResNets")

    # set-up ----------------------------------------------------------------------------------------------

    def tied_weights(self) -> list[nn.Parameter]:
        """``error_update = "transpose"`` ties each E_l to the first weight of unit l+1: those weights
        (none under the product update), checked to be fed back by E_l in its layout."""
        tied: list[nn.Parameter] = []
        if self.options.error_update != "transpose":
            return tied
        for l, (src, emap) in enumerate(zip(self.sources, self.error_maps)):
            weight = first_weight(self._units[l + 1])
            if src != l + 1 or weight is None or error_map_layout(emap, weight).shape != emap.weight.shape:
                raise ConfigError(
                    f"[rule] (rule {self.name!r}) error_update = 'transpose' sets ΔE_l = γ·ΔW_(l+1)ᵀ, which needs "
                    f"E_l of unit {self.unit_names[l]!r} fed by unit {self.unit_names[l + 1]!r} (no error skip: "
                    "error_skip_every = 0) and shaped as the transpose of that unit's first weight (a dense layer "
                    "for dense and channel maps, a 3x3 conv such as a BasicBlock's conv1 for 3x3 maps); "
                    "use error_update = 'product'")
            tied.append(weight)
        return tied

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """E always (``error_init``); W of linear/conv layers when ``weight_init = "gaussian"``."""
        opts = self.options
        for emap in self.error_maps:
            std = opts.error_init_std / (math.sqrt(emap.fan_in) if opts.error_init == "fan_in" else 1.0)
            emap.weight.copy_(torch.randn(emap.weight.shape, generator=generator) * std)
        if opts.weight_init == "gaussian":
            for module in self.model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * opts.weight_init_std)
                    if module.bias is not None:
                        module.bias.zero_()

    # the step --------------------------------------------------------------------------------------------

    @property
    def learns_errors(self) -> bool:
        return self.options.gamma > 0

    def lr_scales(self) -> dict[nn.Parameter, float]:
        return {p: self.options.gamma for p in self.error_maps.parameters()}

    def fused(self, l: int) -> bool:
        """Whether unit l's ΔW comes from the fused kernel (a Hebbian dense layer with a dense E)."""
        return (self.options.weight_update == "hebbian" and l < len(self.error_maps)
                and self.units[l].linear is not None and isinstance(self.error_maps[l], DenseErrorMap)
                and not self.shortcuts[l])  # the kernel's target has no shortcut term

    def signals(self, outputs: list[State], error: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The error units ``e_l`` of every unit (``error`` is the loss gradient, so over N)."""
        return self.align(outputs, error * len(y))[0]

    def align(self, outputs: list[State], top_error: torch.Tensor
              ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Top-down pass: the error units of every unit, and each E's action ``d_l`` where it is needed
        for the product-form E update (dense maps: from the kernel; other maps: with E's graph)."""
        errors: list[torch.Tensor] = [top_error] * len(outputs)
        actions: list[torch.Tensor | None] = [None] * len(self.error_maps)
        product = self.options.error_update == "product" and self.learns_errors
        for l in reversed(range(len(self.error_maps))):
            z, a = outputs[l]
            emap, upstream = self.error_maps[l], errors[self.sources[l]]
            beta, alpha, activation = self.options.beta, self.alpha_of(l), self.units[l].activation
            if isinstance(emap, DenseErrorMap) and not self.shortcuts[l]:
                n = len(a)
                signal = local_signal("lra", upstream.reshape(n, -1).contiguous(), emap.weight,
                                      a.reshape(n, -1).contiguous(), None, beta=beta, alpha=alpha,
                                      activation=activation, diagnostics=product)
                errors[l], actions[l] = signal.e.view_as(a), signal.d
            else:
                with torch.set_grad_enabled(product):
                    d = emap(upstream.detach())
                # the identity shortcut's target moves z_l by -e_{l+1}: y_l = φ(a_l - β·d_l - e_{l+1})
                pull = d.detach() + errors[l + 1].to(d.dtype) / beta if self.shortcuts[l] else d.detach()
                errors[l], actions[l] = error_units(pull, a.detach(), z.detach(), beta, alpha, activation), d
        return errors, actions

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        outputs = self.forward_units(x)
        logits = primary(outputs[-1])
        loss, error = self.output_error(logits, y)
        n = len(y)
        with torch.no_grad():
            errors, actions = self.align(outputs, error * n)
        projected = self.fused_weight_updates(x, outputs, errors, n)
        self.local_updates(outputs, errors, actions, n)
        radius = self.options.max_norm
        if radius > 0:
            project_to_ball_([p.grad for p in self._weight_params if p.grad is not None and p not in projected], radius)
        if self.learns_errors and self.options.error_update == "transpose":
            self.transpose_error_updates()
        if self.learns_errors and radius > 0:  # E's step is γ·lr·ΔE: ball_c(γ·ΔE) = γ·ball_(c/γ)(ΔE)
            project_to_ball_([p.grad for p in self.error_maps.parameters()], radius / self.options.gamma)
        with torch.no_grad():
            self._error_rms = torch.stack([e.float().pow(2).mean().sqrt() for e in errors[:-1]])
        self.step(optimizer)
        return StepResult(loss, logits.detach())

    @torch.no_grad()
    def fused_weight_updates(self, x: torch.Tensor, outputs: list[State], errors: list[torch.Tensor],
                             n: int) -> set[nn.Parameter]:
        """ΔW = e_lᵀ z_{l-1} / N of the fused dense layers, norm-ball included; returns those weights."""
        done: set[nn.Parameter] = set()
        radius = self.options.max_norm or None
        for l, unit in enumerate(self.units):
            if not self.fused(l):
                continue
            z_prev = x if l == 0 else primary(outputs[l - 1])
            a = outputs[l][1]
            emap = self.error_maps[l]
            update = local_weight_update(
                "lra", errors[self.sources[l]].reshape(n, -1).contiguous(), emap.weight, a.reshape(n, -1).contiguous(),
                None, (z_prev.reshape(n, -1) / n).contiguous(), beta=self.options.beta, alpha=self.alpha_of(l),
                activation=unit.activation, max_norm=radius)
            unit.linear.weight.grad = update.dw.to(unit.linear.weight.dtype)
            if unit.linear.bias is not None:
                unit.linear.bias.grad = errors[l].reshape(n, -1).float().mean(0).to(unit.linear.bias.dtype)
            done.add(unit.linear.weight)
        return done

    def local_updates(self, outputs: list[State], errors: list[torch.Tensor], actions: list[torch.Tensor | None],
                      n: int) -> None:
        """One autograd call: every other unit's local backward (e_l/N at a_l or z_l) and the
        product-form updates of the dense maps (written directly) and of the conv maps (by autograd)."""
        at_pre = self.options.weight_update == "hebbian"
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for l, ((z, a), e) in enumerate(zip(outputs, errors)):
            if not self.fused(l):
                tensors.append(a if at_pre else z)
                grads.append(e / n)
        if self.options.error_update == "product" and self.learns_errors:
            scale = -1.0 / n  # γ is E's learning-rate multiple (lr_scales)
            for l, (emap, d) in enumerate(zip(self.error_maps, actions)):
                if isinstance(emap, DenseErrorMap):  # ΔE = -1/N · Σ_n e_src ⊗ d, in the D_src x D_dst layout
                    upstream = errors[self.sources[l]].reshape(n, -1).float()
                    emap.weight.grad = scale * upstream.t() @ d.reshape(n, -1).float()
                else:
                    tensors.append(d)
                    grads.append(scale * d.detach())
        self.local_backward(tensors, grads)

    @torch.no_grad()
    def transpose_error_updates(self) -> None:
        """ΔE_l = ΔW_{l+1}ᵀ (γ is in E's learning rate), ΔW_{l+1} being the first weight's projected update."""
        for emap, weight in zip(self.error_maps, self.tied):
            emap.weight.grad = error_map_layout(emap, weight.grad).float()

    def diagnostics(self) -> dict[str, float]:
        """RMS of each hidden unit's error units at the last step (their mean: ``err_rms``)."""
        if self._error_rms is None:
            return {}
        values = self._error_rms.tolist()
        out = {f"err_rms/{name}": v for name, v in zip(self.unit_names, values)}
        out["err_rms"] = sum(values) / len(values)
        return out


class RecursiveLRA(LocalRepresentationAlignment):
    """Recursive LRA: error units recurse through the blocks of a CNN or ResNet, plus error skips."""

    name = "rec_lra"
    Options = RecLRAOptions
    dense_only = False

    def source_of(self, l: int, top: int) -> int:
        return top if self.is_skip_endpoint(l, top) else l + 1

    def is_skip_endpoint(self, l: int, top: int) -> bool:
        m = self.options.error_skip_every
        return m > 0 and (top - l) % m == 0

    def alpha_of(self, l: int) -> float:
        top = len(self.units) - 1
        return self.options.alpha_skip if self.is_skip_endpoint(l, top) else self.options.alpha
