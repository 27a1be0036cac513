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
