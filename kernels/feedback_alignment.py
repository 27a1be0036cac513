"""Weight-transport baselines: Linear and Conv2d layers whose input gradient uses a feedback weight B.

Math. With ``y = W * x + b`` (a matmul, or a convolution ``*``), backprop's input gradient is
``dx = W^T * dy`` (for a conv, ``conv2d_input(x.shape, W, dy, stride, padding, dilation, groups)``).
These rules send the error back through a feedback weight B of W's shape instead::

    dx = B^T * dy              (conv: conv2d_input(x.shape, B, dy, ...))
    dW = dy (x) x              (the exact local gradient; conv: conv2d_weight)
    db = sum dy

Only the layers' input gradients change: BatchNorm, activations, pooling, residual additions and
attention backpropagate as usual. Modes (biotorch's names, Sanfiz & Akrout 2021), with R a draw
from W's initialisation distribution and s that distribution's standard deviation:

* ``fa``   feedback alignment (Lillicrap et al. 2016, Nat. Commun.): B = R, drawn once, fixed.
* ``usf``  uniform sign-concordant feedback (Liao, Leibo & Poggio 2016, AAAI): B = s * sign(W),
  recomputed from the current W at every backward.
* ``brsf`` batchwise random-magnitude sign-concordant feedback (Moskovitz, Litwin-Kumar & Abbott
  2018, arXiv:1812.06488): B = |R| (.) sign(W), R drawn afresh at every training forward.
* ``frsf`` fixed random-magnitude sign-concordant feedback (same paper): B = |R| (.) sign(W), R fixed.
* ``kp``   Kolen-Pollack (Akrout et al. 2019, NeurIPS): B starts as fa's and is an ``nn.Parameter``
  whose gradient is exactly dW, so one optimizer gives B and W the same update (SGD with weight
  decay l: ``B <- (1 - lr l) B - lr dW`` and ``W <- (1 - lr l) W - lr dW``; identical moments under
  momentum and Adam), and B - W decays by ``(1 - lr l)`` a step. So the optimizer must hold B:
  build it after the conversion. An eager training forward raises where W was stepped since the
  last one but B, which has a gradient, was not (an optimizer built before; version counters only,
  no host sync).

Each mode is one entry of the table :data:`MODES`, a :class:`FeedbackMode`: how B is made from W
and the mode's own tensor M (R, |R|, or s), how M is drawn, whether it may be kept dense or
regenerated from the seed, whether it is redrawn every batch, and whether it learns (kp). The
layers, the autograd function and the converter read only the entry, so a new mode (another
sign-concordant variant, say) is one more entry.

Initialisation (``init``), which fixes R's distribution and s (fan_in = C_in/groups * kernel numel):
``"default"`` is PyTorch's own init of Linear/Conv2d weights, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
(s = 1/sqrt(3 fan_in)); ``"xavier"`` is N(0, 2/(fan_in + fan_out)) and ``"xavier_uniform"`` the uniform
distribution of that variance (biotorch's, ``nn.init.xavier_uniform_``); ``"match"`` is N(0, std(W)^2)
with W's std measured when the layer is made (for models with their own init, e.g. kaiming).

Storage (``storage``) and memory per layer, beyond the plain layer's:

* fa:   ``"dense"`` keeps B (buffer ``feedback_weight``: W's bytes); ``"seeded"`` keeps nothing and
  regenerates B at each backward from the layer's seed with a ``torch.Generator`` on W's device
  (bit-identical every time on the same device; CPU and CUDA streams differ).
* usf:  nothing (B is made from W at each backward).
* brsf: nothing; R is regenerated from (seed, step), where ``feedback_step`` is a persistent int64
  counter of training forwards, so a checkpoint/resume reproduces the same draws (reading the
  step on the host syncs a CUDA device once per layer and backward).
* frsf: ``"dense"`` keeps |R| (buffer ``feedback_magnitude``: W's bytes); ``"seeded"`` regenerates it.
* kp:   B is a Parameter (W's bytes, plus its gradient and optimizer state, like W's).

Regenerated modes keep s as a 0-d buffer ``feedback_scale`` (so ``"match"`` survives a
checkpoint). This state is in the model's ``state_dict`` next to the plain layer's keys;
:func:`strip_feedback` removes it, for loading into the plain model with ``strict=True``. Every
mode makes one W-sized B transiently during backward. The forward is ``F.linear`` /
``F.conv2d`` unchanged (bit-identical outputs); evaluation, a forward without autograd, or
``exact = True`` run the plain layer (backprop, for alignment diagnostics).
Pure PyTorch (an ``autograd.Function``; the seeded draw is the op
``torch.ops.bpfree.feedback_draw``), so ``torch.compile`` traces it; under autocast B is cast to
the gradient's dtype and dW is returned in W's dtype.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from kernels._dispatch import define_op
from kernels._hash import stream_key
from kernels._modules import check_module, int_padding, name_under, swap_modules, unsupported_conv2d

__all__ = [
    "FEEDBACK_STATE_KEYS",
    "FeedbackConv2d",
    "FeedbackLinear",
    "FeedbackMode",
    "INITS",
    "MODES",
    "STORAGES",
    "convert_to_feedback",
    "feedback_layers",
    "strip_feedback",
]

INITS = ("default", "xavier", "xavier_uniform", "match")
UNIFORM_INITS = ("default", "xavier_uniform")  # R drawn uniform; the others draw it normal
"""Distributions R (and the scale s) are drawn from."""
STORAGES = ("dense", "seeded")
"""How a mode's random part M is kept where it may be either (:meth:`FeedbackMode.refuses_seeded`)."""
FEEDBACK_STATE_KEYS = ("feedback_weight", "feedback_magnitude", "feedback_scale", "feedback_step")
"""Names of the buffers/Parameter a feedback layer may add to the plain layer's state_dict:
B (fa dense, kp), |R| (frsf dense), s (usf, brsf, seeded fa/frsf) and the brsf step counter."""

_SQRT3 = math.sqrt(3.0)

Conv = tuple[tuple[int, int], str | tuple[int, int], tuple[int, int], int]
"""A conv's (stride, padding as given to F.conv2d, dilation, groups)."""


def _itself(weight: Tensor, m: Tensor) -> Tensor:
    return m


def _signed(weight: Tensor, m: Tensor) -> Tensor:
    return m * torch.sign(weight)


def _scaled(z: Tensor, s: Tensor) -> Tensor:
    return s * z


def _magnitude(z: Tensor, s: Tensor) -> Tensor:
    return (s * z).abs_()


@dataclass(frozen=True)
class FeedbackMode:
    """One row of :data:`MODES`: how a mode makes B, keeps it, redraws it and whether it learns.

    ``feedback(W, M)`` is B from the current W and the mode's own tensor M. ``draw(z, s)`` makes M
    from a unit-variance draw z of W's shape (``dist``: "uniform" U(-sqrt 3, sqrt 3) or "normal";
    None: the init's) and the init's std s; without ``draw``, M is s (nothing random, only s kept).
    A dense M is kept under ``stored_as``; ``redraw="batch"`` regenerates it from (seed, step) at
    every training forward instead; ``learned`` makes it an nn.Parameter with gradient dW, which is
    Kolen-Pollack's update only where B is M (``feedback=_itself``). ``formula`` is B for messages.
    """

    formula: str
    feedback: Callable[[Tensor, Tensor], Tensor]
    draw: Callable[[Tensor, Tensor], Tensor] | None = None
    dist: Literal["uniform", "normal"] | None = None
    stored_as: Literal["feedback_weight", "feedback_magnitude"] = "feedback_weight"
    redraw: Literal["never", "batch"] = "never"
    learned: bool = False

    def __post_init__(self) -> None:
        if self.learned and (self.draw is None or self.redraw != "never"):
            raise ValueError("a learned B starts from a draw and is never redrawn")

    def kept(self, storage: str) -> str:
        """What a layer keeps of M between steps, for the ``storage`` asked: "dense", "seeded" or "none"."""
        if self.draw is None:
            return "none"
        return "seeded" if self.redraw == "batch" else storage

    def refuses_seeded(self, name: str) -> str | None:
        """Why mode ``name`` cannot take storage="seeded", or None when it can."""
        if self.draw is None:
            return f"{name} stores nothing (B = {self.formula} is made from W at every backward)"
        if self.redraw == "batch":
            return f"{name} is always regenerated from (seed, step)"
        if self.learned:
            return f"{name}'s B is a trained Parameter, so it is always dense"
        return None


MODES: dict[str, FeedbackMode] = {
    "fa": FeedbackMode("R", _itself, _scaled),
    "usf": FeedbackMode("s * sign(W)", _signed),
    "brsf": FeedbackMode("|R| * sign(W)", _signed, _magnitude, redraw="batch"),
    "frsf": FeedbackMode("|R| * sign(W)", _signed, _magnitude, stored_as="feedback_magnitude"),
    "kp": FeedbackMode("R, learned", _itself, _scaled, learned=True),
}
"""The feedback modes (biotorch's names), one entry each; a new mode is one more entry."""


def _check_config(op: str, mode: str, init: str, storage: str, seed: int) -> FeedbackMode:
    """``mode``'s table entry, after checking the arguments."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}; expected one of {tuple(MODES)}")
    if init not in INITS:
        raise ValueError(f"{op}: unknown init {init!r}; expected one of {INITS}")
    if storage not in STORAGES:
        raise ValueError(f"{op}: unknown storage {storage!r}; expected one of {STORAGES}")
    refusal = MODES[mode].refuses_seeded(mode)
    if storage == "seeded" and refusal is not None:
        seeded = ", ".join(name for name, rule in MODES.items() if rule.refuses_seeded(name) is None)
        raise ValueError(f"{op}: storage='seeded' is only for {seeded}; {refusal}: use storage='dense'")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")
    return MODES[mode]


# ---------------------------------------------------------------------------------------------
# Drawing R and making B
# ---------------------------------------------------------------------------------------------


@define_op("bpfree::feedback_draw")
def feedback_draw(weight: Tensor, seed: int, step: Optional[Tensor], dist: str) -> Tensor:
    """A unit-variance draw of ``weight``'s shape, dtype and device (``dist`` "uniform": U(-sqrt 3,
    sqrt 3); "normal": N(0, 1)) from a generator seeded with ``seed``, or with
    ``stream_key(seed, step)`` when a 0-d ``step`` is given (brsf). A custom op: the host-side
    generator stays out of ``torch.compile``'s graphs."""
    key = seed if step is None else stream_key(seed, int(step))
    generator = torch.Generator(device=weight.device).manual_seed(key)
    z = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return z.uniform_(-_SQRT3, _SQRT3, generator=generator) if dist == "uniform" else z.normal_(generator=generator)


@torch.library.register_fake(feedback_draw)
def _feedback_draw_fake(weight, seed, step, dist):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _init_std(weight: Tensor, init: str) -> float:
    """s, the standard deviation of ``init``'s distribution for this weight."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    if init == "default":
        return 1.0 / math.sqrt(3.0 * fan_in)
    if init in ("xavier", "xavier_uniform"):
        return math.sqrt(2.0 / (fan_in + fan_out))
    std = weight.detach().float().std(correction=0).item()
    if not std > 0:
        raise ValueError(f"init='match' needs a weight with spread to measure, but std(W) = {std} (a constant "
                         f"weight, e.g. zero-initialised); use init=\"default\" or \"xavier\"")
    return std


def _feedback(mode: FeedbackMode, weight: Tensor, stored: Tensor | None, scale: Tensor | None,
              step: Tensor | None, seed: int, dist: str) -> Tensor:
    """B by ``mode``: ``stored`` is the dense M, or None where M is regenerated (from ``step`` when
    given) or is the scale s."""
    if stored is None:
        stored = scale if mode.draw is None else mode.draw(feedback_draw(weight, seed, step, dist), scale)
    return mode.feedback(weight, stored)


class _FeedbackFunction(torch.autograd.Function):
    """Exact linear/conv forward; backward with ``dx = B^T * dy``, exact dW and db, and dB = dW (kp)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None,
                stored: Tensor | None, scale: Tensor | None, step: Tensor | None, mode: FeedbackMode, seed: int,
                dist: str, conv: Conv | None) -> Tensor:
        if conv is None:
            y = F.linear(x, weight, bias)
        else:
            stride, padding, dilation, groups = conv
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x if weight_grad else None, weight, stored, scale, step)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.rule, ctx.conv = (mode, seed, dist), conv
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple:
        x, weight, stored, scale, step = ctx.saved_tensors
        needs = ctx.needs_input_grad
        conv, dtype = ctx.conv, grad_output.dtype  # under autocast, dy is half precision and W fp32
        if conv is not None:
            stride, padding, dilation, groups = conv
            padding = int_padding(padding, tuple(weight.shape[2:]), dilation)
        grad_x = grad_w = grad_b = None
        if needs[0]:
            fb = _feedback(ctx.rule[0], weight, stored, scale, step, *ctx.rule[1:]).to(dtype)
            if conv is None:
                grad_x = grad_output @ fb
            else:
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, fb, grad_output, stride, padding, dilation, groups)
            grad_x = grad_x.to(ctx.input_dtype)
        if needs[1] or needs[3]:
            if conv is None:
                dy = grad_output.reshape(-1, grad_output.shape[-1])
                grad_w = dy.t() @ x.reshape(-1, x.shape[-1]).to(dtype)
            else:
                grad_w = torch.nn.grad.conv2d_weight(x.to(dtype), weight.shape, grad_output, stride, padding,
                                                     dilation, groups)
            grad_w = grad_w.to(weight.dtype)
        if ctx.bias_dtype is not None and needs[2]:
            # a linear layer's input may be 1-d (one sample): sum over every position but the features
            dy = grad_output.reshape(-1, grad_output.shape[-1]) if conv is None else grad_output
            grad_b = dy.sum(0 if conv is None else (0, 2, 3)).to(ctx.bias_dtype)
        # kp: its own tensor, or torch.autograd.grad returns one tensor as both W's and B's gradient
        # (and in-place gradient ops such as clipping would apply twice).
        grad_fb = grad_w.clone() if needs[3] else None
        return grad_x, grad_w if needs[1] else None, grad_b, grad_fb, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot become a feedback layer, or None when it can."""
    if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
        return "uninitialized lazy parameters are not supported; run a forward pass first"
    if isinstance(module, nn.Linear):
        if type(module) not in (nn.Linear, FeedbackLinear):
            return f"nn.Linear subclass {type(module).__name__} is not supported (its forward may differ)"
        return None
    if not isinstance(module, _ConvNd):
        return f"{type(module).__name__} is neither nn.Linear nor nn.Conv2d"
    return unsupported_conv2d(module, FeedbackConv2d)


class _FeedbackLayer:
    """What FeedbackLinear and FeedbackConv2d share: the feedback state, its forward and diagnostics."""

    weight: nn.Parameter

    def _setup_feedback(self, mode: str, init: str, storage: str, seed: int) -> None:
        """Register what the mode keeps (M, or s, and the step counter), drawn with ``seed``."""
        self._mode = _check_config(type(self).__name__, mode, init, storage, seed)
        self.mode, self.init, self.feedback_seed, self.exact = mode, init, seed, False
        self._versions: tuple[int, int, int, int] | None = None  # learned B: (id, _version) of W and B at a forward
        self._dist = self._mode.dist or ("uniform" if init in UNIFORM_INITS else "normal")
        weight = self.weight.detach()
        scale = torch.tensor(_init_std(weight, init), dtype=weight.dtype, device=weight.device)
        self.storage = self._mode.kept(storage)
        if self.storage == "dense":
            m = self._mode.draw(feedback_draw(weight, seed, None, self._dist), scale)
            if self._mode.learned:
                setattr(self, self._mode.stored_as, nn.Parameter(m, requires_grad=self.weight.requires_grad))
            else:
                self.register_buffer(self._mode.stored_as, m)
        else:
            self.register_buffer("feedback_scale", scale)
        if self._mode.redraw == "batch":
            self.register_buffer("feedback_step", torch.zeros((), dtype=torch.int64, device=weight.device))

    def _stored(self) -> Tensor | None:
        """The dense M (B for fa and kp, |R| for frsf), or None where it is regenerated."""
        return getattr(self, self._mode.stored_as) if self.storage == "dense" else None

    def _check_b_is_stepped(self) -> None:
        """A learned B: raise where W was stepped since the last training forward while B, which has a
        gradient, was not: the optimizer does not hold B, which would stay fixed. Reads the tensors'
        version counters only (no host sync); skipped under torch.compile."""
        w, b = self.weight, self._stored()
        last, self._versions = self._versions, (id(w), w._version, id(b), b._version)
        if (last is not None and b.grad is not None and (last[0], last[2]) == (id(w), id(b))
                and w._version != last[1] and b._version == last[3]):
            raise RuntimeError(
                f"{type(self).__name__} (mode {self.mode!r}): W was stepped since the last training forward but B "
                f"({self._mode.stored_as}, which has a gradient) was not, so the optimizer does not hold B and it "
                "would train as a fixed B (plain fa): build the optimizer after convert_to_feedback, from the "
                "converted model's parameters (model.parameters()), or add B to it (optimizer.add_param_group)")

    def _feedback_forward(self, input: Tensor, conv: Conv | None) -> Tensor:
        if self._mode.learned and self._stored().requires_grad and not torch.compiler.is_compiling():
            self._check_b_is_stepped()
        step = None
        if self._mode.redraw == "batch":
            # A new tensor, not the buffer: a later forward's increment must not change this one's
            # draw. (A clone of the incremented buffer is not enough: aot_eager's partitioner then
            # recomputes it in backward from the already incremented buffer.)
            step = self.feedback_step + 1
            with torch.no_grad():
                self.feedback_step.copy_(step)
        return _FeedbackFunction.apply(input, self.weight, self.bias, self._stored(),
                                       getattr(self, "feedback_scale", None), step, self._mode,
                                       self.feedback_seed, self._dist, conv)

    @torch.no_grad()
    def current_feedback_weight(self) -> Tensor:
        """B as the next feedback backward uses it (materialised, W's dtype; for brsf the current
        step's, i.e. the draw of the last training forward). Ignores ``exact``."""
        return _feedback(self._mode, self.weight, self._stored(), getattr(self, "feedback_scale", None),
                         getattr(self, "feedback_step", None), self.feedback_seed, self._dist).clone()

    @property
    def feedback_nbytes(self) -> int:
        """Bytes of W-shaped feedback state kept between steps (B or |R|; 0 when regenerated)."""
        stored = self._stored()
        return 0 if stored is None else stored.numel() * stored.element_size()

    def extra_repr(self) -> str:
        exact = ", exact=True" if self.exact else ""
        return (f"{super().extra_repr()}, mode={self.mode!r}, init={self.init!r}, storage={self.storage!r}, "
                f"feedback_bytes={self.feedback_nbytes}{exact}")

    def _adopt(self, module: nn.Module, mode: str, init: str, storage: str, seed: int) -> _FeedbackLayer:
        """This layer (built on the meta device) sharing ``module``'s weight and bias Parameters, its
        feedback drawn from that W, in ``module``'s training mode: ``from_module``'s last steps."""
        self.weight, self.bias = module.weight, module.bias
        self._setup_feedback(mode, init, storage, seed)
        return self.train(module.training)

    def _uses_feedback(self) -> bool:
        return self.training and torch.is_grad_enabled() and not self.exact


class FeedbackLinear(_FeedbackLayer, nn.Linear):
    """``nn.Linear`` (same Parameters and state_dict keys, plus the feedback state) whose input
    gradient is ``dy @ B`` instead of ``dy @ W``; dW and db are exact (module docstring).

    ``mode`` is one of :data:`MODES`, ``init`` of :data:`INITS`, ``storage`` of :data:`STORAGES`;
    ``seed`` fixes the draws. In eval mode, without grad, or with ``exact = True`` it is the plain
    layer (backprop: no B gradient for kp, no brsf step). Attributes ``mode``, ``init``,
    ``feedback_seed``, ``exact`` and ``storage``, what is kept: "dense" (fa, frsf dense; kp),
    "seeded" (fa, frsf seeded; brsf, from (seed, step)) or "none" (usf).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 mode: str = "fa", init: str = "default", storage: str = "dense", seed: int = 0) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup_feedback(mode, init, storage, seed)

    @classmethod
    def from_module(cls, module: nn.Linear, mode: str, *, init: str = "default", storage: str = "dense",
                    seed: int = 0) -> FeedbackLinear:
        """A FeedbackLinear sharing ``module``'s weight and bias Parameters (B drawn from its W)."""
        reason = _unsupported(module) if isinstance(module, nn.Linear) else "not an nn.Linear"
        if reason is not None:
            raise ValueError(f"FeedbackLinear.from_module: {reason}")
        new = cls.__new__(cls)
        nn.Linear.__init__(new, module.in_features, module.out_features, module.bias is not None, device="meta",
                           dtype=module.weight.dtype)
        return new._adopt(module, mode, init, storage, seed)

    def forward(self, input: Tensor) -> Tensor:
        if not self._uses_feedback():
            return super().forward(input)
        return self._feedback_forward(input, None)


class FeedbackConv2d(_FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` (same Parameters and state_dict keys, plus the feedback state) whose input
    gradient is ``conv2d_input(x.shape, B, dy, ...)`` instead of W's; dW and db are exact.

    Any stride, integer padding (or 'valid', or 'same' when symmetric), dilation and groups
    (depthwise included); padding_mode 'zeros' only. Feedback arguments as :class:`FeedbackLinear`.
    """

    def __init__(self, *args, mode: str = "fa", init: str = "default", storage: str = "dense", seed: int = 0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        reason = _unsupported(self)
        if reason is not None:
            raise ValueError(f"FeedbackConv2d: {reason}")
        self._setup_feedback(mode, init, storage, seed)

    @classmethod
    def from_module(cls, module: nn.Conv2d, mode: str, *, init: str = "default", storage: str = "dense",
                    seed: int = 0) -> FeedbackConv2d:
        """A FeedbackConv2d sharing ``module``'s weight and bias Parameters (B drawn from its W)."""
        reason = _unsupported(module) if isinstance(module, _ConvNd) else "not an nn.Conv2d"
        if reason is not None:
            raise ValueError(f"FeedbackConv2d.from_module: {reason}")
        new = cls.__new__(cls)
        nn.Conv2d.__init__(
            new, module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
            device="meta", dtype=module.weight.dtype,
        )  # fmt: skip
        return new._adopt(module, mode, init, storage, seed)

    def forward(self, input: Tensor) -> Tensor:
        if not self._uses_feedback():
            return super().forward(input)
        if input.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(input.unsqueeze(0)).squeeze(0)
        return self._feedback_forward(input, (self.stride, self.padding, self.dilation, self.groups))


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


def _kept(name: str, keep_exact: tuple[str, ...]) -> bool:
    return any(name_under(name, k) for k in keep_exact)


def _check_reconversion(op: str, label: str, layer: _FeedbackLayer, mode: str, init: str, storage: str,
                        seed: int) -> None:
    """A layer converted before is left as it is when asked for the same feedback again; asked for
    another (mode, init, storage or seed), keeping it would train with the old one without a word,
    and swapping it would drop its B (a learned one too), so refuse, naming both."""
    held = {"mode": layer.mode, "init": layer.init, "storage": layer.storage, "seed": layer.feedback_seed}
    asked = {"mode": mode, "init": init, "storage": MODES[mode].kept(storage), "seed": seed}
    changed = [key if key == "seed" else f"{key} {held[key]!r} to {asked[key]!r}" for key in held
               if held[key] != asked[key]]
    if changed:
        raise ValueError(f"{op}: {label} is already a feedback layer of mode {layer.mode!r}; converting it again "
                         f"cannot change its {', '.join(changed)}: convert the plain model instead (a fresh one, or "
                         "one loaded with strip_feedback(converted.state_dict()))")


def convert_to_feedback(model: nn.Module, mode: str, *, init: str = "default", storage: str = "dense",
                        seed: int = 0, keep_exact: Sequence[str] = ()) -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (in place) for a
    :class:`FeedbackLinear` / :class:`FeedbackConv2d` sharing its Parameters, so that the model
    trains with ``mode``'s feedback; returns the model (the replacement when ``model`` is a layer).

    Layer i (its index among the model's Linear and conv modules in module order, kept ones
    included, so ``keep_exact`` does not change the others' draws) gets seed ``stream_key(seed, i)``.
    Layers whose qualified name equals an entry of ``keep_exact`` or starts with it plus "." stay
    as they are (backprop); each entry must match at least one layer. Feedback layers already
    there are left as they are when they have the feedback asked for (ValueError naming both
    where they have another: convert the plain model), and so is ``nn.MultiheadAttention``'s ``out_proj`` (its forward
    is never called: attention backpropagates as usual). Every layer is checked before any is
    swapped: an unsupported one (Conv1d/Conv3d, transposed, padding_mode other than 'zeros',
    subclasses) raises ValueError naming it, with the model unchanged.
    """
    op = "convert_to_feedback"
    check_module(op, "model", model)
    _check_config(op, mode, init, storage, seed)
    if isinstance(keep_exact, str):
        raise TypeError(f"{op}: keep_exact must be a sequence of layer names, not the str {keep_exact!r}")
    keep = tuple(keep_exact) if isinstance(keep_exact, (Sequence, set, frozenset)) else None
    if keep is None or not all(isinstance(k, str) for k in keep):
        raise TypeError(f"{op}: keep_exact must be a sequence of layer names (str), got {keep_exact!r}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, _ConvNd))]
    unmatched = [k for k in keep if not any(_kept(name, (k,)) for name, _ in layers)]
    if unmatched:
        raise ValueError(f"{op}: keep_exact entries {unmatched} match no nn.Linear or conv layer")
    replacements: dict[int, nn.Module] = {}
    for index, (name, layer) in enumerate(layers):
        if _kept(name, keep) or isinstance(layer, NonDynamicallyQuantizableLinear) or id(layer) in replacements:
            continue
        label = name or type(layer).__name__
        if isinstance(layer, _FeedbackLayer):
            _check_reconversion(op, label, layer, mode, init, storage, stream_key(seed, index))
            continue
        reason = _unsupported(layer)
        if reason is not None:
            raise ValueError(f"{op}: {label}: {reason} (keep it as it is with keep_exact)")
        cls = FeedbackLinear if isinstance(layer, nn.Linear) else FeedbackConv2d
        try:
            replacements[id(layer)] = cls.from_module(layer, mode, init=init, storage=storage,
                                                      seed=stream_key(seed, index))
        except ValueError as error:  # init='match' on a constant weight
            raise ValueError(f"{op}: {label}: {error} (in a recipe: [rule] feedback_init = \"default\"), or keep "
                             f"the layer exact: keep_exact=[{label!r}]") from None
    return swap_modules(model, replacements)


def strip_feedback(state_dict: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """A converted model's ``state_dict`` without its feedback layers' own state (the keys ending in
    one of :data:`FEEDBACK_STATE_KEYS`: B, |R|, s, the brsf step), i.e. the plain model's, so that
    ``plain.load_state_dict(strip_feedback(converted.state_dict()))`` loads with ``strict=True``
    (the converted layers share the plain ones' Parameters and keys)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"strip_feedback: state_dict must be a mapping (model.state_dict()), "
                        f"got {type(state_dict).__name__}")
    stripped = OrderedDict((k, v) for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in FEEDBACK_STATE_KEYS)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module versions, which load_state_dict reads
        stripped._metadata = metadata
    return stripped


def feedback_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (qualified name, layer) pairs of ``model``'s feedback layers, in module order."""
    check_module("feedback_layers", "model", model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _FeedbackLayer)]
