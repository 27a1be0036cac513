"""benchmarks/gpu_check.py, the one command for a GPU, runs end to end: here its CPU smoke test.

A first GPU run may be the only one, so the script itself must not be what breaks there: this runs
``--device cpu --quick`` (kernel checks under the interpreter, two benchmarks at tiny sizes, one
tiny training run; the CUDA-only parts skipped with a reason) and checks what it writes.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_quick_runs_every_part_or_says_why_not(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
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


META = {"device_name": "test GPU", "date": "today", "torch": "t", "triton": "t", "cuda": "c", "python": "p",
        "command": "gpu_check.py", "budget_s": 100.0}


def test_each_part_gets_its_budget_plus_the_slack_before_it_and_a_failure_stops_nothing(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(gpu_check.time, "monotonic", lambda: now[0])
    timeouts = {}

    def part(name, seconds, error=None):
        def run(check, timeout):
            timeouts[name] = timeout
            now[0] += seconds
            if error:
                raise error
            return {"headline": {"value": 1.5}}
        return run

    parts = [gpu_check.Part("fast", 30, 30, part("fast", 10)),
             gpu_check.Part("broken", 20, 20, part("broken", 60, RuntimeError("boom"))),
             gpu_check.Part("starved", 25, 25, part("starved", 0)),
             gpu_check.Part("last", 40, 40, part("last", 5))]
    check = gpu_check.Check("cuda", False, tmp_path, 1)
    gpu_check.run_parts(check, parts, 1.0, META)

    # "fast" leaves 20 s to "broken", which overruns by 20 s: 5 s are left of "starved"'s budget
    assert timeouts == {"fast": 30, "broken": 40, "last": 45}
    records = {r["name"]: r for r in check.records}
    assert [r["status"] for r in check.records] == ["ok", "failed", "failed", "ok"]
    assert records["broken"]["error"] == "RuntimeError: boom"
    assert records["starved"]["error"].startswith("not started")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == ["broken", "starved"]
    assert "| fast | ok | 10 (30) | value 1.50 |" in (tmp_path / "gpu_check.md").read_text()


def test_a_subprocess_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    start = time.monotonic()
    returncode = gpu_check.run_logged([sys.executable, "-c", parent], tmp_path / "log", 2.0, dict(os.environ))
    assert returncode is None and time.monotonic() - start < 20
    assert "killed after 2 s" in (tmp_path / "log").read_text()
    child_pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the child {child_pid} outlived the timeout")
