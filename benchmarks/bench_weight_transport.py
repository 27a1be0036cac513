"""Step time and feedback memory of the weight-transport baselines against BP: CIFAR ResNet-20.

Each rule trains its own copy of the model (built through the recipe schema, as ``trainer run``
does) on the same random batch; the steps alternate (``benchmarks/_harness.time_interleaved``), so
load changes hit every rule alike, and the median step is reported. The feedback rules run BP's
graph with B in place of W in the input gradient, so their step should cost about BP's plus the
making of B (usf: sign(W) every step; brsf: a fresh |R| every batch; seeded: B regenerated in every
backward). Feedback memory is what the layers keep besides W (dense B or |R|: W's bytes; seeded,
usf, brsf: none).

    python -m benchmarks.bench_weight_transport --device cpu --batch 64 --steps 5 --out bench_out/wt_step.json
    python -m benchmarks.bench_weight_transport        # CUDA: batch 128, compile, bf16
"""

from __future__ import annotations

import argparse

from benchmarks._harness import (
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

RULES = {  # label -> [rule] table
    "bp": {"name": "bp"},
    "fa": {"name": "fa"},
    "fa (seeded B)": {"name": "fa", "feedback_storage": "seeded"},
    "usf": {"name": "usf"},
    "brsf": {"name": "brsf"},
    "frsf": {"name": "frsf"},
    "frsf (seeded |R|)": {"name": "frsf", "feedback_storage": "seeded"},
    "kp": {"name": "kp"},
    "dfa (layer)": {"name": "dfa", "granularity": "layer"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, batch=128)
    args = parser.parse_args()
    device, compile_, amp = step_settings(args)
    x, y = cifar_batch(args.batch, device)
    steps, state = {}, {}
    for label, rule_table in RULES.items():
        options = {k: v for k, v in rule_table.items() if k != "name"}
        rule, optimizer = cifar_rule(rule_table["name"], options, device, compile=compile_, amp=amp,
                                     optim={"name": "adamw", "lr": 1e-3}, model={"name": "resnet20"})
        steps[label] = lambda rule=rule, optimizer=optimizer: rule.train_step(x, y, optimizer)
        state[label] = rule.state_nbytes()
    times = time_interleaved(steps, device, warmup=args.warmup, repeats=args.steps)
    bp_ms = times["bp"].median_ms
    result = table(f"CIFAR ResNet-20 training step, batch {args.batch}, {device}, compile={compile_}, amp={amp}, "
                   f"median of {args.steps} interleaved steps", ["rule", "ms/step", "p20-p80 ms", "images/s",
                                                                 "vs BP step time", "feedback KiB"])
    rows = []
    for label, timing in times.items():
        result.add_row(label, f"{timing.median_ms:,.1f}", f"{timing.p20_ms:,.1f}-{timing.p80_ms:,.1f}",
                       f"{1000 * args.batch / timing.median_ms:,.0f}", f"{timing.median_ms / bp_ms:.3f}x",
                       f"{state[label] / 1024:,.1f}")
        rows.append({"rule": label, "batch": args.batch, **timing.to_dict(), "ratio_to_bp": timing.median_ms / bp_ms,
                     "feedback_bytes": state[label]})
    console = make_console(120)
    console.print(result)
    meta = {**environment(device), "batch": args.batch, "steps": args.steps, "compile": compile_, "amp": amp}
    headline = {f"{row['rule'].split()[0]}_over_bp": row["ratio_to_bp"] for row in rows if "(" not in row["rule"]}
    write_results(args.out, meta, {"steps": rows}, headline, console)


if __name__ == "__main__":
    main()
