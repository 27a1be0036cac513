"""benchmarks/compare_rules.py: how runs over seeds are summarized (the numbers BENCHMARKS.md reports)."""

import json
from pathlib import Path

import pytest

from benchmarks import compare_rules
from trainer.config import dump_toml
from trainer.recipes import load_recipe


def run(seed: int, accuracy: float, curve: list[tuple[int, float]]) -> dict:
    return {"label": "bp", "recipe": "quickstart", "seed": seed, "wall_s": 10.0, "accuracy": accuracy,
            "images_per_s": 100.0 + seed, "peak_memory_mb": 500.0 + seed, "rule_state_mb": 0.0, "curve": curve}


def test_summary_is_mean_and_sample_sd_over_seeds_with_the_mean_curve():
    runs = [run(0, 0.40, [(1, 0.2), (2, 0.40)]), run(1, 0.44, [(1, 0.3), (2, 0.44)]), run(2, 0.48, [(1, 0.1), (2, 0.48)])]
    summary = compare_rules.summarize("bp", "quickstart", runs)
    assert summary["accuracy"] == pytest.approx(0.44)
    assert summary["accuracy_sd"] == pytest.approx(0.04)  # sample sd of 0.40, 0.44, 0.48
    assert summary["accuracy_per_seed"] == [0.40, 0.44, 0.48]
    assert summary["curve"] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.44))]
    assert summary["peak_memory_mb"] == 502.0 and summary["images_per_s"] == pytest.approx(101.0)
    assert summary["wall_s"] == 30.0 and summary["errors"] == []


def test_failed_seeds_are_named_and_left_out_of_the_mean():
    failed = {"label": "bp", "recipe": "quickstart", "seed": 1, "wall_s": 1.0, "error": ["exit 3: diverged"]}
    summary = compare_rules.summarize("bp", "quickstart", [run(0, 0.5, [(1, 0.5)]), failed])
    assert summary["accuracy"] == 0.5 and summary["accuracy_sd"] == 0.0
    assert summary["errors"] == ["seed 1: exit 3: diverged"]
    only_failed = compare_rules.summarize("bp", "quickstart", [failed])
    assert "accuracy" not in only_failed and only_failed["errors"]


def fake_finished_run(out: Path, overrides: list[str], accuracy: float) -> None:
    out.mkdir(parents=True)
    recipe = load_recipe(compare_rules.RECIPES / "quickstart.toml", overrides)
    (out / "recipe.toml").write_text(dump_toml(recipe.to_dict()))
    (out / "results.json").write_text(json.dumps({"accuracy": accuracy, "images_per_s": 5.0}))
    epochs = [{"step": 1, "split": "train", "epoch": 1, "loss": 2.0},
              *({"step": e, "split": "test", "epoch": e, "accuracy": accuracy / 2 * e, "train_loss": 1.0,
                 "train_accuracy": 0.5, "images_per_s": 5.0, "peak_memory_mb": 10.0, "train_seconds": 20.0}
                for e in (1, 2))]
    (out / "metrics.jsonl").write_text("\n".join(map(json.dumps, epochs)))


def test_reuse_reads_a_finished_run_of_the_same_recipe(tmp_path, monkeypatch):
    fake_finished_run(tmp_path / "run", ["train.epochs=2", "train.seed=3"], 0.9)
    monkeypatch.setattr(compare_rules.subprocess, "run", lambda *a, **k: pytest.fail("trained again"))
    row = compare_rules.run_one("bp", "quickstart", 3, ["train.epochs=2"], tmp_path / "run", {}, reuse=True)
    assert row["accuracy"] == 0.9 and row["seed"] == 3 and row["recipe"] == "quickstart"
    assert row["wall_s"] == 40.0 and row["curve"] == [(1, 0.45), (2, 0.9)]


def test_a_damaged_metrics_line_is_that_seeds_error_not_a_shorter_curve(tmp_path, monkeypatch):
    fake_finished_run(tmp_path / "run", ["train.epochs=2", "train.seed=3"], 0.9)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"split": "test", "epoch": 1}', *lines[2:]]) + "\n")  # epoch 1: no step
    monkeypatch.setattr(compare_rules.subprocess, "run", lambda *a, **k: pytest.fail("trained again"))
    row = compare_rules.run_one("bp", "quickstart", 3, ["train.epochs=2"], tmp_path / "run", {}, reuse=True)
    assert "curve" not in row and row["error"] == [f"{metrics} line 2: no 'step'; train the run again (or mend the "
                                                   "line) before reading its curve"]


def test_reuse_trains_again_when_any_recipe_value_differs(tmp_path):
    fake_finished_run(tmp_path / "run", ["train.epochs=2", "train.seed=3"], 0.9)
    recipe = compare_rules.RECIPES / "quickstart.toml"
    assert compare_rules.finished_run(tmp_path / "run", recipe, ["train.epochs=2", "train.seed=3"]) is not None
    assert compare_rules.finished_run(tmp_path / "run", recipe, ["train.epochs=2", "train.seed=4"]) is None
    assert compare_rules.finished_run(tmp_path / "run", recipe, ["train.epochs=3", "train.seed=3"]) is None
    (tmp_path / "run" / "results.json").unlink()  # interrupted: no results yet
    assert compare_rules.finished_run(tmp_path / "run", recipe, ["train.epochs=2", "train.seed=3"]) is None


@pytest.mark.parametrize("item,flag", [("train.seed=1", "--seeds"), ("train.epochs=3", "--epochs")])
def test_seed_and_epochs_overrides_are_refused_for_their_flags(tmp_path, monkeypatch, capsys, item, flag):
    argv = ["compare_rules.py", "--suite", "mnist5k", "--epochs", "1", "--out", str(tmp_path), "--set", item]
    monkeypatch.setattr(compare_rules.sys, "argv", argv)
    monkeypatch.setattr(compare_rules.subprocess, "run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        compare_rules.main()
    assert exit_info.value.code == 2 and f"use {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("suite", sorted(compare_rules.SUITES))
def test_every_suite_entry_is_a_valid_recipe_with_a_unique_label(suite):
    entries = compare_rules.SUITES[suite]
    assert len({label for label, _, _ in entries}) == len(entries)
    for label, recipe, overrides in entries:
        loaded = load_recipe(compare_rules.RECIPES / f"{recipe}.toml", [*overrides, "train.epochs=1"])
        assert loaded.to_dict()["train"]["epochs"] == 1, label
