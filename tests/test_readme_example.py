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


def test_any_model_example_learns(capsys):
    torch.manual_seed(0)
    images = torch.randn(256, 3, 32, 32)
    labels = (images.flatten(1) @ torch.randn(3 * 32 * 32, 10)).argmax(1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    namespace = run_example("any-model", loader=loader)
    assert namespace["dfa_zoo"].unit_names == ["features.3", "features.8", "output"]
    assert namespace["dfa_mine"].unit_names == ["end", "output"]
    printed = capsys.readouterr().out
    assert "MobileNetV3: units" in printed and "TwoPaths: units" in printed
    with torch.no_grad():
        accuracy = (namespace["mine"](images).argmax(1) == labels).float().mean()
    assert accuracy > 0.3  # chance is 0.1


def linear_teacher_loader(n: int = 512, batch: int = 64):
    torch.manual_seed(0)
    images = torch.randn(n, 1, 28, 28)
    labels = (images.flatten(1) @ torch.randn(28 * 28, 10)).argmax(1)
    return images, labels, DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True)


def test_prepare_example_learns_through_the_users_own_backward(capsys):
    images, labels, loader = linear_teacher_loader()
    namespace = run_example("prepare", loader=loader)
    assert not namespace["model"].training, "net.eval() set the model's mode"
    with torch.no_grad():
        accuracy = (namespace["net"](images).argmax(1) == labels).float().mean()
    assert accuracy > 0.5  # chance is 0.1
    assert capsys.readouterr().out.count("epoch") == 3


def test_lightning_example_learns():
    import pytest

    pytest.importorskip("lightning", reason="pip install -e '.[dev]' brings lightning")
    images, labels, loader = linear_teacher_loader()
    namespace = run_example("lightning", loader=loader)
    net = namespace["lit"].net.eval()
    with torch.no_grad():
        accuracy = (net(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.4


def test_ddp_example_runs_under_torchrun_and_learns(tmp_path):
    import subprocess
    import sys

    code = re.search(r"<!-- example: ddp -->\n```python\n(.*?)```", README, re.S).group(1)
    script = tmp_path / "own_ddp.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent.parent, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"accuracy (\S+)", result.stdout).group(1))
    assert accuracy > 0.6 and result.stdout.count("accuracy") == 1  # chance is 0.25; rank 0 alone prints


def test_strip_feedback_example_loads_strictly_into_the_plain_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_example("strip-feedback")
    assert set(namespace["trained"].state_dict()) > set(namespace["plain"].state_dict()), "the feedback state is dropped"
