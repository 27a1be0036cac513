"""torchrun with the gloo backend on CPU: two processes with batch b train exactly like one
process with batch 2b (the gradients of every rule are averaged before each optimizer step)."""

import json
import subprocess
import sys

import pytest
import torch

from trainer.cli import main

from conftest import write_recipe


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "trainer", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


# The norm-ball projection of lra clips each rank's update before the average, so it is off here:
# clipping the mean and averaging the clipped are different things.
EQUIVALENT_RULES = [{"name": "bp"}, {"name": "dfa"}, {"name": "drtp"}, {"name": "tpsgd", "loss": "mse"},
                    {"name": "lra", "max_norm": 0.0}, {"name": "fa"}, {"name": "brsf"}, {"name": "kp"}]


@pytest.mark.parametrize("rule", EQUIVALENT_RULES, ids=[r["name"] for r in EQUIVALENT_RULES])
def test_two_processes_equal_one_with_the_doubled_batch(tmp_path, tiny_npz, rule):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule=rule, train={"epochs": 2, "batch_size": 16},
                        model={"name": "mlp", "hidden": [24, 16]}, data={"crop_padding": 1})
    result = torchrun("run", str(path), "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["run", str(path), "--out", str(tmp_path / "one"), "--set", "train.batch_size=32"]) == 0
    two = torch.load(tmp_path / "two" / "checkpoint.pt")
    one = torch.load(tmp_path / "one" / "checkpoint.pt")
    assert two["step"] == one["step"] > 0 and two["world_size"] == 2 and len(two["rng"]) == 2
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert "held-out" in result.stdout and result.stdout.count("training summary") == 1, "rank 0 alone prints"


CONV_RULES = [{"name": "rec_lra", "alpha": 1.0, "alpha_skip": 1.0}, {"name": "trace_bp"}]


@pytest.mark.parametrize("rule", CONV_RULES, ids=[r["name"] for r in CONV_RULES])
def test_conv_rules_run_under_torchrun(tmp_path, tiny_npz, rule):
    """BatchNorm statistics are per process and trace_bp's probes differ by rank on purpose, so
    these are not equal to one process: they must run, learn and stay finite."""
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule=rule, train={"epochs": 3, "batch_size": 16},
                        model={"name": "cnn", "width": 4}, optim={"name": "adamw", "lr": 0.01})
    result = torchrun("run", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["accuracy"] > 0.4  # chance is 0.25


def test_resume_needs_the_same_world_size(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1, "batch_size": 16},
                        optim={"schedule": "constant"})
    first = torchrun("run", str(path), "--out", str(tmp_path / "run"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("run", str(path), "--out", str(tmp_path / "run"), "--resume", "--set", "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and torch.load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--resume", "--set", "train.epochs=3"]) == 2
    assert "written by 2 process(es)" in capsys.readouterr().err
