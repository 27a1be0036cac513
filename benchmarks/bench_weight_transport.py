"""Step time and feedback memory of the weight-transport baselines against BP on CIFAR ResNet-20:
``python -m benchmarks.bench_rule_step --suite weight-transport`` under its earlier name, which
BENCHMARKS.md runs."""

import sys
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/bench_weight_transport.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_rule_step import main

if __name__ == "__main__":
    main(suite="weight-transport")
