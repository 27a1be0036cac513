"""Checkpoints verify themselves (a sha256 digest written with them, checked on every load) and
``trainer export`` writes a run's model alone, which ``trainer eval`` reads as it reads the run."""

import io
import json
import shutil
import struct
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import FEEDBACK_STATE_KEYS
from trainer.checkpoint import DIGEST_KEY, load_checkpoint, payload_digest, save_checkpoint
from trainer.cli import main
from trainer.config import ConfigError

from conftest import make_pattern_images, write_recipe


def quietly(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def fails_cleanly(*args: str, expect: str, code: int = 2) -> str:
    """Run the CLI; assert the exit code and that stderr is one line naming ``expect``, no traceback."""
    got, _, err = quietly(*args)
    assert got == code, err
    assert expect in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def eval_json(*args: str) -> dict:
    code, out, err = quietly("eval", *args, "--json")
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor's data record, in place (torch's
    zip records are stored uncompressed, and torch.load checks no checksum of them)."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert record.compress_type == zipfile.ZIP_STORED and record.file_size > 2 * count
    with path.open("r+b") as f:
        f.seek(record.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
        start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def resave_without_digest(path: Path, change=None) -> None:
    """Re-save a checkpoint as one written before digests (optionally changed by ``change``)."""
    payload = torch.load(path, weights_only=True)
    del payload[DIGEST_KEY]
    if change is not None:
        change(payload)
    torch.save(payload, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The quickstart's model (a CNN of width 32, backprop) trained for one epoch on tiny data; each
    test copies the run folder (``copy_run``)."""
    root = tmp_path_factory.mktemp("trained")
    np.savez(root / "tiny.npz", **dict(zip("xy", make_pattern_images(400))))
    recipe = write_recipe(root / "r.toml", root / "tiny.npz", model={"name": "cnn", "width": 32}, train={"epochs": 1})
    code, _, err = quietly("run", str(recipe), "--out", str(root / "run"))
    assert code == 0, err
    return root


def copy_run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained / "run", tmp_path / "run"))


def resume(trained: Path, run: Path) -> tuple[int, str, str]:
    return quietly("run", str(trained / "r.toml"), "--out", str(run), "--resume", "--set", "train.epochs=2")


# --- the digest ------------------------------------------------------------------------------------


def test_the_digest_survives_a_round_trip_of_every_kind_of_value(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    payload = {"bf16": torch.randn(5, 3).to(torch.bfloat16), "half": torch.randn(2, dtype=torch.float16),
               "bool": torch.tensor([True, False]), "int": torch.tensor(7), "empty": torch.zeros(0, 3),
               "strided": base.t(), "nested": {"b": [1, 2.5, None, "x"], "a": (True, -0.0)}, "tags": {"x", "y", "z"}}
    save_checkpoint(tmp_path / "c.pt", payload)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    digest = saved.pop(DIGEST_KEY)
    assert payload_digest(saved) == digest == payload_digest({"format_version": 1, **payload})
    assert load_checkpoint(tmp_path / "c.pt", keys=("bf16",))["bf16"].dtype == torch.bfloat16


@pytest.mark.parametrize("change", [
    lambda p: p["nested"].update(a=(True, 0.0)),  # -0.0 → 0.0
    lambda p: p.update(bf16=p["bf16"].float()),  # the same values in another dtype
    lambda p: p.update(w=p["w"].reshape(2, 2)),  # the same bytes in another shape
    lambda p: p.update(nested={"a": p["nested"]["a"], "b": p["nested"]["b"]}),  # the same items in another order
])
def test_the_digest_sees_any_change(change):
    payload = {"w": torch.arange(4.0), "bf16": torch.ones(2, dtype=torch.bfloat16),
               "nested": {"b": [1], "a": (True, -0.0)}}
    before = payload_digest(payload)
    change(payload)
    assert payload_digest(payload) != before


# --- a damaged checkpoint ----------------------------------------------------------------------------


def test_a_damaged_checkpoint_is_refused_by_eval_resume_and_export(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoint.pt"
    intact = ckpt.read_bytes()
    flip_tensor_bytes(ckpt)
    damaged = f"{ckpt}: the checkpoint is damaged (its contents do not match the digest written with it"
    fails_cleanly("eval", str(run), expect=damaged)
    fails_cleanly("run", str(trained / "r.toml"), "--out", str(run), "--resume", "--set", "train.epochs=2",
                  expect=damaged)
    fails_cleanly("export", str(run), str(tmp_path / "model.pt"), expect=damaged)
    assert not (tmp_path / "model.pt").exists()
    assert ckpt.read_bytes() != intact and json.loads((run / "results.json").read_text())["state"] == "finished"
    ckpt.write_bytes(intact)  # the intact file loads and resumes
    assert eval_json(str(run))["accuracy"] > 0.5
    code, _, err = resume(trained, run)
    assert code == 0, err
    assert load_checkpoint(ckpt)["epoch"] == 2


def test_an_old_checkpoint_without_a_digest_loads_with_a_note(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    resave_without_digest(run / "checkpoint.pt")
    note = f"note: {run / 'checkpoint.pt'} has no digest (written before version"
    code, out, err = quietly("eval", str(run))
    assert code == 0, err
    assert out.count(note) == 1 and out.count("it cannot be verified") == 1, out
    code, out, err = resume(trained, run)
    assert code == 0, err
    assert out.count(note) == 1, out
    assert DIGEST_KEY in torch.load(run / "checkpoint.pt", weights_only=True), "the resumed run writes a digest"


def test_a_resumed_unverified_checkpoint_is_never_called_the_last_good_one(tmp_path, trained):
    run = copy_run(trained, tmp_path)

    def blow_up_the_classifier(payload):  # damage that an old checkpoint cannot reveal
        payload["model"]["1.1.0.weight"][0, 0] = float("nan")

    resave_without_digest(run / "checkpoint.pt", blow_up_the_classifier)
    code, _, err = resume(trained, run)
    assert code == 3, err
    assert "the checkpoint it resumed from (epoch 1, unverified: it has no digest) is kept in" in err
    assert "last good" not in err and "Traceback" not in err


# --- trainer export ------------------------------------------------------------------------------------


def test_an_exported_model_evaluates_exactly_as_its_run(tmp_path, trained):
    run, model = trained / "run", tmp_path / "model.pt"
    code, out, err = quietly("export", str(run), str(model))
    assert code == 0, err
    assert f"wrote {model} ({model.stat().st_size:,} bytes" in out
    assert eval_json(str(model)) == eval_json(str(run))
    other = f"npz:{trained / 'tiny.npz'}"
    assert eval_json(str(model), "--data", other) == eval_json(str(run), "--data", other)
    assert model.stat().st_size < 0.6 * (run / "checkpoint.pt").stat().st_size
    saved = torch.load(model, weights_only=True)
    assert saved["kind"] == "exported model" and DIGEST_KEY in saved
    assert not {"optimizer", "scheduler", "rng", "rule", "pipeline"} & set(saved), sorted(saved)
    assert "files" not in saved["data"] and {"mean", "std", "num_classes", "input_shape"} <= set(saved["data"])


def test_an_exported_feedback_alignment_model_leaves_its_feedback_behind(tmp_path, trained):
    recipe = write_recipe(tmp_path / "fa.toml", trained / "tiny.npz", rule={"name": "fa"}, train={"epochs": 1})
    run, model = tmp_path / "fa", tmp_path / "fa.pt"
    assert quietly("run", str(recipe), "--out", str(run))[0] == 0
    assert any(key.rsplit(".", 1)[-1] in FEEDBACK_STATE_KEYS for key in load_checkpoint(run)["model"])
    assert quietly("export", str(run), str(model))[0] == 0
    exported = torch.load(model, weights_only=True)["model"]
    assert not any(key.rsplit(".", 1)[-1] in FEEDBACK_STATE_KEYS for key in exported)
    assert eval_json(str(model)) == eval_json(str(run))


def test_resume_from_an_exported_model_says_what_it_needs(tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    assert quietly("export", str(trained / "run"), str(run / "checkpoint.pt"))[0] == 0
    fails_cleanly("run", str(trained / "r.toml"), "--out", str(run), "--resume", "--set", "train.epochs=2",
                  expect=f"{run / 'checkpoint.pt'} is an exported model (weights only); --resume needs the run "
                         "folder's checkpoint.pt")


@pytest.mark.parametrize("write, expect", [
    ("damaged", "the checkpoint is damaged (its contents do not match the digest"),
    ("plain dict", "not a checkpoint of this trainer (format None, expected 1)"),
    ("text", "not a checkpoint of this trainer (not a file written by torch.save)"),
])
def test_a_damaged_or_foreign_model_file_is_one_line(tmp_path, trained, write, expect):
    model = tmp_path / "model.pt"
    if write == "damaged":
        assert quietly("export", str(trained / "run"), str(model))[0] == 0
        flip_tensor_bytes(model)
    elif write == "plain dict":
        torch.save({"weight": torch.ones(3), "epoch": 1}, model)
    else:
        model.write_text("a model, honestly\n")
    fails_cleanly("eval", str(model), "--json", expect=f"{model}: {expect}")
    fails_cleanly("export", str(model), str(tmp_path / "again.pt"), expect=f"{model}: {expect}")


def test_export_refuses_an_out_it_cannot_write(tmp_path, trained):
    run = trained / "run"
    fails_cleanly("export", str(run), str(tmp_path), expect=f"{tmp_path}: is a folder; name the file to write")
    fails_cleanly("export", str(run), str(tmp_path / "missing" / "m.pt"),
                  expect=f"its folder {tmp_path / 'missing'} does not exist")
    fails_cleanly("export", str(run), str(run / "checkpoint.pt"), expect="is the checkpoint being exported")
    fails_cleanly("export", str(run), str(tmp_path / ("m" * 300 + ".pt")), expect="File name too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_digest_is_checked_on_stage_parts_too(tmp_path):
    from trainer.checkpoint import load_stage_part, save_stage_part, stage_part_path

    save_stage_part(tmp_path, 3, 0, {"state": {0: {"momentum_buffer": torch.ones(256)}}, "param_groups": []})
    flip_tensor_bytes(stage_part_path(tmp_path, 3, 0))
    with pytest.raises(ConfigError, match="the checkpoint is damaged"):
        load_stage_part(tmp_path, 3, 0)
