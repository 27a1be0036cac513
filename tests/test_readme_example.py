"""The README's kernel-reuse example runs as written and learns."""

import re
from pathlib import Path


def test_reuse_kernels_example_learns(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"<!-- example: reuse-kernels -->\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md:reuse-kernels", "exec"), namespace)
    losses = namespace["losses"]
    assert losses[-1] < 0.5 * losses[0], losses[::20]
    assert "loss" in capsys.readouterr().out
