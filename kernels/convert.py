"""Converting a whole model to low-memory backprop: trace-estimated convs, mask ReLUs, compact BatchNorms.

Each swap keeps the model's Parameters and buffers (same objects), so state_dict keys and values
are unchanged; what changes is what each layer saves for backward.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd

from kernels._modules import check_module, swap_modules
from kernels.compact_batch_norm import convert_batch_norms
from kernels.mask_relu import MaskReLU
from kernels.probes import check_probe_args
from kernels.trace_conv import TraceConv2d, unsupported_conv

__all__ = ["convert_to_trace_conv"]


def convert_to_trace_conv(
    model: nn.Module,
    probes: int = 16,
    probe: str = "gaussian",
    keep_first_exact: bool = True,
    mask_relu: bool = True,
    compact_bn: bool = True,
) -> nn.Module:
    """Swap every ``nn.Conv2d`` of ``model`` for a :class:`~kernels.trace_conv.TraceConv2d` sharing
    its Parameters.

    Works in place on any module tree (torchvision ResNets included) and returns the model (the
    replacement itself when ``model`` is a conv). ``keep_first_exact`` leaves the first conv in
    module order exact, as in the paper. ``mask_relu`` also swaps every ``nn.ReLU`` for a
    :class:`~kernels.mask_relu.MaskReLU` (exact gradient, 1-bit saved mask); without it, a
    conv-BN-ReLU network keeps each ReLU output, which is the next conv's input, and saves little
    memory. ``compact_bn`` also swaps every ``nn.BatchNorm2d`` for a
    :class:`~kernels.compact_batch_norm.CompactBatchNorm2d` (saves its normalized input in fp16: BN
    inputs are then most of what is left). Convs that are already TraceConv2d are left as they are;
    hooks registered on replaced modules are not carried over. Every conv to convert is checked
    before any is swapped; an unsupported one raises ValueError naming the layer, e.g.
    ``"layer1.0.conv2: padding_mode='reflect' is not supported (only 'zeros')"``.
    """
    check_module("convert_to_trace_conv", "model", model)
    check_probe_args("convert_to_trace_conv", probes, probe)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, _ConvNd)]
    if keep_first_exact:
        convs = convs[1:]
    replacements: dict[int, nn.Module] = {}
    for name, conv in convs:
        if isinstance(conv, TraceConv2d):
            continue
        reason = unsupported_conv(conv)
        if reason is not None:
            raise ValueError(f"{name or type(conv).__name__}: {reason}")
        replacements[id(conv)] = TraceConv2d.from_conv(conv, probes=probes, probe=probe)
    if mask_relu:
        for module in model.modules():
            if type(module) is nn.ReLU:
                replacements[id(module)] = MaskReLU(inplace=module.inplace).train(module.training)
    model = swap_modules(model, replacements)
    return convert_batch_norms(model) if compact_bn else model
