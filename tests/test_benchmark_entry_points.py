"""Every benchmark script starts both ways a reader may type it: ``python -m benchmarks.NAME`` and
``python benchmarks/NAME.py`` (which puts the checkout first on ``sys.path`` itself); ``--help``
imports everything the script needs, so a broken import or entry point fails here.

A fresh interpreter a script and a form costs about 40 torch imports (minutes on a busy machine),
so two child processes, one a form, run every script in turn as that form would: its own sys.path
(the checkout first for ``-m``; the script's folder first, and no checkout, for a file), sys.argv
and ``__main__``, with every ``benchmarks`` module dropped before the next script.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py")
                 if 'if __name__ == "__main__":' in path.read_text())

RUNNER = r"""
import contextlib, io, json, runpy, sys
form, root, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
others = [p for p in sys.path[1:] if p != root]  # sys.path[0] is python -c's working directory
results = {}
for name in names:
    for module in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[module]
    script = f"{root}/benchmarks/{name}.py"
    if form == "file":  # python benchmarks/NAME.py: the script's folder first, the checkout nowhere
        sys.path[:], sys.argv = [f"{root}/benchmarks", *others], [f"benchmarks/{name}.py", "--help"]
        run = lambda: runpy.run_path(script, run_name="__main__")
    else:  # python -m benchmarks.NAME from the checkout: the working directory first
        sys.path[:], sys.argv = [root, *others], [script, "--help"]
        run = lambda: runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run()
        except SystemExit as stop:
            code = stop.code
        except BaseException as error:
            code = f"{type(error).__name__}: {error}"
    results[name] = {"code": code, "out": out.getvalue()[:200], "err": err.getvalue()[-2000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helped() -> dict[str, dict]:
    """{form: {script: its exit code, stdout and stderr}} of ``--help`` in both forms (run at once)."""
    # compile_kernels refuses TRITON_INTERPRET=1 (which the suite sets) before it parses its flags
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    running = {form: subprocess.Popen([sys.executable, "-c", RUNNER, form, str(ROOT), json.dumps(SCRIPTS)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for form in ("module", "file")}
    results = {}
    for form, process in running.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results[form] = json.loads(out.strip().splitlines()[-1])
    return results


def test_the_scripts_are_found():
    assert {"claims", "bench_rule_step", "bench_dfa_step", "bench_weight_transport", "full_cifar"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("form", ["module", "file"])
def test_help_runs(helped, form, name):
    result = helped[form][name]
    typed = f"python -m benchmarks.{name}" if form == "module" else f"python benchmarks/{name}.py"
    assert result["code"] in (0, None) and result["out"].startswith("usage:"), f"{typed} --help:\n{result}"
