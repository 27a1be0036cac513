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
from typing import Literal

from torch import nn

from kernels import TraceConv2d, convert_to_trace_conv
from trainer.rules.base import RuleContext, RuleError
from trainer.rules.bp import Backprop

Probe = Literal["gaussian", "rademacher", "orthogonal"]  # kernels.trace_conv.PROBES


@dataclass
class TraceBPOptions:
    """Options of ``trace_bp``.

    probes: r, the number of probe vectors; each converted conv stores C_in·r numbers per sample
    instead of C_in·H·W, and the estimate's variance falls like 1/r.
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
