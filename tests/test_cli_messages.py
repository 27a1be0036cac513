"""The last tracebacks and misleading messages of the command line (issue 35): each case is now one
clear line naming the key, flag or file and the fix, a note, or correct behaviour. Each test
failed before its fix."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.cli import main

from conftest import make_pattern_images, write_recipe
from test_reliability import cli, fails_cleanly, run_once

LONG = "a" * 300  # one name over the 255 characters file systems allow: os.stat raises ENAMETOOLONG


# --- tracebacks: over-long names -----------------------------------------------------------------


@pytest.mark.parametrize("place, expect", [
    ("out", "error: --out: the file system refuses this name (File name too long: its longest part has 300 "),
    ("data.path", "--set data.path={long}: [data] path: the file system refuses this name (File name too long: "),
    ("data.test_path", "--set data.test_path={long}: [data] test_path: the file system refuses this name (File "),
    ("recipe", "error: recipe: the file system refuses this name (File name too long: its longest part has 305 "),
    ("eval", "error: checkpoint: the file system refuses this name (File name too long: its longest part has 300 "),
    ("runs", "error: run folder: the file system refuses this name (File name too long: its longest part has 300 "),
    ("plot", "error: run folder: the file system refuses this name (File name too long: its longest part has 300 "),
])
def test_an_over_long_name_is_one_line(tmp_path, tiny_npz, capsys, place, expect):
    recipe, long = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1}), str(tmp_path / LONG)
    argv = {"out": ["run", str(recipe), "--out", long],
            "data.path": ["run", str(recipe), "--out", str(tmp_path / "run"), "--set", f"data.path={long}"],
            "data.test_path": ["run", str(recipe), "--out", str(tmp_path / "run"), "--set", f"data.test_path={long}"],
            "recipe": ["run", long + ".toml"], "eval": ["eval", long], "runs": ["runs", long], "plot": ["plot", long]
            }[place]
    err = fails_cleanly(capsys, *argv, expect=expect.format(long=long))
    assert "characters, most file systems allow 255)" in err and long in err and "choose a shorter one" in err


# --- tracebacks: a second Ctrl-C while the process exits ------------------------------------------


def test_a_second_ctrl_c_during_shutdown_prints_no_traceback(tmp_path):
    np.savez(tmp_path / "big.npz", **dict(zip("xy", make_pattern_images(4000))))
    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "big.npz", train={"epochs": 50, "batch_size": 8})
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(recipe), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    lines = []
    while not lines or (lines[-1] and "interrupted:" not in lines[-1]):  # up to the run's last line
        lines.append(process.stderr.readline())
    while process.poll() is None and time.time() < deadline:  # Ctrl-C, again and again, while it exits
        process.send_signal(signal.SIGINT)
        time.sleep(0.002)
    if process.poll() is None:
        process.kill()
    err = "".join(lines) + process.stderr.read()
    process.wait(timeout=60)
    assert "stopped by SIGINT: the checkpoint of epoch" in err, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert process.returncode in (130, -signal.SIGINT), err  # the second Ctrl-C may end it at once


# --- tracebacks: an image format matplotlib cannot write ------------------------------------------


def test_plot_to_an_unsupported_image_format_names_the_supported_ones(tmp_path, tiny_npz, capsys):
    _, out = run_once(tmp_path, tiny_npz, capsys, train={"epochs": 1})
    err = fails_cleanly(capsys, "plot", str(out), "--out", str(tmp_path / "curves.xyz"),
                        expect=f"--out {tmp_path / 'curves.xyz'}: cannot write .xyz images; name a file ending in ")
    assert ".png" in err and ".pdf" in err and ".svg" in err
    assert not (tmp_path / "curves.xyz").exists()
    code, _, err = cli(capsys, "plot", str(out), "--out", str(tmp_path / "curves.SVG"))  # the case does not matter
    assert code == 0 and (tmp_path / "curves.SVG").is_file(), err


# --- misleading: a checkpoint of another recipe ---------------------------------------------------


def test_resume_from_another_recipes_checkpoint_says_so(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    other = write_recipe(tmp_path / "other.toml", tiny_npz, model={"hidden": [16]}, train={"epochs": 3})
    assert main(["run", str(other), "--out", str(out)]) == 0
    capsys.readouterr()
    mine = write_recipe(tmp_path / "mine.toml", tiny_npz, train={"epochs": 2})
    err = fails_cleanly(capsys, "run", str(mine), "--out", str(out), "--resume",
                        expect=f"{out}: --resume: its checkpoint was written by another recipe (model.hidden: [16] → "
                               "[32]); ")
    assert "already finished" not in err


# --- misleading: the file the class count came from -----------------------------------------------


def test_the_class_count_note_names_the_file_holding_the_largest_label(tmp_path, tiny_npz, capsys):
    held_out = tmp_path / "held_out.npz"  # 5 classes; tiny.npz has 4
    np.savez(held_out, **dict(zip("xy", make_pattern_images(100, classes=5, seed=2))))
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, data={"test_path": str(held_out)}, train={"epochs": 1})
    code, stdout, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert f"5 classes, inferred from the labels of {held_out} (labels 0 to 4)" in stdout, stdout


# --- misleading: a byte-order mark ----------------------------------------------------------------


def test_a_recipe_with_a_utf8_byte_order_mark_is_read(tmp_path, tiny_npz, capsys):
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1})
    recipe.write_bytes(b"\xef\xbb\xbf" + recipe.read_bytes())  # as Windows editors save "UTF-8 with BOM"
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["state"] == "finished"
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xef\xbb\xbf[train]\nepochs = 2 # \xff\n")
    fails_cleanly(capsys, "show", str(bad), expect="not UTF-8 text (byte 0xff at offset 24)")  # offsets count the mark


# --- misleading: a folder where a file belongs ----------------------------------------------------


@pytest.fixture
def folder(tmp_path, tiny_npz) -> Path:
    """A folder holding an .npz file and a recipe."""
    path = tmp_path / "things"
    path.mkdir()
    shutil.copy(tiny_npz, path / "tiny.npz")
    write_recipe(path / "r.toml", tiny_npz)
    return path


@pytest.mark.parametrize("key", ["path", "test_path"])
def test_a_folder_given_as_a_data_file_says_so(tmp_path, tiny_npz, capsys, folder, key):
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1})
    fails_cleanly(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", f"data.{key}={folder}",
                  expect=f"--set data.{key}={folder}: [data] {key}: {folder} is a folder, not an .npz file; name the "
                         f"file, e.g. {folder / 'tiny.npz'}")


def test_a_folder_given_to_eval_data_says_so(tmp_path, tiny_npz, capsys, folder):
    _, out = run_once(tmp_path, tiny_npz, capsys, train={"epochs": 1})
    fails_cleanly(capsys, "eval", str(out), "--data", f"npz:{folder}",
                  expect=f"--data: {folder} is a folder, not an .npz file; name the file, e.g. {folder / 'tiny.npz'}")


def test_a_folder_given_as_the_recipe_says_so(capsys, folder):
    fails_cleanly(capsys, "run", str(folder),
                  expect=f"recipe: {folder} is a folder, not a recipe file (.toml); name the file, e.g. "
                         f"{folder / 'r.toml'}")


def test_a_folder_named_like_a_builtin_recipe_still_runs_the_builtin(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist5k_dfa").mkdir()
    code, stdout, err = cli(capsys, "show", "mnist5k_dfa")
    assert code == 0 and "mnist5k_dfa.toml" in stdout, err


# --- misleading: [rule] options set by --set -----------------------------------------------------


def test_a_rule_option_refused_by_its_validation_names_the_set(tmp_path, tiny_npz, capsys):
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, rule={"name": "trace_bp"})
    err = fails_cleanly(capsys, "show", str(recipe), "--set", "rule.probes=0",
                        expect="--set rule.probes=0: [rule] (rule 'trace_bp'): probes")
    assert str(recipe) not in err
    from_file = write_recipe(tmp_path / "f.toml", tiny_npz, rule={"name": "trace_bp", "probes": 0})
    fails_cleanly(capsys, "show", str(from_file), expect=f"{from_file}: [rule] (rule 'trace_bp'): probes")


# --- misleading: a "test" file that holds the training images ---------------------------------------


@pytest.mark.parametrize("same", ["path", "copy"])
def test_a_test_path_holding_the_training_file_is_noted(tmp_path, tiny_npz, capsys, same):
    test = tiny_npz if same == "path" else tmp_path / "copy.npz"
    if same == "copy":
        shutil.copy(tiny_npz, test)
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, data={"test_path": str(test)}, train={"epochs": 1})
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "run", str(recipe), "--out", str(out))
    assert code == 0, err
    note = (f"data.test_path {test} holds the same bytes as data.path {tiny_npz} (sha256 "
            if same == "copy" else f"data.test_path {test} is data.path: ")
    assert stdout.count(note) == 2, stdout  # before training, and again under the results
    assert "test accuracy is measured on training images" in stdout
    assert note in json.loads((out / "results.json").read_text())["note"]


def test_a_test_path_of_other_images_says_nothing(tmp_path, tiny_npz, capsys):
    held_out = tmp_path / "held_out.npz"
    np.savez(held_out, **dict(zip("xy", make_pattern_images(100, seed=2))))
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, data={"test_path": str(held_out)}, train={"epochs": 1})
    code, stdout, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "training images" not in stdout
    assert "note" not in json.loads((tmp_path / "run" / "results.json").read_text())


# --- slow: bf16 autocast asked for on a CPU that emulates bf16 ------------------------------------


@pytest.mark.parametrize("capability, noted", [("AVX2", True), ("AVX512", False), ("DEFAULT", True)])
def test_bf16_on_a_cpu_without_native_bf16_is_noted(tmp_path, tiny_npz, capsys, monkeypatch, capability, noted):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1, "amp": True})
    code, stdout, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert (f"CPU without native bf16 ({capability})" in stdout) is noted, stdout
    assert ("set train.amp = false" in stdout) is noted


# --- misleading: divergence from input noise that drowns the images ---------------------------------


def test_input_noise_that_drowns_the_images_is_refused(tmp_path, tiny_npz, capsys):
    recipe = write_recipe(tmp_path / "r.toml", tiny_npz)
    fails_cleanly(capsys, "show", str(recipe), "--set", "data.input_noise=1000",
                  expect="--set data.input_noise=1000: [data] input_noise: must be at most 10 ")
    code, _, err = cli(capsys, "show", str(recipe), "--set", "data.input_noise=0.5")
    assert code == 0, err
