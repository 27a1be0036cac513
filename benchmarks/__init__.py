"""Scripts that measure speed and memory, and print tables (figures in BENCHMARKS.md).

A package, so that every script imports ``benchmarks._harness``, the trainer and the kernels as
packages: run each as a module from the checkout's root, ``python -m benchmarks.NAME --help``, or
as a file, ``python benchmarks/NAME.py --help`` (a script run so puts the checkout first on
``sys.path`` before it imports them).
"""
