"""Pitfalls a user met on the command line (issue 24): runs that went on silently although they
were wrong, and tracebacks where one clear line belongs. Each test failed before its fix."""

import json
from pathlib import Path

import numpy as np
import torch

from trainer.cli import main

from conftest import make_pattern_images, write_recipe
from test_reliability import cli, fails_cleanly, run_once, snapshot

# On tiny.npz, DFA at lr 5 (constant) blows the loss up to ~2e4 at step 3 and back to 0 by step 4:
# the logged steps of log_every = 5 never see it, the epoch's mean loss (2647) does.
HOT = {"optim": {"lr": 5.0, "schedule": "constant"}, "train": {"epochs": 1}}


def hot_recipe(tmp_path: Path, npz: Path, log_every: int) -> Path:
    return write_recipe(tmp_path / "hot.toml", npz, optim=HOT["optim"], train={**HOT["train"], "log_every": log_every})


# --- 1. an exploded loss is a diverged run, and says where the learning rate came from -------------


def test_a_loss_exploded_at_a_logged_step_stops_the_run(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "run", str(hot_recipe(tmp_path, tiny_npz, log_every=1)), "--out", str(out),
                            "--set", "rule.name=dfa")
    assert code == 3, err
    assert "loss exploded to" in err and "at step 3 (epoch 1)" in err and "Traceback" not in err
    assert "optim.lr=5 (sgd) came from recipe hot, tuned for rule bp: lower it, e.g. --set optim.lr=0.5" in err
    assert "note: rule dfa inherits optim.name='sgd', optim.lr=5.0, optim.schedule='constant' from recipe hot, " \
           "tuned for rule bp" in stdout
    assert json.loads((out / "results.json").read_text())["state"] == "diverged"


def test_a_loss_exploded_between_logged_steps_stops_at_the_epoch_end(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    fails_cleanly(capsys, "run", str(hot_recipe(tmp_path, tiny_npz, log_every=5)), "--out", str(out),
                  "--set", "rule.name=dfa", code=3, expect="the mean training loss exploded to 2647")
    assert not (out / "checkpoint.pt").exists(), "a diverged epoch is not checkpointed"


def test_the_recipes_own_rule_inherits_nothing(tmp_path, tiny_npz, capsys):
    code, stdout, err = cli(capsys, "run", str(write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1})),
                            "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "inherits" not in stdout


def test_a_learning_rate_set_on_the_command_line_is_blamed_on_the_set(tmp_path, tiny_npz, capsys):
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1, "log_every": 1})
    fails_cleanly(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "rule.name=dfa",
                  "--set", "optim.lr=5", "--set", "optim.schedule=constant", code=3,
                  expect="optim.lr=5 (sgd) came from --set: lower it")


# --- 2. a learning rate beyond float32 overflows the first update: a diverged run, no traceback ---


def test_a_learning_rate_beyond_float32_is_a_diverged_run(tmp_path, tiny_npz, capsys):
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1})
    fails_cleanly(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "optim.lr=1e308", code=3,
                  expect="the update of step 1 (epoch 1) overflowed float32")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run2"), "--set", "optim.lr=1e308",
                 "--set", "optim.name=adamw"]) == 3


# --- 3. --resume refuses data files that changed under the same name --------------------------


def test_resume_refuses_an_npz_overwritten_with_other_images(tmp_path, tiny_npz, capsys):
    recipe, out = run_once(tmp_path, tiny_npz, capsys)
    x, y = make_pattern_images(400, seed=1)  # the same size, other images
    np.savez(tiny_npz, x=x, y=y)
    before = snapshot(out)
    fails_cleanly(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3",
                  expect=f"{tiny_npz} (data.path): the file changed since the checkpoint was written (its sha256 "
                         "differs); --resume needs the images it trained on")
    assert snapshot(out) == before


def test_resume_refuses_a_changed_test_path(tmp_path, tiny_npz, capsys):
    held_out = tmp_path / "held_out.npz"
    np.savez(held_out, **dict(zip("xy", make_pattern_images(100, seed=2))))
    recipe, out = run_once(tmp_path, tiny_npz, capsys, data={"test_path": str(held_out)})
    np.savez(held_out, **dict(zip("xy", make_pattern_images(120, seed=2))))
    fails_cleanly(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3",
                  expect=f"{held_out} (data.test_path): the file changed since the checkpoint was written (")


def test_resume_of_a_checkpoint_without_fingerprints_goes_on(tmp_path, tiny_npz, capsys):
    recipe, out = run_once(tmp_path, tiny_npz, capsys)
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    del payload["data"]["files"]  # as written before checkpoints held them
    torch.save(payload, out / "checkpoint.pt")
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3")
    assert code == 0, err
    assert "files" in torch.load(out / "checkpoint.pt", weights_only=True)["data"]
