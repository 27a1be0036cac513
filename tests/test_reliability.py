"""Bad input and faults, as a user meets them from the command line: each gives exit code 2 (or
the documented code) and one line that names the file, key or path and the fix, no traceback;
run folders are locked, resumes are honest, output off a terminal is plain lines."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.checkpoint
from trainer.cli import main
from trainer.run_folder import LOCK_NAME

from conftest import make_pattern_images, write_recipe


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails_cleanly(capsys, *args: str, expect: str, code: int = 2) -> str:
    """Run the CLI; assert the exit code, that stderr names ``expect`` on one line, no traceback."""
    got, _, err = cli(capsys, *args)
    assert got == code, err
    assert expect in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def run_once(tmp_path: Path, npz: Path, capsys, **sections) -> tuple[Path, Path]:
    """A finished two-epoch run: (recipe, run folder)."""
    recipe = write_recipe(tmp_path / "r.toml", npz, **sections)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    return recipe, out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- tracebacks that are now one clear error -------------------------------------------------


def test_recipe_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_bytes(b"[train]\nepochs = 2 # \xff\xfe\n")
    fails_cleanly(capsys, "run", str(path), expect="not UTF-8 text (byte 0xff at offset 21); save the recipe as UTF-8")


def test_cuda_device_without_an_index(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz)
    fails_cleanly(capsys, "run", str(path), "--set", "train.device=cuda:x",
                  expect="--set train.device=cuda:x: [train] device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


@pytest.mark.parametrize("count", [0, 1])
def test_npz_with_too_few_images(tmp_path, capsys, count):
    npz = tmp_path / "few.npz"
    np.savez(npz, x=np.zeros((count, 8, 8), np.uint8), y=np.zeros(count, np.int64))
    path = write_recipe(tmp_path / "r.toml", npz)
    fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "run"),
                  expect=f"{count} image(s): at least 2 are needed")
    assert not (tmp_path / "run").exists(), "a failed start leaves no empty run folder behind"


def test_npy_renamed_npz_in_run_and_in_eval(tmp_path, tiny_npz, capsys):
    fake = tmp_path / "fake.npz"
    np.save(tmp_path / "arr.npy", np.zeros((4, 8, 8), np.uint8))
    (tmp_path / "arr.npy").rename(fake)
    path = write_recipe(tmp_path / "bad.toml", fake)
    fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "bad"), expect="is a single .npy array; write")
    _, out = run_once(tmp_path, tiny_npz, capsys, train={"epochs": 1})
    fails_cleanly(capsys, "eval", str(out), "--data", f"npz:{fake}", expect="--data: ")


def test_random_bytes_named_npz_do_not_advise_pickles(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(300))
    err = fails_cleanly(capsys, "run", str(write_recipe(tmp_path / "r.toml", junk)), expect="is not an .npz archive")
    assert "pickle" not in err


def make_folder(root: Path, per_class: dict[str, int], corrupt: str | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, count in per_class.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)).save(root / split / name / f"{i}.png")
    if corrupt:
        (root / "train" / corrupt).write_bytes(b"not an image at all")
    return root


def imagefolder_recipe(tmp_path: Path, root: Path, workers: int = 0, batch: int = 4) -> Path:
    return write_recipe(tmp_path / "r.toml", tmp_path / "unused.npz",
                        data={"name": "imagefolder", "root": str(root), "path": "", "image_size": 8,
                              "num_workers": workers}, train={"epochs": 1, "batch_size": batch})


def test_imagefolder_without_images(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    fails_cleanly(capsys, "run", str(imagefolder_recipe(tmp_path, tmp_path / "data")),
                  expect="Couldn't find any class folder")


def test_imagefolder_with_fewer_images_than_a_batch(tmp_path, capsys):
    root = make_folder(tmp_path / "data", {"ant": 1, "bee": 1})
    fails_cleanly(capsys, "run", str(imagefolder_recipe(tmp_path, root, batch=8)),
                  expect="2 training image(s) make no batch on 1 process(es)")


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_names_a_corrupt_file(tmp_path, capsys, workers):
    root = make_folder(tmp_path / "data", {"ant": 3, "bee": 3}, corrupt="ant/broken.jpg")
    err = fails_cleanly(capsys, "run", str(imagefolder_recipe(tmp_path, root, workers=workers, batch=7)),
                        expect="ant/broken.jpg is not a readable image")
    assert "remove or replace it" in err


@pytest.mark.parametrize("change, listed", [
    ("model.hidden=[16]", "model.hidden: [32] → [16]"),
    ("rule.name=dfa", "rule.name: 'bp' → 'dfa'"),
    ("optim.lr=0.5", "optim.lr: 0.05 → 0.5"),
    ("data.split_seed=3", "data.split_seed: 0 → 3"),
])
def test_resume_refuses_a_changed_recipe(tmp_path, tiny_npz, capsys, change, listed):
    recipe, out = run_once(tmp_path, tiny_npz, capsys)
    before = snapshot(out)
    fails_cleanly(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3",
                  "--set", change, expect=listed)
    assert snapshot(out) == before  # recipe.toml still says what ran


def test_resume_with_more_epochs_re_stretches_the_schedule(tmp_path, tiny_npz, capsys):
    recipe, out = run_once(tmp_path, tiny_npz, capsys)
    code, stdout, err = cli(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3")
    assert code == 0, err
    assert "resumed from epoch 2, step 18" in stdout
    assert "train.epochs: 2 → 3" in stdout and "re-stretched over 3 epochs" in stdout
    assert "epochs = 3" in (out / "recipe.toml").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["state"] == "finished" and len(results["epoch_seconds"]) == 3
    assert results["train_seconds"] == pytest.approx(sum(results["epoch_seconds"]))
    table = stdout[stdout.index("training summary"):]
    assert all(f"│     {epoch} │" in table for epoch in (1, 2, 3)), "the summary covers the whole run"


def test_resume_drops_a_half_written_metrics_line(tmp_path, tiny_npz, capsys):
    recipe, out = run_once(tmp_path, tiny_npz, capsys)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "epoch": 3, "spl')
    code, stdout, err = cli(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3")
    assert code == 0, err
    assert "not a complete record" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("time" in r for r in records)


def test_out_that_is_a_file_or_cannot_be_created(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz)
    (tmp_path / "file").write_text("")
    fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "file"), expect="is a file, not a folder")
    fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "file" / "run"), expect="cannot write there")


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_npz, capsys, monkeypatch):
    recipe, out = run_once(tmp_path, tiny_npz, capsys)
    before = (out / "checkpoint.pt").read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos: No space left on device")

    monkeypatch.setattr(trainer.checkpoint.torch, "save", full_disk)
    err = fails_cleanly(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3",
                        expect="could not write the checkpoint")
    assert "No space left on device" in err and "the previous checkpoint" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not (out / "checkpoint.pt.tmp").exists() and not (out / LOCK_NAME).exists()


# --- wrong behaviour ---------------------------------------------------------------------------


def test_labels_beyond_the_data_sets_classes_are_refused(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = np.zeros((n, 28, 28), np.uint8)
        labels = np.arange(n) % 10
        labels[0] = 10 if prefix == "train" else 0
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    path = write_recipe(tmp_path / "r.toml", tmp_path / "x.npz", data={"name": "mnist", "root": str(tmp_path), "path": ""})
    fails_cleanly(capsys, "run", str(path), expect="label 10 is out of range for mnist's 10 classes")


def test_npz_classes_are_inferred_and_said_or_set(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1})
    code, stdout, _ = cli(capsys, "run", str(path), "--out", str(tmp_path / "a"))
    assert code == 0 and "4 classes, inferred from the labels" in stdout
    fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "b"), "--set", "data.num_classes=3",
                  expect="label 3 is out of range for [data] num_classes")


def test_sigint_before_the_first_checkpoint_says_nothing_is_kept(tmp_path, tiny_npz, capsys, monkeypatch):
    import trainer.rules.bp

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.rules.bp.Backprop, "train_step", interrupted)
    fails_cleanly(capsys, "run", str(write_recipe(tmp_path / "r.toml", tiny_npz)), "--out", str(tmp_path / "run"),
                  expect="stopped by SIGINT: no checkpoint was written yet", code=130)
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_sigterm_ends_a_run_keeping_its_checkpoint(tmp_path, tiny_npz):
    x, y = make_pattern_images(4000)
    np.savez(tmp_path / "big.npz", x=x, y=y)
    path = write_recipe(tmp_path / "r.toml", tmp_path / "big.npz", train={"epochs": 50, "batch_size": 8, "log_every": 1})
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(path), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM: the checkpoint of epoch" in err and "--resume" in err and "Traceback" not in err
    assert not (out / LOCK_NAME).exists()


def test_a_locked_run_folder_refuses_a_second_run(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1})
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "then"}))
        fails_cleanly(capsys, "run", str(path), "--out", str(out), expect=f"in use by process {sleeper.pid}")
        assert (out / LOCK_NAME).exists(), "the other run's lock stays"
    finally:
        sleeper.kill()
        sleeper.wait()
    code, stdout, err = cli(capsys, "run", str(path), "--out", str(out))  # its process is gone: a stale lock
    assert code == 0, err
    assert "removed a stale lock" in stdout


# --- unclear messages --------------------------------------------------------------------------


def test_set_errors_name_the_set_not_the_file(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz)
    err = fails_cleanly(capsys, "show", str(path), "--set", "train.epochs=abc",
                        expect="--set train.epochs=abc: [train] epochs: expected an integer, got 'abc'")
    assert str(path) not in err


@pytest.mark.parametrize("content, expect", [
    (b"", "the checkpoint is empty (0 bytes)"),
    (b"PK\x03\x04 not really a zip", "not a checkpoint of this trainer"),
])
def test_empty_and_foreign_checkpoints(tmp_path, capsys, content, expect):
    (tmp_path / "checkpoint.pt").write_bytes(content)
    err = fails_cleanly(capsys, "eval", str(tmp_path), expect=expect)
    assert "weights_only" not in err and "file an issue" not in err


def test_checkpoint_holding_objects_is_foreign(tmp_path, capsys):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "checkpoint.pt")
    err = fails_cleanly(capsys, "eval", str(tmp_path), expect="not a checkpoint of this trainer (it holds Python objects")
    assert "weights_only" not in err


def test_failed_download_says_so(tmp_path, tiny_npz, capsys, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, download=False, **kwargs):
        if download:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    path = write_recipe(tmp_path / "r.toml", tiny_npz, data={"name": "cifar10", "root": str(tmp_path), "download": True})
    err = fails_cleanly(capsys, "run", str(path), expect="[data] download: fetching cifar10")
    assert "set data.download=false" in err and "set data.download=true" not in err
    _, out = run_once(tmp_path, tiny_npz, capsys, train={"epochs": 1})
    err = fails_cleanly(capsys, "eval", str(out), "--data", f"cifar10:{tmp_path / 'empty'}", expect="cifar10 not found")
    assert "data.download" not in err  # eval cannot download


def test_nan_before_any_checkpoint_says_so(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, optim={"lr": 1e30, "schedule": "constant"})
    err = fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "run"), code=3,
                        expect="no checkpoint was written yet (it diverged in the first epoch)")
    assert "none (first epoch)" not in err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["state"] == "diverged"


# --- what a user reads -------------------------------------------------------------------------


def test_off_a_terminal_progress_is_plain_whole_lines(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 2, "log_every": 4})
    out = tmp_path / ("a-long-folder-name-" * 6)
    code, stdout, _ = cli(capsys, "run", str(path), "--out", str(out))
    assert code == 0
    lines = stdout.splitlines()
    assert str(out) in lines[0], "the header keeps the run folder whole"
    steps = [line for line in lines if line.startswith("epoch 1/2 · step")]
    assert [line.split(" · ")[1] for line in steps] == ["step 4/9", "step 8/9", "step 9/9"]
    assert any(line.startswith("epoch 2/2 done · ") and "held-out acc" in line for line in lines)
    assert "…" not in stdout


def test_show_prints_the_effective_values(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, data={"crop_padding": -1}, train={"compile": None})
    code, stdout, _ = cli(capsys, "show", str(path))
    assert code == 0
    for line in ("compile = false", "amp = false", "flip = false", "crop_padding = 2", "num_classes = 4",
                 'device = "cpu"'):
        assert line in stdout, line


def test_version_help_and_list_need_no_torch(tmp_path):
    check = ("import sys; from trainer.cli import main; code = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    for args in (["list"], ["--version"], ["--help"]):
        done = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    listed = subprocess.run([sys.executable, "-m", "trainer", "list"], capture_output=True, text=True, timeout=60)
    assert all(len(line.split()) >= 2 for line in listed.stdout.splitlines())
    assert any(line.startswith("quickstart ") for line in listed.stdout.splitlines())


def test_out_auto_makes_a_timestamped_folder(tmp_path, tiny_npz, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path / "tiny.toml", tiny_npz, train={"epochs": 1})
    assert main(["run", str(path), "--out", "auto"]) == 0
    assert main(["run", str(path), "--out", "auto"]) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(name.startswith("tiny-") for name in folders)


def test_runs_and_plot_on_two_tiny_runs(tmp_path, tiny_npz, capsys, monkeypatch):
    from PIL import Image

    pytest.importorskip("matplotlib")
    path = write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 2})
    assert main(["run", str(path), "--out", str(tmp_path / "runs" / "done")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "runs" / "cut"), "--set", "train.epochs=1"]) == 0
    os.remove(tmp_path / "runs" / "cut" / "results.json")  # as if it had been killed after its checkpoint
    capsys.readouterr()
    code, stdout, _ = cli(capsys, "runs", str(tmp_path / "runs"))
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if "runs/" in line}
    assert "finished" in rows[str(tmp_path / "runs" / "done")] and "2/2" in rows[str(tmp_path / "runs" / "done")]
    assert "interrupted" in rows[str(tmp_path / "runs" / "cut")]
    from trainer.runs import run_labels

    assert run_labels([tmp_path / "runs" / "done", tmp_path / "runs" / "cut"]) == ["done", "cut"]
    png = tmp_path / "curves.png"
    code, _, err = cli(capsys, "plot", str(tmp_path / "runs" / "done"), str(tmp_path / "runs" / "cut"),
                       "--metric", "loss", "--out", str(png))
    assert code == 0, err
    assert Image.open(png).size == (1000, 500)


# --- kernel ops: numbers and meta tensors --------------------------------------------------------


@pytest.mark.parametrize("bad, error", [(float("nan"), "must be finite"), (float("inf"), "must be finite"),
                                        ("0.1", "must be a Python number, got str"),
                                        (True, "must be a Python number, got bool")])
def test_kernel_ops_validate_their_numbers(bad, error):
    from kernels import SeededSigns, binary_feedback_project, local_signal, local_weight_update

    e, a, P = torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises((TypeError, ValueError), match=f"binary_feedback_project: scale {error}"):
        binary_feedback_project(e, SeededSigns(0, 4, 5), scale=bad)
    with pytest.raises((TypeError, ValueError), match=f"local_signal: beta {error}"):
        local_signal("lra", e, P, a, beta=bad)
    with pytest.raises((TypeError, ValueError), match=f"local_weight_update: max_norm {error}"):
        local_weight_update("lra", e, P, a, None, torch.randn(3, 2), max_norm=bad)


def test_pack_signs_on_meta_tensors_says_so():
    from kernels import pack_signs

    with pytest.raises(ValueError, match="pack_signs: signs is on the meta device"):
        pack_signs(torch.ones(3, 40, device="meta"))
