"""Inputs that once trained silently wrong, or ended in a traceback or the OOM killer (issue 24):
each now stops the CLI with one line naming the key or file, the value and the fix (exit code 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.cli import main

from conftest import make_pattern_images, write_recipe


def fails_cleanly(capsys, *args: str, expect: str) -> str:
    """Run the CLI in-process; exit code 2, ``expect`` in a one-line stderr, no traceback."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def save(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def run(tmp_path: Path, npz: Path, *sets: str, **sections: dict) -> list[str]:
    """The argv of a one-epoch run of ``npz``."""
    recipe = write_recipe(tmp_path / "r.toml", npz, **{"train": {"epochs": 1}, **sections})
    return ["run", str(recipe), "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]


# --- 3. npz files without images ----------------------------------------------------------------


@pytest.mark.parametrize("empty_key", ["path", "test_path"])
def test_an_npz_without_images_is_refused_at_load_time(tmp_path, tiny_npz, capsys, empty_key):
    empty = save(tmp_path / "empty.npz", np.zeros((0, 12, 12), np.uint8), np.zeros(0, np.int64))
    files = {"path": str(tiny_npz), "test_path": str(tiny_npz), empty_key: str(empty)}
    argv = run(tmp_path, tiny_npz, data={**files, "val_fraction": 0.0})
    fails_cleanly(capsys, *argv, expect=f"[data] {empty_key}: {empty} holds 0 image(s)")
    assert not (tmp_path / "run").exists()


# --- 2. labels that do not fit ------------------------------------------------------------------


def labels_with(value, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The tiny pattern set with label 3 replaced by ``value``, all labels of ``dtype``."""
    x, y = make_pattern_images(64, size=12)
    y = y.astype(dtype)
    y[3] = value
    return x, y


@pytest.mark.parametrize("value, dtype, expect", [
    (2**64 - 1, np.uint64, "label 18446744073709551615 (uint64) is out of range"),
    (2**63, np.uint64, "label 9223372036854775808 (uint64) is out of range"),
    (-1, np.int64, "label -1 (int64) is out of range"),
    (-128, np.int8, "label -128 (int8) is out of range"),
    (2**32 - 1, np.uint32, "label 4294967295 (uint32) is out of range"),
    (10**12, np.int64, "label 1000000000000 (int64) is out of range"),
    (True, np.bool_, "y must be integer labels of shape (64,), got bool"),
    (2.0, np.float32, "y must be integer labels of shape (64,), got float32"),
    (np.nan, np.float64, "y must be integer labels of shape (64,), got float64"),
])
def test_labels_that_do_not_fit_are_refused_naming_the_value(tmp_path, capsys, value, dtype, expect):
    npz = save(tmp_path / "labels.npz", *labels_with(value, dtype))
    err = fails_cleanly(capsys, *run(tmp_path, npz), expect=f"[data] path: {npz}: {expect}")
    assert "numpy" in err, "the message says how to fix the labels"


def test_a_huge_num_classes_is_refused(tmp_path, tiny_npz, capsys):
    fails_cleanly(capsys, *run(tmp_path, tiny_npz, "data.num_classes=10000000000"),
                  expect="[data] num_classes: must be 0 (the data set's own) or the number of classes, at most 1048576")
