"""Triton kernels for backprop-free learning rules, each with a pure-PyTorch reference.

This package is usable on its own: it never imports ``trainer``.
"""

from kernels._hash import stream_key
from kernels.binary_feedback import PackedSigns, SeededSigns, binary_feedback_project, pack_signs, project_labels
from kernels.compact_batch_norm import CompactBatchNorm2d, convert_batch_norms
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
from kernels.trace_conv import TraceConv2d, convert_to_trace_conv

__all__ = [
    "CompactBatchNorm2d", "LRASignal", "PackedSigns", "SeededSigns", "TraceConv2d", "WeightUpdate", "binary_feedback_project",
    "convert_batch_norms", "convert_to_trace_conv", "local_signal", "local_signal_reference", "local_weight_update",
    "local_weight_update_reference", "lra_error_units", "norm_ball_factor", "pack_signs", "project_labels",
    "stream_key",
]
