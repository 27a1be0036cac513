"""Where one training step of each rule spends its CPU time: torch.profiler over a few steps of the
trainer's own session, a table of the top operators by self time per rule, and the host syncs
(``aten::item``, ``aten::_local_scalar_dense``) a step makes.

    python -m benchmarks.profile_rules --npz cifar10-mini-train.npz --rules bp dfa drtp tpsgd rec_lra
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

if not __package__:  # run as a file (python benchmarks/profile_rules.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import cifar_data, environment, make_console, session_steps, table, write_results
from trainer.recipes import load_recipe
from trainer.session import build_session

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cifar10_resnet20_bp.toml"
SYNCS = ("aten::item", "aten::_local_scalar_dense")


def profile_rule(rule: str, overrides: list[str], steps: int, warmup: int) -> tuple[list[dict[str, Any]], float, int]:
    """The top operators of ``steps`` steps of ``rule`` (self CPU ms a step), the step's total CPU ms,
    and the host syncs a step makes."""
    session = build_session(load_recipe(RECIPE, [*overrides, f"rule.name={json.dumps(rule)}"]))
    session.rule.train()
    training = session_steps(session)
    for _ in range(warmup):
        next(training)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            next(training)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    syncs = sum(e.count for e in events if e.key in SYNCS) // steps
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
             "share": e.self_cpu_time_total / 1000 / steps / total, "calls_per_step": e.count / steps} for e in ops]
    return rows, total, syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, help="CIFAR images (x uint8 N x 32 x 32 x 3, y labels)")
    parser.add_argument("--rules", nargs="+", default=["bp", "dfa", "bdfa", "drtp", "tpsgd", "rec_lra", "trace_bp"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .csv)")
    args = parser.parse_args()
    console = make_console(120)
    import tempfile

    data = cifar_data(args.npz, None, Path(tempfile.gettempdir()) / "bpfree-bench" / "synthetic-cifar10.npz")
    overrides = [*data.overrides, f"train.batch_size={args.batch}", 'train.device="cpu"', "train.compile=false",
                 "train.amp=false"]
    tables, summary = {}, []
    for rule in args.rules:
        rows, total, syncs = profile_rule(rule, overrides, args.steps, args.warmup)
        tables[rule] = rows[: args.top]
        summary.append({"rule": rule, "cpu_ms_per_step": total, "host_syncs_per_step": syncs})
        shown = table(f"{rule}: top operators by self CPU time, ResNet-20, batch {args.batch} "
                      f"({total:.0f} ms a step, {syncs} host syncs a step)", ["op", "ms a step", "share", "calls"],
                      left={"op"})
        for r in rows[: args.top]:
            shown.add_row(r["op"], f"{r['self_ms_per_step']:.1f}", f"{r['share']:.0%}", f"{r['calls_per_step']:.0f}")
        console.print(shown)
    tables["summary"] = summary
    write_results(args.out, {**environment("cpu"), "data": data.description, "batch": args.batch,
                             "steps": args.steps}, tables, {}, console)


if __name__ == "__main__":
    main()
