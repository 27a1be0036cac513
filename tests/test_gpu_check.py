"""benchmarks/gpu_check.py, the one command for a GPU, runs end to end: here its CPU smoke test.

A first GPU run may be the only one, so the script itself must not be what breaks there: this runs
``--device cpu --quick`` (kernel checks under the interpreter, two benchmarks at tiny sizes, one
tiny training run; the CUDA-only parts skipped with a reason) and checks what it writes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_quick_runs_every_part_or_says_why_not(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    markdown = (tmp_path / "gpu_check.md").read_text()

    parts = {part["name"]: part for part in report["parts"]}
    assert list(parts) == report["meta"]["parts"] and report["failed"] == []
    for name, part in parts.items():
        assert part["status"] in ("ok", "skipped"), f"{name}: {part.get('error')}"
        assert part["status"] == "ok" or part["reason"], f"{name} skipped without a reason"
        assert f"| {name} | {part['status']} |" in markdown
    assert {"kernels", "bench_local_alignment", "bench_dfa_step", "training"} <= {
        name for name, part in parts.items() if part["status"] == "ok"}

    kernels = parts["kernels"]["result"]["headline"]
    assert kernels["checks"] > 0 and kernels["failed"] == 0
    assert parts["bench_dfa_step"]["result"]["headline"]["dfa_over_bp"] > 0
    runs = {row["recipe"]: row for row in parts["training"]["result"]["recipes"]}
    trained = [row for row in runs.values() if row["status"] == "ok"]
    assert len(trained) == 1 and trained[0]["train_loss"] > 0 and trained[0]["images_per_s_epoch"] > 0
    assert all(row["status"] == "skipped" and row["reason"] for row in runs.values() if row not in trained)
    for key in ("device_name", "torch", "triton", "date", "command"):
        assert report["meta"][key]
