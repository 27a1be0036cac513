"""Low-memory stochastic backprop: BP whose conv weight gradients are randomized trace estimates.

The model's ``nn.Conv2d`` layers become :class:`kernels.trace_conv.TraceConv2d` (Louboutin et al.
2021): each keeps ``X·Z`` (C_in x r per sample) and a probe seed instead of its input X, its weight
gradient is an unbiased trace estimate and its input and bias gradients stay exact. The swap happens
in place before compiling and shares the Parameters, so the state_dict keys stay those of the plain
model: checkpoints load into the plain model and ``trainer eval`` needs nothing from this rule.

Probe seeds come from torch's default CPU generator (seeded by the loop, saved in checkpoints). The
trainer's loop reseeds it with ``seed + rank`` under torchrun, so ranks draw independent probes and
the averaged gradient's variance falls with the world size; a user's own data-parallel loop that
seeds every rank alike gets identical probes on all ranks (correlated, not averaged-out, errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from kernels import TraceConv2d, convert_to_trace_conv
from kernels._dispatch import use_triton
from trainer.config import ConfigError
from trainer.devices import free_bytes
from trainer.memory import SavedActivationMeter
from trainer.passes import evaluation_mode, uncounted_pass
from trainer.rules.base import RuleContext, RuleError, StepResult
from trainer.rules.bp import Backprop

Probe = Literal["gaussian", "rademacher", "orthogonal"]  # kernels.trace_conv.PROBES


@dataclass
class TraceBPOptions:
    """Options of ``trace_bp``.

    probes: r, the number of probe vectors; each converted conv stores C_in·r numbers per sample
    instead of C_in·H·W, and the estimate's variance falls like 1/r. A step whose memory (the
    probes', ``probe_bytes``, with the activations and gradients, ``step_bytes``) exceeds the free
    memory is refused before the first step's forward.
    probe: gaussian or rademacher entries, or orthogonal (each position in one random column).
    keep_first_exact: leave the first conv exact, as in the paper: its input is the image, whose few
    channels are cheap to keep.
    mask_relu: also swap ReLUs for ones that save a 1-bit mask; without it a conv-BN-ReLU net still
    keeps every ReLU output, i.e. the next conv's input, and saves little memory.
    compact_bn: also swap BatchNorm2d layers for ones that save their normalized input in fp16
    (kernels.compact_batch_norm): BN's inputs are then most of the activation memory left, and
    with them in fp32 a ResNet saves at most ~1.9x. Costs ~5e-4 relative error in BN's gradients.
    """

    probes: int = 16
    probe: Probe = "gaussian"
    keep_first_exact: bool = True
    mask_relu: bool = True
    compact_bn: bool = True

    def validate(self) -> None:
        if self.probes < 1:
            raise ValueError(f"probes must be >= 1, got {self.probes}")


@dataclass(frozen=True)
class ConvShape:
    """One converted conv, as its probes see one sample: channels, kernel taps, positions (H*W)."""

    c_in: int
    c_out: int
    taps: int
    positions_in: int
    positions_out: int


_REFERENCE_Z_FLOATS = 8  # kernels.probes.probe_matrix: up to four int64 (positions x r) temporaries live at once


def probe_bytes(convs: Sequence[ConvShape], batch: int, probes: int, reference: bool = False) -> int:
    """The bytes the probes take in one step (float32, ``kernels.trace_conv``): every conv's X·Z
    (C_in x r a sample) is kept from its forward to its backward; the backward then makes, one conv
    at a time, the stage-1 product A (C_out x taps x r a sample) and the probe matrices Z (positions
    x r) and S_k Z (taps x output positions x r), which the Triton kernels make in registers.
    ``reference``: the PyTorch path's (CPU without Triton), whose backward also copies A and S_k Z
    once each, whose forward holds a second X·Z of one conv, and which makes Z through up to
    ``_REFERENCE_Z_FLOATS`` floats' worth of int64 hash temporaries an entry. The rest of the step
    (activations, gradients: ``step_bytes``) comes on top."""
    kept = sum(c.c_in for c in convs) * batch * probes
    if not reference:
        backward = max(c.c_out * c.taps * batch + c.positions_in + c.taps * c.positions_out for c in convs) * probes
        return 4 * (kept + backward)
    transient = max(max(2 * c.c_out * c.taps * batch + 2 * c.taps * c.positions_out,  # backward: A, S_k Z, copies
                        c.c_in * batch) + _REFERENCE_Z_FLOATS * c.positions_in for c in convs) * probes
    return 4 * (kept + transient)


def step_bytes(model: nn.Module, sample: torch.Tensor) -> tuple[int, int]:
    """What a training step of ``model`` takes besides the probes (``probe_bytes``): bytes a
    sample, and its gradients' bytes. A sample's are those its forward saves for backward, other
    than the probes' X·Z, and twice its largest layer output: the full-precision output a layer
    holds while its compact copy is saved, and the activation gradients the backward passes on.

    Both are measured in one training-mode forward of two copies of ``sample`` with every trace
    conv at one probe (saved bytes by ``trainer.memory.SavedActivationMeter``, less that probe's
    X·Z, C_in floats a sample); nothing of it stays (running statistics, RNG, modes and probe counts
    put back, the graph dropped). Parameters are not counted: they are in memory already."""
    convs = [m for m in model.modules() if isinstance(m, TraceConv2d)]
    probes = [conv.probes for conv in convs]
    pair = sample[:1].detach().repeat(2, *[1] * (sample.dim() - 1))
    meter = SavedActivationMeter(exclude=[*model.parameters(), *model.buffers()])
    largest = [0]

    def record(module: nn.Module, args: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        for conv in convs:
            conv.probes = 1
        with uncounted_pass(model, training=True), torch.enable_grad(), meter:
            model.forward(pair)  # not a compiled model(...): no extra compile for one measurement
    finally:
        for hook in hooks:
            hook.remove()
        for conv, count in zip(convs, probes):
            conv.probes = count
    saved = max(meter.peak - 4 * 2 * sum(conv.in_channels for conv in convs), 0)
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return (saved + 2 * largest[0]) // 2, gradients


def check_probe_memory(convs: Sequence[ConvShape], batch: int, probes: int, device: torch.device, *,
                       per_sample: int, gradients: int, reference: bool) -> None:
    """Refuse a step whose memory exceeds what is free, before the step that would be killed: the
    probes' (``probe_bytes``, of the PyTorch path when ``reference``) with the rest of the step,
    ``per_sample`` saved activation bytes and the ``gradients``' (``step_bytes``)."""
    probed = probe_bytes(convs, batch, probes, reference)
    need, free = probed + batch * per_sample + gradients, free_bytes(device)
    if need > free:
        raise ConfigError(f"[rule] probes = {probes}: trace_bp's probes need about {probed / 2**30:.3g} GiB of a whole "
                          f"step (with activations and gradients) of about {need / 2**30:.3g} GiB at batch {batch} "
                          f"({len(convs)} converted conv(s); it grows with probes x batch), but {device} has "
                          f"{free / 2**30:.3g} GiB free; lower rule.probes (16 to 64 are usual) or train.batch_size")


def conv_shapes(model: nn.Module, sample: torch.Tensor) -> list[ConvShape]:
    """The converted convs of ``model`` as ``sample`` (one image) meets them, in an eval-mode pass
    (each conv exact: no probes) of ``model.forward``, not of a compiled ``model(...)``."""
    shapes: list[ConvShape] = []

    def record(conv: nn.Module, args: tuple, out: torch.Tensor) -> None:
        shapes.append(ConvShape(conv.in_channels, conv.out_channels, conv.kernel_size[0] * conv.kernel_size[1],
                                args[0].shape[2] * args[0].shape[3], out.shape[2] * out.shape[3]))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, TraceConv2d)]
    try:
        with evaluation_mode(model), torch.no_grad():
            model.forward(sample)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


class TraceBackprop(Backprop):
    """Backprop through the model with its convolutions converted to trace-estimated ones."""

    name = "trace_bp"
    Options = TraceBPOptions

    def __init__(self, model: nn.Module, options: TraceBPOptions, ctx: RuleContext):
        try:
            model = convert_to_trace_conv(model, probes=options.probes, probe=options.probe,
                                          keep_first_exact=options.keep_first_exact, mask_relu=options.mask_relu,
                                          compact_bn=options.compact_bn)
        except ValueError as err:
            raise RuleError(str(err)) from None
        if not any(isinstance(m, TraceConv2d) for m in model.modules()):
            has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
            why = "keep_first_exact leaves its only conv exact" if has_conv else "it has no Conv2d"
            raise RuleError(f"no convolution of the model to estimate ({why}); use rule 'bp'")
        super().__init__(model, options, ctx)  # compiles the converted model
        self.convs: list[ConvShape] = []
        self._step_bytes: tuple[int, int] | None = None  # (activation bytes a sample, gradient bytes): step_bytes
        self._checked_batch = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        if isinstance(x, tuple):
            raise RuleError("trace_bp sizes its memory check by a sample of x, one tensor: pass the batch as one tensor "
                            "(a forward of several inputs is not supported by trace_bp), or use rule 'bp'")
        if len(x) != self._checked_batch:  # RuleContext has no batch size: checked before the first step's forward
            self.convs = self.convs or conv_shapes(self.model, x[:1])
            self._step_bytes = self._step_bytes or step_bytes(self.model, x[:1])
            per_sample, gradients = self._step_bytes
            check_probe_memory(self.convs, len(x), self.options.probes, x.device, per_sample=per_sample,
                               gradients=gradients, reference=not use_triton(x))
            self._checked_batch = len(x)
        return super().train_step(x, y, optimizer)
