"""Step time and feedback memory of the rules against BP: one training step of each on a CIFAR model.

Two suites, each a model and the rules timed against BP on it:

* ``dfa``: ResNet-18 (CIFAR stem), SGD, batch 256. DFA at layer granularity and BDFA (±1 feedback
  through the binary-projection kernel, packed at 1 bit an entry or seeded: regenerated every step).
  The goal on GPU: DFA at most 0.8x BP's step time; on the CPU, BDFA's step no slower than dense
  DFA's (the kernel's PyTorch path makes the signs in blocks, compiled, never the whole C x D float
  matrix).
* ``weight-transport``: CIFAR ResNet-20, AdamW, batch 128. The feedback rules run BP's graph with B
  in place of W in the input gradient, so their step should cost about BP's plus the making of B
  (usf: sign(W) every step; brsf: a fresh |R| every batch; seeded: B regenerated in every backward).

Each rule trains its own copy of the model, built through the recipe schema as ``trainer run``
builds it (``benchmarks._harness.cifar_rule``), on the same random batch (step time does not depend
on the pixel values). The steps alternate (``benchmarks._harness.time_interleaved``), so a change in
the machine's load hits every rule alike; each is timed with a synchronised wall clock after a few
warm-up steps (which also compile, when compiling), and the median step is reported. Feedback
memory is what the rule keeps besides W (``Rule.state_nbytes``: a dense B or |R| takes W's bytes;
seeded, usf, brsf: none).

    python -m benchmarks.bench_rule_step --suite dfa                  # CUDA: batch 256, compile, bf16
    python -m benchmarks.bench_rule_step --suite dfa --device cpu --batch 16 --steps 3 --out bench_out/dfa_step.json
    python -m benchmarks.bench_rule_step --suite weight-transport --device cpu --batch 64 --steps 5 \\
        --out bench_out/wt_step.json

``python -m benchmarks.bench_dfa_step`` and ``python -m benchmarks.bench_weight_transport`` run the
two suites under their earlier names.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if not __package__:  # run as a file (python benchmarks/bench_rule_step.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (
    RESNET18_CIFAR,
    add_step_arguments,
    cifar_batch,
    cifar_rule,
    environment,
    make_console,
    step_settings,
    table,
    time_interleaved,
    write_results,
)


@dataclass(frozen=True)
class Suite:
    """A model, its optimizer and default batch, and the rules whose step is timed against BP's."""

    model_label: str  # for the table's title
    model: dict[str, Any]  # the recipe's [model]
    optim: dict[str, Any]  # the recipe's [optim]
    batch: int  # --batch unless given
    rules: dict[str, tuple[str, str, dict[str, Any]]]  # label -> (headline key, rule, its options); "bp" first
    ratios: tuple[tuple[str, str], ...] = ()  # (key, key): a headline ratio besides each over BP


SUITES = {
    "dfa": Suite("ResNet-18 (CIFAR stem)", RESNET18_CIFAR, {"name": "sgd", "lr": 0.01}, 256, {
        "bp": ("bp", "bp", {}),
        "dfa (layer)": ("dfa", "dfa", {"granularity": "layer"}),
        "bdfa (layer, packed)": ("bdfa", "bdfa", {"granularity": "layer"}),
        "bdfa (layer, seeded)": ("bdfa_seeded", "bdfa", {"granularity": "layer", "feedback_storage": "seeded"}),
    }, ratios=(("bdfa", "dfa"),)),
    "weight-transport": Suite("CIFAR ResNet-20", {"name": "resnet20"}, {"name": "adamw", "lr": 1e-3}, 128, {
        "bp": ("bp", "bp", {}),
        "fa": ("fa", "fa", {}),
        "fa (seeded B)": ("fa_seeded", "fa", {"feedback_storage": "seeded"}),
        "usf": ("usf", "usf", {}),
        "brsf": ("brsf", "brsf", {}),
        "frsf": ("frsf", "frsf", {}),
        "frsf (seeded |R|)": ("frsf_seeded", "frsf", {"feedback_storage": "seeded"}),
        "kp": ("kp", "kp", {}),
        "dfa (layer)": ("dfa", "dfa", {"granularity": "layer"}),
    }),
}


def main(argv: Sequence[str] | None = None, suite: str | None = None) -> None:
    """The command line; ``suite`` is the one run when ``--suite`` is not given (the earlier names')."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(SUITES), default=suite, required=suite is None,
                        help="the model and rules: " + "; ".join(f"{name}: {s.model_label}, {', '.join(s.rules)}"
                                                                 for name, s in SUITES.items()))
    add_step_arguments(parser, batch=None)
    args = parser.parse_args(argv)
    chosen = SUITES[args.suite]
    batch = args.batch or chosen.batch
    device, compile_, amp = step_settings(args)
    x, y = cifar_batch(batch, device)
    steps, state = {}, {}
    for label, (_, rule_name, options) in chosen.rules.items():
        rule, optimizer = cifar_rule(rule_name, options, device, compile=compile_, amp=amp, optim=chosen.optim,
                                     model=chosen.model)
        steps[label] = lambda rule=rule, optimizer=optimizer: rule.train_step(x, y, optimizer)
        state[label] = rule.state_nbytes()
    times = time_interleaved(steps, device, warmup=args.warmup, repeats=args.steps)

    bp_ms = times["bp"].median_ms
    result = table(f"{chosen.model_label} training step, batch {batch}, {device}, compile={compile_}, amp={amp}, "
                   f"median of {args.steps} interleaved steps",
                   ["rule", "ms/step", "p20-p80 ms", "images/s", "vs BP step time", "feedback KiB"])
    rows = []
    for label, timing in times.items():
        result.add_row(label, f"{timing.median_ms:,.1f}", f"{timing.p20_ms:,.1f}-{timing.p80_ms:,.1f}",
                       f"{1000 * batch / timing.median_ms:,.1f}", f"{timing.median_ms / bp_ms:.3f}x",
                       f"{state[label] / 1024:,.1f}")
        rows.append({"rule": label, "batch": batch, **timing.to_dict(), "images_per_s": 1000 * batch / timing.median_ms,
                     "ratio_to_bp": timing.median_ms / bp_ms, "feedback_bytes": state[label]})
    console = make_console(120)
    console.print(result)
    ms = {key: times[label].median_ms for label, (key, _, _) in chosen.rules.items()}
    headline = {f"{key}_ms": value for key, value in ms.items()}
    headline.update({f"{key}_over_bp": value / bp_ms for key, value in ms.items() if key != "bp"})
    headline.update({f"{a}_over_{b}": ms[a] / ms[b] for a, b in chosen.ratios})
    meta = {**environment(device), "suite": args.suite, "batch": batch, "steps": args.steps, "compile": compile_,
            "amp": amp}
    write_results(args.out, meta, {"steps": rows}, headline, console)


if __name__ == "__main__":
    main()
