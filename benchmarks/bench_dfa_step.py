"""Step time of DFA and BDFA against BP on ResNet-18 (CIFAR stem): ``python -m benchmarks.bench_rule_step
--suite dfa`` under its earlier name, which ``benchmarks.gpu_check`` and BENCHMARKS.md run."""

import sys
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/bench_dfa_step.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_rule_step import main

if __name__ == "__main__":
    main(suite="dfa")
