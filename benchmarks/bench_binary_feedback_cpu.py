"""The CPU path of the binary-feedback projection against the dense float32 projection it replaces.

What CPU users of BDFA get: ``binary_feedback_project`` with ``PackedSigns`` (1 bit an entry) or
``SeededSigns`` (no memory) against ``(scale · e) @ B`` with B a C x D float32 matrix (the trainer's
dense path; ``(e @ B) · scale``, its earlier form, is timed beside it), at the
trainer's sizes (N = 128; C = 10 with the unit sizes of the small CNN and ResNet-18, C = 100 and
1000 at D = 4096). The three are timed interleaved (``benchmarks/_harness.time_interleaved``); each
is first checked against the dense product of the same signs. The ratio column is time over dense's
(below 1: faster). The kernels' PyTorch path runs (``TRITON_INTERPRET=0``); its first call compiles.

    python -m benchmarks.bench_binary_feedback_cpu [--repeats 15] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the PyTorch (CPU) path, before triton is imported

import torch  # noqa: E402

if not __package__:  # run as a file (python benchmarks/bench_binary_feedback_cpu.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import environment, make_console, relative_error, table, time_interleaved, write_results  # noqa: E402
from kernels import SeededSigns, binary_feedback_project, pack_signs  # noqa: E402

SIZES = [(10, 128, 256), (10, 128, 6272), (10, 128, 12544), (10, 128, 65536), (100, 128, 4096), (1000, 128, 4096)]
SCALE = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .csv)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    result = table(f"binary-feedback projection on the CPU, {args.threads} thread(s), median of {args.repeats} "
                   "interleaved calls", ["C", "N", "D", "dense ms", "scaled after ms", "packed ms", "seeded ms",
                                         "scaled after/dense", "packed/dense", "seeded/dense"])
    rows = []
    for c, n, d in SIZES:
        seeded = SeededSigns(7, c, d, stream=3)
        signs = seeded.materialize()
        packed, dense, e = pack_signs(signs), signs.float(), torch.randn(n, c)
        want = (e @ dense) * SCALE
        for feedback in (packed, seeded):
            error = relative_error(binary_feedback_project(e, feedback, SCALE), want)  # also the compile call
            if error > 1e-5:
                raise SystemExit(f"C={c} D={d}: {type(feedback).__name__} differs from the dense product ({error:.1e})")
        times = time_interleaved({"dense": lambda: (e * SCALE) @ dense,
                                  "scaled_after": lambda: (e @ dense) * SCALE,
                                  "packed": lambda: binary_feedback_project(e, packed, SCALE),
                                  "seeded": lambda: binary_feedback_project(e, seeded, SCALE)},
                                 device, warmup=2, repeats=args.repeats)
        ms = {name: timing.median_ms for name, timing in times.items()}
        result.add_row(str(c), str(n), str(d), *(f"{ms[k]:.3f}" for k in ("dense", "scaled_after", "packed", "seeded")),
                       *(f"{ms[k] / ms['dense']:.2f}" for k in ("scaled_after", "packed", "seeded")))
        rows.append({"C": c, "N": n, "D": d, **{f"{k}_ms": v for k, v in ms.items()},
                     "packed_over_dense": ms["packed"] / ms["dense"], "seeded_over_dense": ms["seeded"] / ms["dense"]})
    console = make_console(120)
    console.print(result)
    write_results(args.out, {**environment(device), "threads": args.threads, "repeats": args.repeats},
                  {"projection": rows}, {}, console)


if __name__ == "__main__":
    main()
