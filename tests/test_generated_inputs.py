"""Generated bad inputs (hypothesis): wrong types and values for every key of every section and
rule, malformed TOML, random bytes, bad overrides, truncated and mutated npz and checkpoint files,
labels out of range, odd shapes. Every one must end the CLI with exit code 2, no traceback, a
message that names the key or the file, and nothing changed in an existing run folder.

The examples are derandomized (the same ones every CI run): about 890 inputs, 1,040 CLI calls.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import shutil
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trainer.cli import main
from trainer.config import SECTIONS, dump_toml, tomllib
from trainer.rules import RULES

from conftest import make_pattern_images

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
_counter = itertools.count()


@dataclasses.dataclass
class World:
    """Files shared by the examples: a valid base recipe and a finished run to protect."""

    root: Path
    npz: Path
    recipe: dict[str, dict[str, Any]]
    run: Path
    checkpoint: bytes

    def fresh(self, name: str) -> Path:
        folder = self.root / f"{name}-{next(_counter)}"
        folder.mkdir()
        return folder


def make_world(root: Path) -> World:
    """A tiny npz, a valid recipe on it, and one finished run, under ``root``."""
    x, y = make_pattern_images(64, size=8)
    np.savez(root / "tiny.npz", x=x, y=y)
    recipe = {
        "data": {"name": "npz", "path": str(root / "tiny.npz"), "val_fraction": 0.25, "crop_padding": 0},
        "model": {"name": "mlp", "hidden": [8]},
        "rule": {"name": "bp"},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "compile": False},
    }
    (root / "base.toml").write_text(dump_toml(recipe))
    run = root / "run"
    with redirect_stdout(io.StringIO()):
        assert main(["run", str(root / "base.toml"), "--out", str(run)]) == 0
    return World(root, root / "tiny.npz", recipe, run, (run / "checkpoint.pt").read_bytes())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("generated"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(world: World, argv: list[str], names: list[str]) -> None:
    """Exit code 2, no traceback, one of ``names`` in the message, the protected run untouched."""
    before = snapshot(world.run)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
    message = err.getvalue()
    assert code == 2, f"exit {code} for {argv}: {message or out.getvalue()[-500:]}"
    assert "Traceback" not in message, message
    assert any(name in message for name in names), f"{message!r} names none of {names}"
    assert snapshot(world.run) == before, "an existing run folder changed"


# --- wrong types and values for every key ----------------------------------------------------


def wrong_type(annotation: Any) -> st.SearchStrategy:
    """TOML values that ``annotation`` never accepts."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        return st.one_of(TEXT.filter(lambda t: t not in allowed), st.integers(), st.booleans())
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return wrong_type(inner[0]) if inner[0] is not bool else st.one_of(TEXT, st.integers(), FLOATS)
    if origin is dict:
        return st.one_of(TEXT, st.integers(), st.lists(st.integers(), max_size=2))
    if origin is list:
        (item,) = typing.get_args(annotation)
        bad_item = TEXT if item in (int, float) else st.integers()
        return st.one_of(TEXT, st.integers(), st.lists(bad_item, min_size=1, max_size=3))
    return {
        bool: st.one_of(st.integers(), TEXT, FLOATS),
        int: st.one_of(TEXT, st.booleans(), FLOATS, st.lists(st.integers(), max_size=2)),
        float: st.one_of(TEXT, st.booleans(), st.lists(FLOATS, max_size=2), st.sampled_from([float("nan"), float("inf")])),
        str: st.one_of(st.integers(), st.booleans(), FLOATS, st.lists(st.integers(), max_size=2)),
    }[annotation]


def schema_keys() -> list[tuple[str, str, str | None, Any]]:
    """(section, key, rule name or None, annotation) for every key a recipe can hold."""
    keys = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        keys += [(section, f.name, None, hints[f.name]) for f in dataclasses.fields(cls)]
    for name, rule in RULES.items():
        hints = typing.get_type_hints(rule.Options)
        keys += [("rule", f.name, name, hints[f.name]) for f in dataclasses.fields(rule.Options)]
    return keys


OUT_OF_RANGE: list[tuple[str, str, str | None, st.SearchStrategy]] = [
    ("train", "epochs", None, st.integers(max_value=0)),
    ("train", "batch_size", None, st.integers(max_value=0)),
    ("train", "log_every", None, st.integers(max_value=0)),
    ("train", "label_smoothing", None, st.one_of(st.floats(min_value=1.0, max_value=1e9), st.floats(max_value=-1e-9, min_value=-1e9))),
    ("train", "device", None, st.sampled_from(["gpu", "cuda:", "cuda:-1", "CPU", "cuda:1x", "tpu"])),
    ("optim", "lr", None, st.floats(max_value=0.0, min_value=-1e9)),
    ("optim", "momentum", None, st.floats(min_value=1.0, max_value=1e9)),
    ("optim", "betas", None, st.lists(st.floats(min_value=1.0, max_value=10.0), min_size=1, max_size=3)),
    ("data", "val_fraction", None, st.one_of(st.floats(min_value=1.0, max_value=1e9), st.floats(max_value=0.0, min_value=-1e9))),
    ("data", "image_size", None, st.integers(max_value=7)),
    ("data", "num_classes", None, st.integers(max_value=-1)),
    ("model", "hidden", None, st.lists(st.integers(max_value=0), min_size=1, max_size=3)),
    ("rule", "feedback_scale", "dfa", st.floats(max_value=0.0, min_value=-1e9)),
    ("rule", "align_every", "dfa", st.integers(max_value=-1)),
    ("rule", "target_scale", "drtp", st.floats(max_value=0.0, min_value=-1e9)),
    ("rule", "beta", "lra", st.floats(max_value=0.0, min_value=-1e9)),
    ("rule", "alpha", "rec_lra", st.floats(min_value=1.0001, max_value=1e9)),
    ("rule", "error_skip_every", "rec_lra", st.integers(max_value=-1)),
    ("rule", "probes", "trace_bp", st.integers(max_value=0)),
]


@st.composite
def bad_recipe_values(draw) -> tuple[str, str, str | None, Any]:
    if draw(st.booleans()):
        section, key, rule, annotation = draw(st.sampled_from(schema_keys()))
        return section, key, rule, draw(wrong_type(annotation))
    section, key, rule, values = draw(st.sampled_from(OUT_OF_RANGE))
    return section, key, rule, draw(values)


@settings(max_examples=400, **SETTINGS)
@given(case=bad_recipe_values(), via_set=st.booleans())
def test_wrong_values_for_every_key(world, case, via_set):
    section, key, rule, value = case
    tree = {name: dict(values) for name, values in world.recipe.items()}
    if rule is not None:
        tree["rule"] = {"name": rule}
    folder = world.fresh("value")
    path = folder / "r.toml"
    argv = ["run", str(path), "--out", str(folder / "out")]
    if via_set:
        path.write_text(dump_toml(tree))
        argv += ["--set", f"{section}.{key}={dump_toml({'s': {'v': value}}).splitlines()[1][4:]}"]
    else:
        tree[section][key] = value
        path.write_text(dump_toml(tree))
    fails_cleanly(world, argv, [key, str(path)])


@settings(max_examples=60, **SETTINGS)
@given(key=st.from_regex(r"[a-z_]{1,12}", fullmatch=True), section=st.sampled_from([*SECTIONS, "rule"]))
def test_unknown_keys(world, key, section):
    allowed = {f.name for cls in (*SECTIONS.values(), *(r.Options for r in RULES.values()))
               for f in dataclasses.fields(cls)} | {"name"}
    assume(key not in allowed)
    folder = world.fresh("unknown")
    tree = {name: dict(values) for name, values in world.recipe.items()}
    tree[section][key] = 1
    (folder / "r.toml").write_text(dump_toml(tree))
    fails_cleanly(world, ["run", str(folder / "r.toml"), "--out", str(folder / "out")], [key])


# --- malformed files and overrides -----------------------------------------------------------


def not_a_recipe(content: bytes) -> bool:
    try:
        tree = tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True
    return bool(set(tree) - {*SECTIONS, "rule"}) or any(not isinstance(v, dict) for v in tree.values())


@settings(max_examples=100, **SETTINGS)
@given(content=st.one_of(st.binary(max_size=200), TEXT.map(str.encode),
                         st.sampled_from([b"[train\n", b"epochs = = 3", b"[data]\nname = npz\n", b"\xff\xfe[x]"])))
def test_malformed_toml_and_random_bytes(world, content):
    assume(not_a_recipe(content))
    folder = world.fresh("toml")
    (folder / "r.toml").write_bytes(content)
    fails_cleanly(world, ["run", str(folder / "r.toml"), "--out", str(folder / "out")], [str(folder / "r.toml")])


@settings(max_examples=80, **SETTINGS)
@given(text=st.one_of(TEXT.filter(lambda t: "=" not in t),
                      st.builds(lambda k, v: f"{k}={v}", st.from_regex(r"[a-z]{1,6}(\.[a-z]{1,6}){0,2}", fullmatch=True),
                                st.integers())))
def test_bad_override_strings(world, text):
    section, _, key = text.partition("=")[0].partition(".")
    assume("=" not in text or section not in (*SECTIONS, "rule") or "." in key or not key)
    folder = world.fresh("override")
    (folder / "r.toml").write_text(dump_toml(world.recipe))
    fails_cleanly(world, ["run", str(folder / "r.toml"), "--out", str(folder / "out"), "--set", text],
                  ["--set", text])


@settings(max_examples=40, **SETTINGS)
@given(change=st.sampled_from(["optim.lr=0.5", "train.seed=3", "train.batch_size=8", "model.hidden=[4]",
                               "rule.name=dfa", "data.val_fraction=0.5", "data.crop_padding=2", "optim.name=adamw"]),
       extra=st.sampled_from([[], ["--set", "train.epochs=3"]]))
def test_resume_with_changed_keys_leaves_the_run_alone(world, change, extra):
    argv = ["run", str(world.root / "base.toml"), "--out", str(world.run), "--resume", "--set", change, *extra]
    fails_cleanly(world, argv, [change.split("=")[0], str(world.run)])


# --- damaged data and checkpoint files --------------------------------------------------------


def still_loads(load, keys: tuple[str, ...]) -> bool:
    """Whether a damaged file still reads whole (the damage missed all that matters: not a bad file).
    Judged with numpy and torch themselves, not with the code under test."""
    try:
        loaded = load()
        return all(isinstance(loaded[key], (np.ndarray, torch.Tensor, dict)) for key in keys)
    except Exception:
        return False


def damaged(data: bytes, draw) -> bytes:
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


@st.composite
def bad_npz(draw) -> tuple[str, dict[str, Any] | bytes, dict[str, Any]]:
    """(what, arrays to savez or raw bytes, recipe data overrides)."""
    kind = draw(st.sampled_from(["damaged", "dtype", "ndim", "labels", "length", "range", "keys", "empty"]))
    n = draw(st.integers(3, 12))  # labels 0, 1, 2 all present
    x = np.zeros((n, 6, 6), np.uint8)
    y = np.arange(n) % 3
    if kind == "damaged":
        buffer = io.BytesIO()
        np.savez(buffer, x=x, y=y)
        return kind, damaged(buffer.getvalue(), draw), {}
    if kind == "dtype":
        return kind, {"x": x.astype(draw(st.sampled_from([np.float32, np.int64, np.bool_, np.uint16]))), "y": y}, {}
    if kind == "ndim":
        shape = draw(st.sampled_from([(n,), (n, 6), (n, 2, 6, 6, 1), (n, 0, 6), (n, 6, 0, 3)]))
        return kind, {"x": np.zeros(shape, np.uint8), "y": y}, {}
    if kind == "labels":
        labels = draw(st.sampled_from([y.astype(np.float32), y - 5, y.reshape(-1, 1), np.array(["a"] * n)]))
        return kind, {"x": x, "y": labels}, {}
    if kind == "length":
        return kind, {"x": x, "y": np.arange(n + draw(st.integers(1, 3))) % 3}, {}
    if kind == "range":
        return kind, {"x": x, "y": y}, {"num_classes": draw(st.integers(1, 2))}
    if kind == "keys":
        return kind, {draw(st.sampled_from(["images", "X", "data"])): x, "y": y}, {}
    return kind, {"x": x[:draw(st.integers(0, 1))], "y": y[:0]}, {}


@settings(max_examples=150, **SETTINGS)
@given(case=bad_npz())
def test_bad_npz_files(world, case):
    kind, content, data = case
    folder = world.fresh(f"npz-{kind}")
    path = folder / "d.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
        assume(not still_loads(lambda: np.load(path, allow_pickle=False), ("x", "y")))
    else:
        np.savez(path, **content)
    tree = {name: dict(values) for name, values in world.recipe.items()}
    tree["data"].update(path=str(path), **data)
    (folder / "r.toml").write_text(dump_toml(tree))
    fails_cleanly(world, ["run", str(folder / "r.toml"), "--out", str(folder / "out")], [str(path), "[data]"])
    fails_cleanly(world, ["eval", str(world.run), "--data", f"npz:{path}"], [str(path), "--data"])


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_damaged_checkpoints(world, data):
    folder = world.fresh("ckpt")
    shutil.copy(world.run / "recipe.toml", folder / "recipe.toml")
    (folder / "checkpoint.pt").write_bytes(damaged(world.checkpoint, data.draw))
    assume(not still_loads(lambda: torch.load(folder / "checkpoint.pt", weights_only=True), ("model", "recipe")))
    fails_cleanly(world, ["eval", str(folder)], [str(folder / "checkpoint.pt")])
