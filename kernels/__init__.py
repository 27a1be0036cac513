"""Triton kernels for backprop-free learning rules, each with a pure-PyTorch reference.

This package is usable on its own: it never imports ``trainer``. Triton is optional: where it
cannot be imported every op runs its PyTorch path, CUDA tensors too (``kernels._dispatch``).
"""

from kernels._hash import stream_key
from kernels.binary_feedback import PackedSigns, SeededSigns, binary_feedback_project, pack_signs, project_labels
from kernels.compact_batch_norm import CompactBatchNorm2d, convert_batch_norms
from kernels.conv_geometry import ConvGeometry
from kernels.feedback_alignment import (
    FEEDBACK_STATE_KEYS,
    FeedbackConv2d,
    FeedbackLinear,
    convert_to_feedback,
    feedback_layers,
    strip_feedback,
)
from kernels.convert import convert_to_trace_conv
from kernels.local_alignment import (
    LRASignal,
    WeightUpdate,
    local_signal,
    local_signal_reference,
    local_weight_update,
    local_weight_update_reference,
    lra_error_units,
    norm_ball_factor,
)
from kernels.mask_relu import MaskReLU
from kernels.probes import PROBES, probe_matrix
from kernels.trace_conv import (
    TraceConv2d,
    trace_compress_torch,
    trace_compress_triton,
    trace_weight_grad_torch,
    trace_weight_grad_triton,
)

__all__ = [
    "FEEDBACK_STATE_KEYS", "PROBES", "CompactBatchNorm2d", "ConvGeometry", "FeedbackConv2d", "FeedbackLinear",
    "LRASignal", "MaskReLU", "PackedSigns", "SeededSigns", "TraceConv2d", "WeightUpdate", "binary_feedback_project",
    "convert_batch_norms", "convert_to_feedback", "convert_to_trace_conv", "feedback_layers",
    "local_signal", "local_signal_reference", "local_weight_update", "local_weight_update_reference",
    "lra_error_units", "norm_ball_factor", "pack_signs", "probe_matrix", "project_labels", "stream_key",
    "strip_feedback",
    "trace_compress_torch", "trace_compress_triton", "trace_weight_grad_torch", "trace_weight_grad_triton",
]
