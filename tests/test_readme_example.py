"""The README's code examples run as written and learn."""

import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

README = (Path(__file__).parent.parent / "README.md").read_text()


def run_example(name: str, **namespace) -> dict:
    code = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    return namespace


def test_reuse_kernels_example_learns(capsys):
    losses = run_example("reuse-kernels")["losses"]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert "loss" in capsys.readouterr().out


def test_rule_in_your_own_loop_example_learns():
    torch.manual_seed(0)
    images = torch.randn(512, 1, 28, 28)
    labels = (images.flatten(1) @ torch.randn(28 * 28, 10)).argmax(1)  # a linear teacher
    loader = DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True)
    namespace = run_example("own-loop", loader=loader)
    with torch.no_grad():
        accuracy = (namespace["model"](images).argmax(1) == labels).float().mean()
    assert accuracy > 0.6  # chance is 0.1
    assert namespace["rule"].diagnostics()["angle"] < 85  # the hidden units' updates align with BP's
