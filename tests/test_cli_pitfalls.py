"""Pitfalls a user met on the command line (issue 24): runs that went on silently although they
were wrong, and tracebacks where one clear line belongs. Each test failed before its fix."""

import io
import itertools
import json
import os
import shutil
import socket
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import trainer.run_folder
from trainer.checkpoint import DIGEST_KEY, save_checkpoint
from trainer.cli import main
from trainer.config import ConfigError, dump_toml, tomllib
from trainer.run_folder import LOCK_NAME, RunFolder, lock_owner
from trainer.runs import summarize

from conftest import make_pattern_images, write_recipe
from test_reliability import cli, fails_cleanly, run_once, snapshot

# On tiny.npz, DFA at lr 5 (constant) blows the loss up to ~2e4 at step 3 and back to 0 by step 4:
# the logged steps of log_every = 5 never see it, the epoch's mean loss (2647) does.
COUNTER = itertools.count()
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
                  "--set", "rule.name=dfa", "--set", "rule.feedback_scale=1.0",  # the scale before 'auto'
                  code=3, expect="the mean training loss exploded to 2647")
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
    del payload["data"]["files"], payload[DIGEST_KEY]  # as written before checkpoints held them (or a digest)
    torch.save(payload, out / "checkpoint.pt")
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=3")
    assert code == 0, err
    assert "files" in torch.load(out / "checkpoint.pt", weights_only=True)["data"]


# --- 5. trainer runs and trainer plot on damaged files -------------------------------------------


def damage(folder: Path, file: str, key: str, value: Any, line: int = -1) -> None:
    """Set ``key`` of results.json or of line ``line`` of metrics.jsonl ("": the whole), or ``section.key``
    of recipe.toml."""
    path = folder / file
    if file == "results.json":
        path.write_text(json.dumps(value if key == "" else {**json.loads(path.read_text()), key: value}))
    elif file == "metrics.jsonl":
        lines = path.read_text().splitlines()
        lines[line] = json.dumps(value if key == "" else {**json.loads(lines[line]), key: value})
        path.write_text("\n".join(lines) + "\n")
    else:
        tree = tomllib.loads(path.read_text())
        section, name = key.split(".")
        tree[section][name] = value
        path.write_text(dump_toml(tree))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch run, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("finished")
    x, y = make_pattern_images(64, size=8)
    np.savez(root / "tiny.npz", x=x, y=y)
    recipe = write_recipe(root / "tiny.toml", root / "tiny.npz", model={"name": "mlp", "hidden": [8]},
                          train={"batch_size": 16, "log_every": 1})
    with redirect_stdout(io.StringIO()):
        assert main(["run", str(recipe), "--out", str(root / "run")]) == 0
    return root / "run"


def quietly(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("file, key, value, shown", [
    ("results.json", "accuracy", "x", 'damaged (results.json: accuracy is "x", not a number)'),
    ("results.json", "", [], "damaged (results.json: not a JSON object)"),
    ("metrics.jsonl", "epoch", [1], "damaged (metrics.jsonl line 8: epoch is [1], not an integer)"),
    ("metrics.jsonl", "", [1, 2], "damaged (metrics.jsonl line 8: not a JSON object but list)"),
    ("recipe.toml", "rule.name", 3, "damaged (recipe.toml: [rule] name is not a string)"),
    ("recipe.toml", "train.epochs", "two", "damaged (recipe.toml: [train] epochs is not an integer)"),
])
def test_runs_shows_a_damaged_run_as_damaged(tmp_path, finished, file, key, value, shown):
    run = shutil.copytree(finished, tmp_path / "runs" / "run")
    damage(run, file, key, value)
    code, stdout, err = quietly("runs", str(tmp_path / "runs"))
    assert code == 0 and "Traceback" not in err, err
    assert "damaged" in stdout and summarize(run).state == shown  # the table may wrap the state


def test_plot_skips_damaged_lines_with_one_warning(tmp_path, finished):
    pytest.importorskip("matplotlib")
    run = shutil.copytree(finished, tmp_path / "run")
    damage(run, "metrics.jsonl", "accuracy", "x", line=-1)
    damage(run, "metrics.jsonl", "", "not an object", line=2)
    code, stdout, err = quietly("plot", str(run), "--out", str(tmp_path / "p.png"))
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {run / 'metrics.jsonl'}: skipped 2 damaged line(s) (line 3: not a JSON object "
                        "but str)"]


def kind(value: Any) -> str:
    """A value's JSON type, numbers as one."""
    return "number" if type(value) in (int, float) else type(value).__name__


def toml_can_hold(value: Any) -> bool:
    """TOML has no null."""
    inner = value if isinstance(value, list) else value.values() if isinstance(value, dict) else []
    return value is not None and all(map(toml_can_hold, inner))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
                    max_leaves=4)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(["results.json", "metrics.jsonl", "recipe.toml"]), pick=st.integers(0, 99),
       line=st.integers(0, 99), value=JSON)
def test_runs_and_plot_survive_any_field_of_any_type(tmp_path, finished, file, pick, line, value):
    """Any key of results.json, of any metrics line (or the line itself), or rule.name / train.epochs
    of recipe.toml set to any JSON value: no traceback, and a value of another type is damage."""
    pytest.importorskip("matplotlib")
    run = shutil.copytree(finished, tmp_path / f"runs-{next(COUNTER)}" / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    line %= len(lines)
    if file == "results.json":
        fields = json.loads((run / file).read_text())
    elif file == "metrics.jsonl":
        fields = {"": json.loads(lines[line]), **json.loads(lines[line])}  # "": the whole line
    else:
        assume(toml_can_hold(value))
        tree = tomllib.loads((run / file).read_text())
        fields = {"rule.name": tree["rule"]["name"], "train.epochs": tree["train"]["epochs"]}
    key = sorted(fields)[pick % len(fields)]
    original = fields[key]
    damage(run, file, key, value, line)
    code, stdout, err = quietly("runs", str(run.parent))
    assert code == 0 and "Traceback" not in err, err
    if kind(value) != kind(original):
        assert summarize(run).state.startswith("damaged (")
    code, stdout, err = quietly("plot", str(run), "--out", str(run / "p.png"))
    assert code == 0 and "Traceback" not in err, err
    assert len([line for line in stdout.splitlines() if line.startswith("warning:")]) <= 1


# --- 4. trainer eval of a run folder whose recipe.toml or checkpoint recipe is another model -------


def two_models(tmp_path: Path, npz: Path, capsys) -> tuple[Path, Path]:
    """Finished one-epoch runs of an MLP and of a CNN on the same data."""
    recipe = write_recipe(tmp_path / "r.toml", npz, train={"epochs": 1})
    mlp, cnn = tmp_path / "mlp", tmp_path / "cnn"
    assert main(["run", str(recipe), "--out", str(mlp)]) == 0
    assert main(["run", str(recipe), "--out", str(cnn), "--set", "model.name=cnn", "--set", "model.width=4"]) == 0
    capsys.readouterr()
    return mlp, cnn


def test_eval_says_that_a_swapped_recipe_toml_is_not_what_it_evaluates(tmp_path, tiny_npz, capsys):
    mlp, cnn = two_models(tmp_path, tiny_npz, capsys)
    shutil.copy(cnn / "recipe.toml", mlp / "recipe.toml")
    code, stdout, err = cli(capsys, "eval", str(mlp), "--json")
    assert code == 0, err
    assert (f"note: {mlp / 'recipe.toml'} differs from the recipe saved in the checkpoint (model.name, model.width); "
            "eval uses the checkpoint's own: model mlp, rule bp") in err
    assert json.loads(stdout.splitlines()[-1])["accuracy"] > 0.5


def test_eval_refuses_a_checkpoint_whose_saved_recipe_is_another_model(tmp_path, tiny_npz, capsys):
    mlp, cnn = two_models(tmp_path, tiny_npz, capsys)
    payload = torch.load(mlp / "checkpoint.pt", weights_only=True)
    payload["recipe"] = torch.load(cnn / "checkpoint.pt", weights_only=True)["recipe"]
    del payload[DIGEST_KEY]
    save_checkpoint(mlp / "checkpoint.pt", payload)  # mixed by a program, with a digest of what it wrote
    fails_cleanly(capsys, "eval", str(mlp), expect=f"{mlp}: the checkpoint's model does not fit 'cnn' built from the "
                                                   "recipe saved in it (Error(s) in loading state_dict")


# --- 8. run.lock is never empty, and an empty one is not stale while it may be being written ----


def test_an_empty_lock_being_written_is_waited_for(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("")  # another trainer has created its lock and is about to write it
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": "just now"}
    writer = threading.Timer(0.3, lambda: lock.write_text(json.dumps(owner)))
    writer.start()
    try:
        assert lock_owner(tmp_path) == owner
    finally:
        writer.join()
    with pytest.raises(ConfigError, match=f"in use by process {os.getpid()} on .* since just now"):
        RunFolder(tmp_path).claim(resume=False)


def test_an_empty_lock_left_long_ago_is_stale(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("")
    os.utime(out / LOCK_NAME, (time.time() - 60, time.time() - 60))
    code, stdout, err = cli(capsys, "run", str(write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 1})),
                            "--out", str(out))
    assert code == 0, err
    assert "removed a stale lock" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "recipe.toml", "results.json"]


def test_the_lock_is_in_place_only_once_written(tmp_path, monkeypatch):
    seen = []

    def link(source, target):
        seen.append(json.loads(Path(source).read_text()))
        real_link(source, target)

    real_link = os.link
    monkeypatch.setattr(trainer.run_folder.os, "link", link)
    with RunFolder(tmp_path / "run").claim(resume=False):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text()) == seen[0]
        assert seen[0]["pid"] == os.getpid()
        assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME], "no temporary file is left"
    assert not (tmp_path / "run").exists()


# --- 6. trainer eval --device: a GPU-trained checkpoint on a machine without one ------------------


def test_eval_of_a_cuda_checkpoint_here_takes_device_cpu(tmp_path, tiny_npz, capsys, monkeypatch):
    _, out = run_once(tmp_path, tiny_npz, capsys, train={"epochs": 1})
    payload = torch.load(out / "checkpoint.pt", weights_only=True, map_location="cpu")
    payload["recipe"]["train"]["device"] = "cuda"  # as if trained on a GPU
    del payload[DIGEST_KEY]
    save_checkpoint(out / "checkpoint.pt", payload)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails_cleanly(capsys, "eval", str(out),
                  expect=f"{out}: it trained with [train] device = 'cuda' but CUDA is not available here; use 'cpu' or "
                         f"'auto' (trainer eval {out} --device cpu)")
    err = fails_cleanly(capsys, "eval", str(out), "--device", "cuda:0", expect="--device cuda:0: [train] device = ")
    assert err.rstrip().endswith(f"(trainer eval {out} --device cpu)")
    code, stdout, err = cli(capsys, "eval", str(out), "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(stdout.splitlines()[-1])["samples"] == 100


# --- 10. a terminal keeps a line per epoch; Ctrl-C shows the epochs done -------------------------


def test_a_terminal_keeps_a_line_per_finished_epoch(tmp_path, tiny_npz):
    from rich.console import Console

    from trainer.loop import train
    from trainer.recipes import load_recipe

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200, emoji=False)
    train(load_recipe(write_recipe(tmp_path / "r.toml", tiny_npz, train={"epochs": 3})), tmp_path / "run",
          console=console)
    text = screen.getvalue()
    assert all(f"epoch {epoch}/3 done · " in text for epoch in (1, 2, 3)), text
    assert "held-out acc" in text.split("epoch 1/3 done")[1].splitlines()[0]


def test_ctrl_c_prints_the_summary_of_the_epochs_done(tmp_path, tiny_npz, capsys, monkeypatch):
    import trainer.rules.bp

    steps = itertools.count(1)
    real_step = trainer.rules.bp.Backprop.train_step

    def interrupted_in_epoch_2(self, *args):
        if next(steps) == 12:  # 9 steps an epoch
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(trainer.rules.bp.Backprop, "train_step", interrupted_in_epoch_2)
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "run", str(write_recipe(tmp_path / "r.toml", tiny_npz)), "--out", str(out))
    assert code == 130
    assert f"interrupted: stopped by SIGINT: the checkpoint of epoch 1 is kept in {out / 'checkpoint.pt'}" in err
    table = stdout[stdout.index("training summary"):]
    assert "│     1 │" in table and "│     2 │" not in table


# --- 12. the pipeline's first line names its stages readably ---------------------------------------


@pytest.mark.parametrize("model, boundaries, listed", [
    ({"name": "cnn", "width": 4}, ["1.0"], "stage 0 (2 units): 0.0 Conv2d … 0.1 Conv2d; stage 1 (2 units): "
                                           "1.0 Linear … 1.1 Linear"),
    ({"name": "resnet20"}, ["layer3.0"], "stage 0 (7 units): stem … layer2.2; stage 1 (4 units): layer3.0 … head"),
    ({"name": "mlp", "hidden": [8]}, ["1.0"], "stage 0 (1 unit): 0.0 Linear; stage 1 (1 unit): 1.0 Linear"),
])
def test_the_pipeline_names_its_stages_readably(model, boundaries, listed):
    from trainer.config import ModelConfig
    from trainer.distributed import DistEnv
    from trainer.models import build_model
    from trainer.pipeline import split_stages
    from trainer.units import model_units

    shape = (3, 32, 32) if model["name"] == "resnet20" else (1, 12, 12)
    net = build_model(ModelConfig(**model), shape, 4)
    names, units = zip(*model_units(net, "block")[0])
    _, note = split_stages(names, units, net, DistEnv(rank=0, world_size=2, stages=2), boundaries, probe=None,
                           autocast=None, owned=[], optimizer=None, steps_per_micro_batch=1)
    assert note == f"pipeline of 2 stages × 1 replica(s), at train.stage_boundaries: {listed}"


# --- 9. errors found while building name the --set that set their key ----------------------------


@pytest.mark.parametrize("override, expect", [
    ("model.name=torchvision:nosuch", "--set model.name=torchvision:nosuch: [model] name: torchvision has no "
                                      "classification model 'nosuch'"),
    ("data.path=missing.npz", "--set data.path=missing.npz: [data] path: missing.npz does not exist"),
    ("model.name=foo", "--set model.name=foo: [model]: name: expected one of"),  # a validate() error
])
def test_build_errors_name_the_set_not_the_file(tmp_path, tiny_npz, capsys, override, expect):
    path = write_recipe(tmp_path / "r.toml", tiny_npz)
    err = fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "run"), "--set", override, expect=expect)
    assert str(path) not in err


def test_a_build_error_of_a_key_from_the_file_names_the_file(tmp_path, tiny_npz, capsys):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, model={"name": "torchvision:nosuch"})
    fails_cleanly(capsys, "run", str(path), "--out", str(tmp_path / "run"), "--set", "train.epochs=1",
                  expect=f"{path}: [model] name: torchvision has no classification model 'nosuch'")


# --- 7. under torchrun, the launcher's failure report names the error line ---------------------


def test_torchrun_reports_a_bad_recipe_by_its_line(tmp_path, tiny_npz):
    from test_distributed import torchrun

    recipe = write_recipe(tmp_path / "r.toml", tiny_npz)
    result = torchrun("run", str(recipe), "--out", str(tmp_path / "run"), "--set", "data.path=missing.npz")
    line = "error: --set data.path=missing.npz: [data] path: missing.npz does not exist"
    assert result.returncode != 0
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert "exitcode  : 2" in root_cause and f"traceback : {line}" in root_cause, root_cause
    assert result.stderr.count("Traceback (most recent call last)") <= 1, "only torchrun's own, none of a worker"
    assert not (tmp_path / "run").exists()
