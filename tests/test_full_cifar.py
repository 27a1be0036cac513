"""benchmarks.full_cifar: its recipes load, and its table is computed right from made-up published runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import full_cifar
from trainer.recipes import load_recipe


@pytest.mark.parametrize("row", full_cifar.ROWS, ids=lambda row: row.rule)
def test_every_row_has_a_recipe_on_the_full_split(row: full_cifar.Row) -> None:
    recipe = load_recipe(full_cifar.recipe_path(row.rule))
    assert (recipe.model.name, recipe.data.name, recipe.data.val_fraction) == ("resnet20", "npz", 0.1)
    assert recipe.train.epochs == load_recipe(full_cifar.recipe_path("bp")).train.epochs  # one budget
    expected = {"rec_lra_stages": "rec_lra", "hybrid": "dfa"}.get(row.rule, row.rule)
    assert recipe.rule.name == expected


def publish_made_up(results: Path, rule: str, seed: int, accuracy: float, epoch_seconds: list[float],
                    amp: bool) -> None:
    folder = results / rule / f"seed{seed}"
    folder.mkdir(parents=True)
    final = {"state": "finished", "epochs": len(epoch_seconds), "accuracy": accuracy, "images_per_s": 400.0 + seed,
             "peak_memory_mb": 1000.0 + seed, "train_seconds": sum(epoch_seconds), "epoch_seconds": epoch_seconds}
    (folder / "results.json").write_text(json.dumps(final))
    (folder / "recipe.toml").write_text(f"[train]\namp = {'true' if amp else 'false'}\n")


def test_table_rows_from_published_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed, accuracy in enumerate((0.90, 0.91, 0.92)):
        publish_made_up(tmp_path, "bp", seed, accuracy, [60.0, 62.0 + seed], amp=True)
    publish_made_up(tmp_path, "fa", 0, 0.70, [70.0, 71.0], amp=False)
    bp = full_cifar.summarize(full_cifar.ROWS[0], tmp_path)
    assert bp is not None and bp["seeds"] == [0, 1, 2]
    assert bp["accuracy"] == pytest.approx(91.0)
    assert bp["accuracy_sd"] == pytest.approx(statistics.stdev([90.0, 91.0, 92.0]))
    assert bp["epoch_s"] == pytest.approx(statistics.fmean([60, 62, 60, 63, 60, 64]))
    assert bp["peak_memory_mb"] == 1002.0 and bp["bf16"] and bp["biotorch_sgd"] == 90.58
    full_cifar.main(["--results", str(tmp_path), "table", "--markdown"])
    text = capsys.readouterr().out
    assert "| bp | 3 | 91.00 ± 1.00 |" in text
    assert "| fa | 1 | 70.00 | 70 |" in text and "| dfa | – | not yet trained |" in text
    assert json.loads((tmp_path / "table.json").read_text())[1]["rule"] == "fa"
