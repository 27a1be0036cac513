"""One command for a GPU: the kernels checked compiled, every benchmark at its headline sizes, and a
1-epoch compiled bf16 training run of each CIFAR recipe, in at most 8 minutes, written to
``gpu_check.json`` and a markdown table ``gpu_check.md`` ready to paste into BENCHMARKS.md.

On a CUDA machine with torch, torchvision and triton installed, after ``pip install --no-deps -e .``:

    python -m benchmarks.gpu_check --out gpu_check_out                         # about 8 minutes
    python -m benchmarks.gpu_check --only kernels,bench_dfa_step --out rerun   # parts again
    python -m benchmarks.gpu_check --device cpu --quick --out /tmp/gpu_check   # tests this script

Why it is built this way: a first GPU run may be the only one, so it must spend its minutes
measuring, not debugging. Every part runs in subprocesses with a timeout (the whole process group
is killed at the deadline); a part that fails or times out is recorded with its error and a log
tail, and the rest still run; the exit status is 1 if any part failed. Each part may take its own
budget plus whatever the parts before it left unused, never the time the parts after it are
budgeted, so the whole run stays within the sum of the budgets (``--budget-scale`` stretches them).
Nothing needs the network or files outside the checkout: training data are synthetic CIFAR-shaped
images written into ``--out``. The JSON and markdown are rewritten after every part, so a run cut
short still leaves them. On a CPU there is no 8-minute budget (each part gets ``CPU_TIMEOUT_S``):
it is a smoke test of this script, and ``--quick`` runs only the parts a small CPU does quickly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

if not __package__:  # run as a file (python benchmarks/gpu_check.py): the checkout's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import environment, write_json, write_synthetic_cifar
from trainer.runs import read_records

ROOT = Path(__file__).resolve().parents[1]

CPU_TIMEOUT_S = 300
MIN_TIMEOUT_S = 10  # below this a part is not started: its budget was spent before it
LOG_TAIL_LINES = 25


class Skipped(Exception):
    """The part does not run here; the message says why."""


class Failed(Exception):
    """The part ran and failed; ``result`` keeps what it measured before failing."""

    def __init__(self, error: str, result: dict[str, Any] | None = None):
        super().__init__(error)
        self.result = result or {}


@dataclass
class Check:
    """One gpu_check run: where it runs, how big, where it writes, and the records so far."""

    device: str
    quick: bool
    out: Path
    train_jobs: int
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def synthetic_npz(self) -> Path:
        return self.out / "synthetic-cifar10.npz"

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"


# ---- subprocesses ---------------------------------------------------------------------------------


def child_env(interpret: str | None = None, compile_threads: int | None = None) -> dict[str, str]:
    """The environment of a part's subprocess: unbuffered, the checkout importable, TRITON_INTERPRET
    as the part needs it (unset: compiled kernels on CUDA, PyTorch paths on CPU)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    if compile_threads is not None:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(compile_threads)
    return env


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def run_logged(argv: list[str], log: Path, timeout: float, env: dict[str, str]) -> int | None:
    """Run ``argv`` from the checkout, stdout and stderr into ``log``; its exit status, or None
    when it ran past ``timeout`` (then its whole process group, compile workers included, is killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            sink.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            return None


def run_script(check: Check, name: str, argv: list[str], timeout: float, env: dict[str, str],
               out_json: Path) -> dict[str, Any]:
    """Run a benchmark script and collect the headline of its JSON; Failed on a non-zero exit."""
    out_json.unlink(missing_ok=True)  # a previous run's results must not pass for this one's
    returncode = run_logged([sys.executable, *argv, "--out", str(out_json)], check.log(name), timeout, env)
    result: dict[str, Any] = {"log": str(check.log(name).relative_to(check.out))}
    if out_json.exists():
        result["headline"] = json.loads(out_json.read_text()).get("headline", {})
        result["json"] = str(out_json.relative_to(check.out))
    if returncode is None:
        raise Failed(f"timed out after {timeout:.0f} s\n{log_tail(check.log(name))}", result)
    if returncode != 0:
        raise Failed(f"exit status {returncode}\n{log_tail(check.log(name))}", result)
    return result


# ---- the parts ------------------------------------------------------------------------------------


KERNEL_SUITES = ("binary_feedback", "local_signal", "local_weight_update", "trace_conv", "batch_norm")


def kernel_checks(check: Check, timeout: float) -> dict[str, Any]:
    """Every kernel op against its float32 reference (``check_kernels.py``): compiled on CUDA, one
    process per suite so that Triton compiles them in parallel; interpreted on a CPU. (The kernel
    test files build CPU tensors only, so running them here would not touch the GPU.)"""
    groups = KERNEL_SUITES if check.on_cuda else (",".join(KERNEL_SUITES),)
    env = child_env("0" if check.on_cuda else "1")

    def suite(names: str) -> tuple[str, dict[str, Any], str | None]:
        label = "kernels" if len(groups) == 1 else f"kernels-{names}"
        argv = ["-m", "benchmarks.check_kernels", "--device", check.device, "--suites", names,
                *(["--quick"] if check.quick else [])]
        out_json = check.out / "results" / f"check_{label}.json"
        try:
            result, error = run_script(check, label, argv, timeout, env, out_json), None
        except Failed as failed:
            result, error = failed.result, f"{names}: {failed}"
        if out_json.exists():
            rows = json.loads(out_json.read_text())["tables"]["checks"]
            result["failures"] = [{key: r.get(key) for key in ("op", "case", "dtype", "error", "exception")}
                                  for r in rows if not r["ok"]]
        return names, result, error

    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        outcomes = list(pool.map(suite, groups))
    headlines = [result.get("headline", {}) for _, result, _ in outcomes]
    merged = {"headline": {"checks": sum(h.get("checks", 0) for h in headlines),
                           "failed": sum(h.get("failed", 0) for h in headlines),
                           "worst_error_over_tolerance": max((h["worst_error_over_tolerance"] for h in headlines
                                                              if "worst_error_over_tolerance" in h), default=None)},
              "failures": [f for _, result, _ in outcomes for f in result.get("failures", [])],
              "suites": {names: result for names, result, _ in outcomes}}
    errors = [error for _, _, error in outcomes if error]
    if errors:
        raise Failed("\n".join(errors), merged)
    return merged


@dataclass(frozen=True)
class Bench:
    """A benchmark script and its flags: full and --quick sizes on CUDA, CPU sizes, and whether
    ``--device cpu --quick`` runs it."""

    script: str
    cuda: tuple[str, ...]
    cuda_quick: tuple[str, ...]
    cpu: tuple[str, ...]
    in_cpu_quick: bool

    def __call__(self, check: Check, timeout: float) -> dict[str, Any]:
        if not check.on_cuda and check.quick and not self.in_cpu_quick:
            raise Skipped("CUDA headline sizes; --device cpu --quick runs a few benchmarks at tiny sizes "
                          "(without --quick this one runs at CPU sizes)")
        flags = self.cpu if not check.on_cuda else self.cuda_quick if check.quick else self.cuda
        flags = [flag.replace("{npz}", str(check.synthetic_npz)) for flag in flags]
        argv = ["-m", f"benchmarks.{self.script}", *flags, "--device", check.device]
        return run_script(check, self.script, argv, timeout, child_env(), check.out / "results" / f"{self.script}.json")


BENCHES = [
    Bench("bench_binary_feedback", (), ("--quick",), ("--quick",), False),
    Bench("bench_local_alignment", (), ("--quick",), ("--quick", "--reps", "3"), True),
    Bench("bench_dfa_step", ("--batch", "256", "--steps", "10", "--warmup", "2"),
          ("--batch", "256", "--steps", "5", "--warmup", "1", "--no-compile"),
          ("--batch", "4", "--steps", "1", "--warmup", "0"), True),
    Bench("bench_trace_conv", ("--steps", "10", "--error-seeds", "4"),
          ("--r", "16", "--steps", "5", "--error-seeds", "2"),
          ("--skip", "error", "--cifar-batch", "8", "--imagenet-batch", "2", "--imagenet-size", "64",
           "--time-batch", "2", "--steps", "1", "--r", "4"), False),
    Bench("bench_target_projection_memory", ("--batch", "256", "--steps", "3", "--warmup", "1", "--granularity", "layer"),
          ("--batch", "256", "--steps", "2", "--warmup", "1", "--granularity", "layer", "--max-batch", "4096"),
          ("--batch", "4", "--steps", "1", "--warmup", "0", "--granularity", "layer"), False),
    Bench("bench_bp_throughput", ("--npz", "{npz}", "--batch", "256", "--steps", "10", "--warmup", "3"),
          ("--npz", "{npz}", "--batch", "256", "--steps", "5", "--warmup", "2"),
          ("--npz", "{npz}", "--batch", "8", "--steps", "1", "--warmup", "1"), False),
]

# synthetic images (train + 10 % held out) and progress windows: several windows an epoch, so that
# the steady rate (windows after the first, which compiles) is measured
TRAIN_IMAGES = {"full": 7168, "quick": 2816, "cpu": 64}
TRAIN_LOG_EVERY = {"full": 5, "quick": 3, "cpu": 1}
CPU_TRAIN_RECIPE = "cifar10_resnet18_bp"


def training(check: Check, timeout: float) -> dict[str, Any]:
    """1 epoch of each CIFAR recipe, compiled with bf16 autocast on CUDA (``train_jobs`` at a time),
    on the synthetic images; on a CPU eager float32 (inductor's C++ build alone takes minutes there)."""
    deadline = time.monotonic() + timeout
    size = "cpu" if not check.on_cuda else "quick" if check.quick else "full"
    recipes = sorted((ROOT / "recipes").glob("cifar10_*.toml"))
    overrides = ["data.name=npz", f"data.path={json.dumps(str(check.synthetic_npz))}", "train.epochs=1",
                 f"train.compile={str(check.on_cuda).lower()}", f"train.amp={str(check.on_cuda).lower()}",
                 f"train.device={json.dumps(check.device)}", f"train.log_every={TRAIN_LOG_EVERY[size]}"]
    if not check.on_cuda:
        overrides.append("train.batch_size=16")
    jobs = max(1, check.train_jobs)
    env = child_env(compile_threads=max(1, (os.cpu_count() or 1) // jobs))

    def train(recipe: Path) -> dict[str, Any]:
        row: dict[str, Any] = {"recipe": recipe.stem}
        if not check.on_cuda and check.quick and recipe.stem != CPU_TRAIN_RECIPE:
            return {**row, "status": "skipped", "reason": f"--device cpu --quick trains {CPU_TRAIN_RECIPE} only"}
        left = deadline - time.monotonic()
        if left < MIN_TIMEOUT_S:
            return {**row, "status": "failed", "error": "not started: the part's budget was spent"}
        run_dir = check.out / "train" / recipe.stem
        shutil.rmtree(run_dir, ignore_errors=True)  # the trainer refuses a folder that holds a run
        argv = [sys.executable, "-m", "trainer", "run", str(recipe), "--out", str(run_dir)]
        for item in overrides:
            argv += ["--set", item]
        start = time.monotonic()
        returncode = run_logged(argv, check.log(f"train-{recipe.stem}"), left, env)
        row.update(elapsed_s=time.monotonic() - start, log=f"logs/train-{recipe.stem}.log", **run_summary(run_dir))
        if returncode is None:
            return {**row, "status": "failed", "error": f"timed out after {left:.0f} s"}
        if returncode != 0:
            return {**row, "status": "failed", "error": log_tail(check.log(f"train-{recipe.stem}"), 8)}
        return {**row, "status": "ok"}

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(train, recipes))
    result = {"images": TRAIN_IMAGES[size], "runs_at_once": jobs, "compile": check.on_cuda, "amp": check.on_cuda,
              "recipes": rows}
    failed = [r["recipe"] for r in rows if r["status"] == "failed"]
    if failed:
        raise Failed(f"{len(failed)} of {len(rows)} recipes failed: {', '.join(failed)}", result)
    return result


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What a finished (or partly finished) run measured: its results and the steady image rate,
    the median over the progress windows after the first (which includes compilation)."""
    summary: dict[str, Any] = {}
    if (run_dir / "results.json").exists():
        results = json.loads((run_dir / "results.json").read_text())
        summary = {"images_per_s_epoch": results.get("images_per_s"), "peak_memory_mb": results.get("peak_memory_mb"),
                   "train_loss": results.get("train_loss"), "eval_loss": results.get("loss"),
                   "eval_accuracy": results.get("accuracy")}
    if (run_dir / "metrics.jsonl").exists():
        lines = read_records(run_dir)[0]  # a run cut short: what it logged, its half-written last line left out
        windows = [r["images_per_s"] for r in lines if r.get("split") == "train" and "images_per_s" in r]
        summary["images_per_s_steady"] = statistics.median(windows[1:]) if len(windows) > 1 else None
        summary.setdefault("train_loss", next((r["loss"] for r in reversed(lines) if r.get("split") == "train"), None))
    return summary


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # CUDA, full sizes
    quick_budget_s: float  # CUDA, --quick
    run: Callable[[Check, float], dict[str, Any]]


PARTS = [
    Part("kernels", 50, 30, kernel_checks),
    Part("bench_binary_feedback", 40, 20, BENCHES[0]),
    Part("bench_local_alignment", 40, 20, BENCHES[1]),
    Part("bench_dfa_step", 100, 45, BENCHES[2]),
    Part("bench_trace_conv", 35, 25, BENCHES[3]),
    Part("bench_target_projection_memory", 45, 30, BENCHES[4]),
    Part("bench_bp_throughput", 25, 20, BENCHES[5]),
    Part("training", 140, 110, training),
]


# ---- reports --------------------------------------------------------------------------------------


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def headline_text(record: dict[str, Any]) -> str:
    result = record.get("result", {})
    if record["name"] == "training":
        counts = {status: sum(r["status"] == status for r in result.get("recipes", []))
                  for status in ("ok", "failed", "skipped")}
        return ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    text = ", ".join(f"{key} {number(value)}" for key, value in result.get("headline", {}).items())
    if record["status"] == "skipped":
        return record["reason"]
    if record["status"] == "failed":
        first_line = record["error"].splitlines()[0] if record["error"] else "failed"
        return f"{first_line}; {text}" if text else first_line
    return text


def markdown(check: Check, meta: dict[str, Any]) -> str:
    total = sum(r["elapsed_s"] for r in check.records)
    lines = [f"### gpu_check: {meta['device_name']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']}; "
             f"`{meta['command']}`; {total:.0f} s" + (f" of a {meta['budget_s']:.0f} s budget." if meta["budget_s"] else "."),
             "",
             "| part | status | seconds (budget) | headline |", "| --- | --- | ---: | --- |"]
    for r in check.records:
        budget = f" ({r['budget_s']:.0f})" if r.get("budget_s") else ""
        lines.append(f"| {r['name']} | {r['status']} | {r['elapsed_s']:.0f}{budget} | "
                     f"{headline_text(r).replace('|', '/')} |")
    for r in check.records:
        for failure in r.get("result", {}).get("failures", []):
            lines.append(f"\nkernel check failed: {failure['op']} {failure['case']} {failure['dtype']}: "
                         f"{failure.get('exception') or number(failure['error'])}")
    training_record = next((r for r in check.records if r["name"] == "training" and r.get("result")), None)
    if training_record:
        result = training_record["result"]
        lines += ["", f"1 epoch of each CIFAR recipe on {result['images']} synthetic CIFAR-shaped images, "
                  f"compile={result['compile']}, bf16={result['amp']}, {result['runs_at_once']} run(s) at once "
                  "(steady images/s: median of the progress windows after the first; the epoch's figure "
                  "includes compilation).", "",
                  "| recipe | status | seconds | images/s steady | images/s epoch | peak MiB | train loss | held-out loss |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in result["recipes"]:
            why = (row.get("reason") or row.get("error") or "").strip().splitlines()
            status = f"{row['status']}: {why[-1][:80]}" if why else row["status"]
            lines.append(f"| {row['recipe']} | {status.replace('|', '/')} | {number(row.get('elapsed_s'))} | "
                         f"{number(row.get('images_per_s_steady'))} | {number(row.get('images_per_s_epoch'))} | "
                         f"{number(row.get('peak_memory_mb'))} | {number(row.get('train_loss'))} | "
                         f"{number(row.get('eval_loss'))} |")
    return "\n".join(lines) + "\n"


def write_reports(check: Check, meta: dict[str, Any]) -> None:
    failed = [r["name"] for r in check.records if r["status"] == "failed"]
    write_json(check.out / "gpu_check.json", {"meta": meta, "failed": failed, "parts": check.records})
    (check.out / "gpu_check.md").write_text(markdown(check, meta))


# ---- the run --------------------------------------------------------------------------------------


def run_parts(check: Check, parts: list[Part], budget_scale: float, meta: dict[str, Any]) -> None:
    """Run the parts in order, each within its budget plus the slack the earlier ones left."""
    budgets = [(p.quick_budget_s if check.quick else p.budget_s) * budget_scale for p in parts]
    start = time.monotonic()
    for index, (part, budget) in enumerate(zip(parts, budgets)):
        if check.on_cuda:
            timeout = start + sum(budgets[: index + 1]) - time.monotonic()
        else:
            timeout = CPU_TIMEOUT_S
        record: dict[str, Any] = {"name": part.name, "budget_s": budget if check.on_cuda else None,
                                  "timeout_s": round(timeout, 1)}
        print(f"[{index + 1}/{len(parts)}] {part.name}: timeout {timeout:.0f} s ...", flush=True)
        began = time.monotonic()
        try:
            if timeout < MIN_TIMEOUT_S:
                raise Failed(f"not started: {timeout:.0f} s left of its budget (the parts before it overran)")
            record.update(status="ok", result=part.run(check, timeout))
        except Skipped as skipped:
            record.update(status="skipped", reason=str(skipped))
        except Failed as failed:
            record.update(status="failed", error=str(failed), result=failed.result)
        except Exception as err:  # noqa: BLE001 - a bug in one part must not cost the others
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
        record["elapsed_s"] = time.monotonic() - began
        check.records.append(record)
        print(f"    {record['status']} in {record['elapsed_s']:.1f} s: {headline_text(record)}", flush=True)
        if record["status"] == "failed" and "\n" in record.get("error", ""):
            print("    " + record["error"].replace("\n", "\n    "), flush=True)
        write_reports(check, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes; on CPU only the quick parts")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for the JSON, markdown, logs")
    parser.add_argument("--only", help=f"comma-separated parts to run: {', '.join(p.name for p in PARTS)}")
    parser.add_argument("--train-jobs", type=int, default=None, help="training runs at once (default: 4 on CUDA, 1 on CPU)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    args = parser.parse_args(argv)
    parts = PARTS
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        unknown = wanted - {p.name for p in PARTS}
        if unknown:
            parser.error(f"unknown parts {', '.join(sorted(unknown))}; parts: {', '.join(p.name for p in PARTS)}")
        parts = [p for p in PARTS if p.name in wanted]
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print(f"--device {args.device}, but CUDA is not available here (use --device cpu for a smoke test)")
        return 2
    check = Check(args.device, args.quick, args.out.resolve(), args.train_jobs or (4 if on_cuda else 1))
    check.out.mkdir(parents=True, exist_ok=True)
    size = "cpu" if not on_cuda else "quick" if args.quick else "full"
    write_synthetic_cifar(check.synthetic_npz, TRAIN_IMAGES[size])
    budget = sum(p.quick_budget_s if args.quick else p.budget_s for p in parts) * args.budget_scale
    meta = {**environment(args.device), "quick": args.quick, "budget_s": budget if on_cuda else None,
            "parts": [p.name for p in parts]}
    print(f"gpu_check on {meta['device_name']}: {len(parts)} parts, "
          f"{f'{budget:.0f} s budget' if on_cuda else 'no budget on CPU'}; writing {check.out}", flush=True)
    run_parts(check, parts, args.budget_scale, meta)
    failed = [r["name"] for r in check.records if r["status"] == "failed"]
    print(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}; "
          f"{'failed: ' + ', '.join(failed) if failed else 'no part failed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
