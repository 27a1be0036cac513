"""The loop end to end: learning, resume equivalence, divergence, eval and the CLI."""

import json

import pytest
import torch

import trainer.loop
from trainer.cli import main
from trainer.recipes import load_recipe
from trainer.loop import TrainingDiverged, train

from conftest import write_recipe


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bp_learns_and_writes_its_files(tmp_path, tiny_npz):
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 4}))
    result = train(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    held_out = [r for r in records if r["split"] == "held-out"]
    assert [r["epoch"] for r in held_out] == [1, 2, 3, 4]
    assert held_out[-1]["accuracy"] > 0.9  # chance is 0.25
    first_logged_loss = next(r["loss"] for r in records if r["split"] == "train")
    assert held_out[-1]["train_loss"] < 0.5 * first_logged_loss  # it learned, not just started well
    assert held_out[-1]["accuracy"] == result["accuracy"]
    for key in ("step", "epoch", "loss", "accuracy", "images_per_s", "peak_memory_mb"):
        assert key in held_out[-1]
    assert all(k in records[0] for k in ("lr", "loss", "images_per_s", "peak_memory_mb"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.pt", "metrics.jsonl", "recipe.toml", "results.json"]
    assert load_recipe(tmp_path / "run" / "recipe.toml").to_dict() == recipe.to_dict()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, tiny_npz, monkeypatch):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 3, "log_every": 1},
                        data={"crop_padding": 1}, optim={"name": "adamw", "lr": 0.01})
    train(load_recipe(path), tmp_path / "full")

    saves = []
    original = trainer.loop.save_checkpoint

    def crash_after_first_epoch(*args):
        original(*args)
        saves.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.loop, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(path), tmp_path / "cut")
    monkeypatch.setattr(trainer.loop, "save_checkpoint", original)
    with pytest.raises(Exception, match="already holds a run; continue it with --resume"):
        train(load_recipe(path), tmp_path / "cut")
    train(load_recipe(path), tmp_path / "cut", resume=True)
    results = (tmp_path / "cut" / "results.json").read_text()
    with pytest.raises(Exception, match="already finished 3 of train.epochs = 3"):
        train(load_recipe(path), tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "results.json").read_text() == results

    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in full] == [r["step"] for r in cut]
    assert [r["loss"] for r in full] == [r["loss"] for r in cut]
    a = torch.load(tmp_path / "full" / "checkpoint.pt")["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 2}, optim={"lr": 1e30, "schedule": "constant"})
    with pytest.raises(TrainingDiverged, match="loss became (nan|inf)"):
        train(load_recipe(path), tmp_path / "run")
    assert main(["run", str(path), "--out", str(tmp_path / "run2")]) == 3
    assert "optim.lr=1e+30 (sgd) came from recipe r: lower it" in capsys.readouterr().err


def test_eval_on_the_recipe_split_and_on_npz(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 2})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    own = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert own["accuracy"] == pytest.approx(results["accuracy"]) and own["samples"] == 100
    assert main(["eval", str(tmp_path / "run" / "checkpoint.pt"), "--data", f"npz:{tiny_npz}", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert whole["samples"] == 400 and whole["loss"] > 0
    correct = whole["accuracy"] * 400  # a count over the whole file, close to the held-out split's rate
    assert correct == pytest.approx(round(correct)) and abs(whole["accuracy"] - own["accuracy"]) < 0.15
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert main(["eval", str(tmp_path / "run"), "--data", "npz:/no/such.npz"]) == 2
    assert main(["eval", str(tmp_path / "run"), "--data", "mnist5k"]) == 2  # 28x28 images, model takes 12x12
    assert "trained on (1, 12, 12)" in capsys.readouterr().err


def test_cli_list_and_show(capsys):
    assert main(["list"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert main(["show", "quickstart", "--set", "train.epochs=1"]) == 0
    assert "epochs = 1" in capsys.readouterr().out


def test_compiled_training_equals_eager(tmp_path, tiny_npz):
    """The compiled forward is the same function: the same batches give the same losses, step by
    step, to float32 round-off (inductor reorders sums), and the same held-out accuracy."""
    losses, results = {}, {}
    for compiled in (False, True):
        path = write_recipe(tmp_path / f"{compiled}.toml", tiny_npz,
                            train={"epochs": 1, "compile": compiled, "log_every": 1})
        results[compiled] = train(load_recipe(path), tmp_path / f"run_{compiled}")
        records = [json.loads(line) for line in (tmp_path / f"run_{compiled}" / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in records if r.get("split") == "train"]
    assert len(losses[True]) == len(losses[False]) >= 5
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert results[True]["accuracy"] == pytest.approx(results[False]["accuracy"], abs=0.03)
    assert results[False]["accuracy"] > 0.6  # chance is 0.25


def test_logged_learning_rate_is_the_models_whatever_the_rules_groups(tmp_path, tiny_npz):
    """LRA's error maps learn at γ·lr in groups of their own; γ = 0 must not make the log say lr = 0."""
    path = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "lra", "gamma": 0.0},
                        optim={"lr": 0.02, "schedule": "constant"}, train={"epochs": 1, "log_every": 2})
    train(load_recipe(path), tmp_path / "run")
    logged = {r["lr"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"}
    assert logged == {0.02}
