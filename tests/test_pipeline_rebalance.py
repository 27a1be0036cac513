"""A local rule's pipeline times its stages' first real steps and moves the cut once if the slowest
stage lags the mean by more than 10 % (``trainer.pipeline.rebalanced_stages``); the run still
equals one process, and resumes at the moved cut."""

import pytest
import torch

from conftest import write_recipe
from test_pipeline import assert_same_model, pipeline_equals_one_process, torchrun
from trainer.cli import main
from trainer.pipeline import balanced_stages, rebalanced_stages

SLOW_NETS = '''
import time

import torch
from torch import nn


class SlowOnceTrained(nn.Linear):
    """Sleeps 10 ms in every training forward once its weight has changed: the pipeline's probe,
    which never steps, sees it fast; the real steps see it slow."""

    def __init__(self, *args):
        super().__init__(*args)
        self.initial = self.weight.detach().clone()

    def forward(self, x):
        if self.training and not torch.equal(self.weight, self.initial):
            time.sleep(0.01)
        return super().forward(x)


def mlp(num_classes, input_shape):
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], 24),
                                       nn.Tanh()),
                         nn.Sequential(SlowOnceTrained(24, 24), nn.Tanh()),
                         nn.Sequential(nn.Linear(24, 16), nn.Tanh()),
                         nn.Linear(16, num_classes))
'''


def test_the_cut_moves_only_for_a_lagging_stage_and_never_for_the_worse():
    two = [range(0, 2), range(2, 4)]
    # stage 0 measured 5 times stage 1: its two units share 0.05 s as the probe's 1 : 3 says
    moved, predicted = rebalanced_stages([1.0, 3.0, 1.0, 1.0], two, [0.05, 0.01])
    assert moved == [range(0, 1), range(1, 4)] and predicted == pytest.approx([0.0125, 0.0475])
    assert rebalanced_stages([1.0, 1.0, 1.0, 1.0], two, [0.0105, 0.0095]) is None  # 5 % above the mean: kept
    assert rebalanced_stages([1.0, 1.0, 1.0, 1.0], two, [0.05, 0.0]) is not None  # a stage of no time
    # one unit carries all of the slow stage: no cut makes the slowest stage faster
    assert rebalanced_stages([1.0, 0.0, 1.0, 1.0], [range(0, 1), range(1, 4)], [0.05, 0.01]) is None
    generator = torch.Generator().manual_seed(5)
    for n, stages in [(6, 2), (7, 3), (9, 4)]:
        for _ in range(20):
            costs = (torch.rand(n, generator=generator) + 0.05).tolist()
            ranges = balanced_stages((torch.rand(n, generator=generator) + 0.05).tolist(), stages)  # a wrong probe
            seconds = (torch.rand(stages, generator=generator) + 0.01).tolist()
            found = rebalanced_stages(costs, ranges, seconds)
            if found is None:
                continue
            moved, predicted = found
            assert moved != ranges and max(predicted) < max(seconds) and sum(predicted) == pytest.approx(sum(seconds))
            assert [r.start for r in moved][0] == 0 and moved[-1].stop == n and all(len(r) for r in moved)


@pytest.mark.parametrize("rule, micro, one_batch, optim", [
    ({"name": "dfa"}, 2, 16, {"name": "adamw", "lr": 0.01}),
    ({"name": "drtp"}, 2, 8, {"name": "sgd", "lr": 0.01}),
], ids=["dfa", "drtp"])
def test_a_bad_cut_moves_and_training_still_equals_one_process(tmp_path, tiny_npz, monkeypatch, rule, micro,
                                                                one_batch, optim):
    (tmp_path / "slow_nets.py").write_text(SLOW_NETS)
    monkeypatch.chdir(tmp_path)  # torchrun's workers import slow_nets from here
    monkeypatch.syspath_prepend(str(tmp_path))
    result = pipeline_equals_one_process(tmp_path, tiny_npz, rule, stages=2, micro=micro, one_batch=one_batch,
                                         model={"name": "python:slow_nets:mlp"}, optim=optim)
    notes = [line for line in result.stdout.splitlines() if "rebalanced after" in line or "kept the cut" in line]
    assert len(notes) == 1 and "rebalanced after 6 batches: stage times" in notes[0] \
        and "→ cut moved from" in notes[0], result.stdout[-3000:]


def test_a_rebalanced_run_resumes_at_its_cut(tmp_path, tiny_npz, monkeypatch):
    """The resumed run's probe cuts as badly as the first one's: its stages go back to the
    checkpoint's cut, whose optimizer state the stage parts hold, and train on as one process."""
    (tmp_path / "slow_nets.py").write_text(SLOW_NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "dfa"}, model={"name": "python:slow_nets:mlp"},
                        optim={"name": "adamw", "lr": 0.01, "schedule": "constant"},
                        train={"epochs": 1, "batch_size": 16, "pipeline_stages": 2, "micro_batches": 2})
    first = torchrun(2, "run", str(path), "--out", str(tmp_path / "pipe"))
    assert first.returncode == 0 and "cut moved from" in first.stdout, first.stderr[-3000:]
    resumed = torchrun(2, "run", str(path), "--out", str(tmp_path / "pipe"), "--resume", "--set", "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at the checkpoint's cut" in resumed.stdout and "rebalanced after" not in resumed.stdout
    assert main(["run", str(path), "--out", str(tmp_path / "one"), "--set", "train.epochs=2",
                 "--set", "train.pipeline_stages=1", "--set", "train.micro_batches=1"]) == 0
    assert_same_model(tmp_path / "pipe", tmp_path / "one")


@pytest.mark.parametrize("train", [{"rebalance": False}, {"stage_boundaries": ["2"]}], ids=["off", "by-hand"])
def test_the_cut_stays_when_rebalancing_is_off_or_the_cut_is_set_by_hand(tmp_path, tiny_npz, monkeypatch, train):
    (tmp_path / "slow_nets.py").write_text(SLOW_NETS)
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "dfa"}, model={"name": "python:slow_nets:mlp"},
                        train={"epochs": 1, "batch_size": 16, "pipeline_stages": 2, **train})
    result = torchrun(2, "run", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rebalanced after" not in result.stdout and "kept the cut" not in result.stdout
