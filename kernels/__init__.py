"""Triton kernels for backprop-free learning rules, each with a pure-PyTorch reference.

This package is usable on its own: it never imports ``trainer``.
"""
from kernels.local_alignment import LRASignal, WeightUpdate, local_signal, local_signal_reference, local_weight_update, local_weight_update_reference  # noqa: E402,F401
from kernels.binary_feedback import PackedSigns, SeededSigns, binary_feedback_project, pack_signs, project_labels  # noqa: F401
from kernels.trace_conv import TraceConv2d, convert_to_trace_conv  # noqa: F401
