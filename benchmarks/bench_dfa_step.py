"""Step time of DFA (layer granularity) against BP: ResNet-18 (CIFAR stem), CIFAR-10 shapes.

Each rule trains its own copy of the model with SGD on the same random batch (step time does not
depend on the pixel values). Steps of the rules alternate (``benchmarks/_harness.time_interleaved``),
so a change in the machine's load hits all of them alike; each step is timed with a synchronised
wall clock after a few warm-up steps (which also compile, when compiling), and the median step is
reported (robust to load spikes). BDFA (±1 feedback through the binary-projection kernel, packed at
1 bit an entry or seeded: regenerated every step) is timed too. The goal on GPU: DFA at most 0.8x
BP's step time; on the CPU, BDFA's step no slower than dense DFA's (the kernel's PyTorch path makes
the signs in blocks, compiled, never the whole C x D float matrix).

    python -m benchmarks.bench_dfa_step                                  # CUDA: batch 256, compile, bf16
    python -m benchmarks.bench_dfa_step --device cpu --batch 16 --steps 3 --out bench_out/dfa_step.json
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

RULES = {  # label -> (rule, options)
    "bp": ("bp", {}),
    "dfa (layer)": ("dfa", {"granularity": "layer"}),
    "bdfa (layer, packed)": ("bdfa", {"granularity": "layer"}),
    "bdfa (layer, seeded)": ("bdfa", {"granularity": "layer", "feedback_storage": "seeded"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, batch=256)
    args = parser.parse_args()
    device, compile_, amp = step_settings(args)
    x, y = cifar_batch(args.batch, device)
    steps = {}
    for label, (rule_name, options) in RULES.items():
        rule, optimizer = cifar_rule(rule_name, options, device, compile=compile_, amp=amp,
                                              optim={"name": "sgd", "lr": 0.01})
        steps[label] = lambda rule=rule, optimizer=optimizer: rule.train_step(x, y, optimizer)
    times = time_interleaved(steps, device, warmup=args.warmup, repeats=args.steps)

    ms = {label: timing.median_ms for label, timing in times.items()}
    result = table(f"ResNet-18 (CIFAR stem) training step, batch {args.batch}, {device}, "
                   f"compile={compile_}, amp={amp}, median of {args.steps} interleaved steps",
                   ["rule", "ms/step", "p20-p80 ms", "images/s", "vs BP step time"])
    for label, timing in times.items():
        result.add_row(label, f"{timing.median_ms:,.1f}", f"{timing.p20_ms:,.1f}-{timing.p80_ms:,.1f}",
                       f"{1000 * args.batch / timing.median_ms:,.1f}", f"{timing.median_ms / ms['bp']:.3f}x")
    console = make_console(120)
    console.print(result)
    rows = [{"rule": label, "batch": args.batch, **timing.to_dict(), "images_per_s": 1000 * args.batch / timing.median_ms,
             "ratio_to_bp": timing.median_ms / ms["bp"]} for label, timing in times.items()]
    headline = {f"{label.split()[0]}{'_seeded' if 'seeded' in label else ''}_ms": value for label, value in ms.items()}
    headline["dfa_over_bp"] = ms["dfa (layer)"] / ms["bp"]
    headline["bdfa_over_dfa"] = ms["bdfa (layer, packed)"] / ms["dfa (layer)"]
    meta = {**environment(device), "batch": args.batch, "steps": args.steps, "compile": compile_, "amp": amp}
    write_results(args.out, meta, {"steps": rows}, headline, console)


if __name__ == "__main__":
    main()
