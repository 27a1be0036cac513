"""Triton kernels for backprop-free learning rules, each with a pure-PyTorch reference.

This package is usable on its own: it never imports ``trainer``.
"""
