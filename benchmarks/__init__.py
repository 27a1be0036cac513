"""Scripts that measure speed and memory, and print tables (figures in BENCHMARKS.md).

A package, so that every script imports ``benchmarks._harness``, the trainer and the kernels as
packages, with no edit of ``sys.path``: run each as a module from the checkout's root,
``python -m benchmarks.NAME --help``.
"""
