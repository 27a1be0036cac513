"""Local representation alignment: LRA-E (``lra``, MLPs) and recursive LRA (``rec_lra``, CNNs, ResNets).

Targets travel top-down through learned error maps ``E_l`` instead of ``W^T``, one unit at a time
(Ororbia & Mali 2019; Ororbia et al. 2020/2023; docs/rules.md, "LRA-E and recursive LRA"). Units
``l = 0 … L-1`` (L-1 is the output) have a last pre-activation ``a_l`` and output ``z_l = φ(a_l)``
(``trainer.units.AlignedUnit``)::

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

Every Δ is a gradient-like update written into ``.grad`` (a batch mean) and applied by the loop's
optimizer. γ is E's learning rate relative to W's (``param_options``; E's norm-ball radius is then
c/γ, so the SGD step is exactly ``-η·ball_c(γ·ΔE)``); γ = 0 keeps E fixed. A conv or residual
unit's "Hebbian" update is its local backward with ``e_l`` at ``a_l``. Error skips every m units
(rec_lra) take ``d_l`` from ``e_{L-1}`` with ``α_l = alpha_skip``. Dense E maps run in the fused
kernels (``kernels.local_alignment``: the signal, and for dense layers ΔW with its norm-ball in one
GEMM); other maps use the same equation, ``kernels.lra_error_units``. docs/rules.md §7 has the
whole specification; BENCHMARKS.md the measurements behind the defaults that depart from the papers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kernels import local_signal, local_weight_update, lra_error_units, norm_ball_factor
from trainer.rules.base import ParamOptions, RuleContext, RuleError, UnitBatch, byte_text
from trainer.rules.unit_rule import Unit, UnitOptions, UnitRule
from trainer.rules.error_maps import DenseErrorMap, build_error_map, error_map_layout
from trainer.units import AlignedUnit, State, aligned_unit


@dataclass
class LRAOptions(UnitOptions):
    """LRA-E on MLPs; defaults from the authors' LRA-E code (W ~ N(0, 0.1²), E ~ N(0, 1)); the
    norm-ball radius c = 1 is ours (the code gives none)."""

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
    """Recursive LRA on CNNs and ResNets (units = residual blocks); defaults from the paper's
    Algorithm 1 (β, γ, α, α_skip), error skips every 2 units, E scaled by 1/√fan_in."""

    granularity: Literal["layer", "block", "stage"] = "block"
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


def accumulate_grad(param: nn.Parameter, update: torch.Tensor) -> None:
    """``param.grad += update`` (set when None): a pipeline stage adds up its micro-batches."""
    update = update.to(param.dtype)
    param.grad = update if param.grad is None else param.grad + update


def project_to_ball_(grads: list[torch.Tensor], radius: float) -> None:
    """In place, per tensor: ``Δ ← f·Δ`` with the kernels' norm-ball factor (on the device, no sync)."""
    for g in grads:
        g.mul_(norm_ball_factor(torch.linalg.vector_norm(g.float()), radius).to(g.dtype))


class LocalRepresentationAlignment(UnitRule):
    """LRA-E: every hidden dense unit gets its target from the unit above through a learned E."""

    name = "lra"
    Options = LRAOptions
    per_position = ("its error maps E_l carry one output error vector per sample onto each unit's whole output (its "
                    "fused kernels and targets are per sample); per-position errors would need maps per position, "
                    "which it does not have")
    units: list[AlignedUnit]

    def __init__(self, model: nn.Module, options: LRAOptions, ctx: RuleContext):
        super().__init__(model, options, ctx)
        top = len(self.units) - 1
        self.sources = [self.source_of(l, top) for l in range(top)]
        self.shortcuts = [self.feeds_shortcut(l) for l in range(top)]
        self.error_maps = nn.ModuleList(self.build_error_map(self.output_shapes[src], self.output_shapes[l], l)
                                        for l, src in enumerate(self.sources))
        self.tied = self.tied_weights()  # W_{l+1} of every E_l under the transpose update, else []
        self.init_weights(torch.Generator().manual_seed(ctx.seed + 0x5EED))
        self.fused = [self.is_fused(l) for l in range(top)]
        self.fused_weights = {self.units[l].linear.weight for l in range(top) if self.fused[l]}
        self.weight_params = list({id(p): p for m in self.units for p in m.parameters()}.values())
        self._error_rms: dict[str, torch.Tensor] = {}

    # --- wiring (rec_lra overrides these) ------------------------------------------------------

    def group_units(self, units: list[Unit]) -> list[Unit]:
        """Each unit as ``(z, a)``: its output and pre-activation."""
        aligned = []
        for i, (name, unit) in enumerate(units):
            as_za = aligned_unit(unit, is_output=i == len(units) - 1)
            if as_za is None:
                raise RuleError(f"cannot find the pre-activation of unit {name!r} ({type(unit).__name__}); local "
                                "alignment takes mlp and cnn models, and ResNets at block or stage granularity")
            aligned.append((name, as_za))
        return aligned

    def source_of(self, l: int, top: int) -> int:
        """The unit whose error units make ``d_l``."""
        return l + 1

    def alpha_of(self, l: int) -> float:
        return self.options.alpha

    def feeds_shortcut(self, l: int) -> bool:
        """Whether y_l also takes e_{l+1} through unit l+1's identity shortcut."""
        return False

    def build_error_map(self, src_shape: tuple[int, ...], dst_shape: tuple[int, ...], l: int) -> nn.Module:
        """LRA-E is for MLPs: dense maps only; units with spatial outputs are refused."""
        if len(dst_shape) != 1:
            raise RuleError(f"LRA-E takes MLPs, but unit {self.unit_names[l]!r} has a spatial output; use "
                            "name = 'rec_lra' for conv nets and ResNets")
        return DenseErrorMap(math.prod(src_shape), dst_shape)

    # --- set-up --------------------------------------------------------------------------------

    def tied_weights(self) -> list[nn.Parameter]:
        """``error_update = "transpose"`` ties each E_l to the first weight of unit l+1: those weights
        (none under the product update), checked to be fed back by E_l in its layout."""
        if self.options.error_update != "transpose":
            return []
        tied = []
        for l, (src, emap) in enumerate(zip(self.sources, self.error_maps)):
            weight = self.units[l + 1].first_weight
            if src != l + 1 or weight is None or error_map_layout(emap, weight).shape != emap.weight.shape:
                raise RuleError(
                    f"error_update = 'transpose' sets ΔE_l = γ·ΔW_(l+1)ᵀ, which needs E_l of unit "
                    f"{self.unit_names[l]!r} fed by unit {self.unit_names[l + 1]!r} (no error skip: "
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

    def is_fused(self, l: int) -> bool:
        """Whether unit l's ΔW comes from the fused kernel (a Hebbian dense layer with a dense E)."""
        return (self.options.weight_update == "hebbian" and self.units[l].linear is not None
                and isinstance(self.error_maps[l], DenseErrorMap)
                and not self.shortcuts[l])  # the kernel's target has no shortcut term

    @property
    def learns_errors(self) -> bool:
        return self.options.gamma > 0

    def param_options(self) -> dict[nn.Parameter, ParamOptions]:
        return {p: ParamOptions(lr_scale=self.options.gamma) for p in self.error_maps.parameters()}

    # --- the step's hooks ----------------------------------------------------------------------

    def signal_point(self, index: int, output: State) -> torch.Tensor:
        """Hebbian: e_l enters at the pre-activation a_l; gradient form: at the output z_l."""
        z, a = output
        return a if self.options.weight_update == "hebbian" else z

    def signals(self, batch: UnitBatch) -> list[torch.Tensor | None]:
        """``e_l / N`` for every unit's local backward (None for the fused dense layers, whose ΔW
        ``local_updates`` writes). ``batch.error_units`` gains the error units, ``batch.actions`` E's actions."""
        batch.actions = self.align(batch)
        return [None if l < self.top and self.fused[l] else batch.error_units[l] / batch.samples
                for l in batch.indices()]

    def local_updates(self, batch: UnitBatch) -> None:
        """The fused dense layers' ΔW (the kernel's) and the product-form E updates, from the error
        units ``signals`` formed; and the error units' RMS for ``diagnostics``."""
        errors = batch.error_units
        hidden = [l for l in batch.indices() if l < self.top]
        with torch.no_grad():
            self._error_rms = {self.unit_names[l]: errors[l].float().pow(2).mean().sqrt() for l in hidden}
            for l in hidden:
                if self.fused[l]:
                    self.fused_weight_update(l, batch)
        if self.options.error_update == "product" and self.learns_errors:
            self.product_error_updates(errors, batch.actions, batch.samples)

    def error_sources(self, index: int) -> tuple[int, ...]:
        if index == self.top:
            return ()
        return tuple({self.sources[index], *([index + 1] if self.shortcuts[index] else [])})

    def unit_rule_parameters(self, index: int) -> list[nn.Parameter]:
        return list(self.error_maps[index].parameters()) if index < self.top else []

    def describe_unit(self, index: int) -> list[str]:
        """Its error map E_l (kind, shape, bytes) and the unit whose error units it reads."""
        if index == self.top:
            return []
        emap = self.error_maps[index]
        weight = emap.weight
        return [f"error map E {type(emap).__name__} {' x '.join(map(str, weight.shape))} from unit "
                f"{self.unit_names[self.sources[index]]!r}, {byte_text(weight.numel() * weight.element_size())}"]

    def prepare_pipeline(self, stage_of_unit: list[int], micro_batches: int) -> None:
        """The transpose E update reads ΔW of the unit above, which another stage may hold; the
        fused kernel's norm-ball would clip each micro-batch's ΔW, not the batch's: unfused then."""
        split = [l for l, _ in enumerate(self.tied) if stage_of_unit[l] != stage_of_unit[l + 1]]
        if split:
            raise RuleError(f"error_update = 'transpose' sets ΔE_l = γ·ΔW_(l+1)ᵀ, but unit "
                            f"{self.unit_names[split[0]]!r} and the unit above it are on different pipeline "
                            "stages: use error_update = 'product', or put the stage boundary elsewhere "
                            "(train.stage_boundaries)")
        if micro_batches > 1 and self.options.max_norm > 0:
            self.fused = [False] * len(self.fused)
            self.fused_weights = set()

    def after_backward(self, batch: UnitBatch) -> None:
        """Norm-ball projection of every Δ, and the transpose E update from the projected ΔW."""
        radius = self.options.max_norm
        if radius > 0:
            project_to_ball_([p.grad for p in self.weight_params
                              if p.grad is not None and p not in self.fused_weights], radius)
        if self.learns_errors and self.options.error_update == "transpose":
            with torch.no_grad():
                for emap, weight in zip(self.error_maps, self.tied):
                    emap.weight.grad = error_map_layout(emap, weight.grad).float()
        if self.learns_errors and radius > 0:  # E's step is γ·lr·ΔE: ball_c(γ·ΔE) = γ·ball_(c/γ)(ΔE)
            grads = [p.grad for p in self.error_maps.parameters() if p.grad is not None]  # a stage: its own
            project_to_ball_(grads, radius / self.options.gamma)

    # --- the equations -------------------------------------------------------------------------

    def align(self, batch: UnitBatch) -> dict[int, torch.Tensor | None]:
        """Top-down pass over the batch's units: ``batch.error_units`` gains the error units of every
        unit (the top's are ``N·e``, per sample; those of units above the batch's come in it), and
        each E's action ``d_l`` is returned where the product-form E update needs it (dense maps:
        from the kernel; other maps: with E's graph)."""
        errors = batch.error_units
        errors[self.top] = batch.error * batch.samples
        actions: dict[int, torch.Tensor | None] = {}
        product = self.options.error_update == "product" and self.learns_errors
        for l in reversed([l for l in batch.indices() if l < self.top]):
            z, a = (t.detach() for t in batch.output_of(l))
            emap, upstream = self.error_maps[l], errors[self.sources[l]]
            beta, alpha, activation = self.options.beta, self.alpha_of(l), self.units[l].activation
            if isinstance(emap, DenseErrorMap) and not self.shortcuts[l]:
                n = len(a)
                signal = local_signal("lra", upstream.reshape(n, -1).contiguous(), emap.weight,
                                      a.reshape(n, -1).contiguous(), None, beta=beta, alpha=alpha,
                                      activation=activation, diagnostics=product)
                errors[l], actions[l] = signal.e.view_as(a), signal.d
                continue
            with torch.set_grad_enabled(product):
                d = emap(upstream.detach())
            # the identity shortcut's target moves z_l by -e_{l+1}: y_l = φ(a_l - β·d_l - e_{l+1})
            pull = d.detach() + errors[l + 1].to(d.dtype) / beta if self.shortcuts[l] else d.detach()
            errors[l], actions[l] = lra_error_units(pull, a, z, beta=beta, alpha=alpha, activation=activation)[0], d
        return actions

    def fused_weight_update(self, l: int, batch: UnitBatch) -> None:
        """ΔW = e_lᵀ z_{l-1} / N of a fused dense layer, norm-ball included, and its bias's e_l sum / N."""
        linear, a, n = self.units[l].linear, batch.output_of(l)[1], batch.samples
        rows = len(a)
        update = local_weight_update(
            "lra", batch.error_units[self.sources[l]].reshape(rows, -1).contiguous(), self.error_maps[l].weight,
            a.reshape(rows, -1).contiguous(), None, (batch.input_of(l).reshape(rows, -1) / n).contiguous(),
            beta=self.options.beta, alpha=self.alpha_of(l), activation=self.units[l].activation,
            max_norm=self.options.max_norm or None)
        accumulate_grad(linear.weight, update.dw)
        if linear.bias is not None:
            accumulate_grad(linear.bias, batch.error_units[l].reshape(rows, -1).float().sum(0) / n)

    def product_error_updates(self, errors: dict[int, torch.Tensor], actions: dict[int, torch.Tensor | None],
                              n: int) -> None:
        """ΔE_l = -1/N · Σ_n d_l ⊗ e_src(l) (γ is E's learning-rate multiple): written directly for
        dense maps (D_src x D_dst layout), by one autograd call through the other maps. Accumulated
        into ``.grad``: a pipeline stage adds its micro-batches' parts."""
        tensors, grads = [], []
        for l, d in actions.items():
            emap = self.error_maps[l]
            if isinstance(emap, DenseErrorMap):
                upstream = errors[self.sources[l]].reshape(len(d), -1).float()
                accumulate_grad(emap.weight, -upstream.t() @ d.reshape(len(d), -1).float() / n)
            else:
                tensors.append(d)
                grads.append(-d.detach() / n)
        self.local_backward(tensors, grads)

    def diagnostics(self) -> dict[str, float]:
        """RMS of each hidden unit's error units at the last step (their mean: ``err_rms``)."""
        if not self._error_rms:
            return {}
        values = torch.stack(list(self._error_rms.values())).tolist()
        out = {f"err_rms/{name}": v for name, v in zip(self._error_rms, values)}
        out["err_rms"] = sum(values) / len(values)
        return out


class RecursiveLRA(LocalRepresentationAlignment):
    """Recursive LRA: error units recurse through the blocks of a CNN or ResNet, plus error skips."""

    name = "rec_lra"
    Options = RecLRAOptions

    def source_of(self, l: int, top: int) -> int:
        return top if self.is_skip_endpoint(l, top) else l + 1

    def is_skip_endpoint(self, l: int, top: int) -> bool:
        m = self.options.error_skip_every
        return m > 0 and (top - l) % m == 0

    def alpha_of(self, l: int) -> float:
        top = len(self.units) - 1
        return self.options.alpha_skip if self.is_skip_endpoint(l, top) else self.options.alpha

    def feeds_shortcut(self, l: int) -> bool:
        return self.options.shortcut_feedback and self.units[l + 1].has_identity_shortcut

    def build_error_map(self, src_shape: tuple[int, ...], dst_shape: tuple[int, ...], l: int) -> nn.Module:
        return build_error_map(src_shape, dst_shape, self.options.error_map, self.options.vector_error_map)
