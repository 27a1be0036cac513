"""Every Triton kernel compiles for an H100 (sm_90) through Triton's real pipeline, without a GPU.

The rest of the suite runs the kernels under the interpreter, which checks their math but never
lowers them; ``benchmarks/compile_kernels.py`` compiles each launcher variant down to ``ptxas``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DEF = re.compile(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (_\w+_kernel)\(")


def test_every_kernel_compiles_for_sm90_within_shared_memory_and_registers(tmp_path: Path) -> None:
    out = tmp_path / "compile.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_kernels", "--arch", "90", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    variants = json.loads(out.read_text())["variants"]

    defined = {name for path in (ROOT / "kernels").glob("*.py") for name in KERNEL_DEF.findall(path.read_text())}
    assert defined, "no Triton kernels found in kernels/"
    assert {v["kernel"] for v in variants} == defined, "every kernel in kernels/ must have a case in compile_kernels.py"
    spilling = [f"{v['case']}: {v['kernel']} spills {v['spill_bytes']} B" for v in variants if v["spill_bytes"]]
    assert not spilling, "register spills on sm_90 (shrink the tile or add warps): " + "; ".join(spilling)
    assert all(v["registers"] for v in variants), "ptxas -v reported no register count"
