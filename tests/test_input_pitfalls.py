"""Inputs that once trained silently wrong, or ended in a traceback or the OOM killer (issue 24):
each now stops the CLI with one line naming the key or file, the value and the fix (exit code 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trainer.cli import main
from trainer.config import MAX_CLASSES, ConfigError
from trainer.data import load_npz

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


# --- 4. models whose outputs are not (N, num_classes) logits -------------------------------------

HEADS = '''
import torch
from torch import nn


class Head(nn.Module):
    def __init__(self, features, outputs, shape=None, train_tuple=False):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(features, outputs))
        self.shape, self.train_tuple = shape, train_tuple

    def forward(self, x):
        out = self.fc(x)
        if self.shape == "tuple" or (self.train_tuple and self.training):
            return out, out.detach()
        return out.unsqueeze(1) if self.shape == "n1c" else out


def wide(num_classes, input_shape):
    return Head(input_shape[0] * input_shape[1] * input_shape[2], 1000)


def narrow(num_classes, input_shape):
    return Head(input_shape[0] * input_shape[1] * input_shape[2], num_classes - 1)


def pair(num_classes, input_shape):
    return Head(input_shape[0] * input_shape[1] * input_shape[2], num_classes, shape="tuple")


def n1c(num_classes, input_shape):
    return Head(input_shape[0] * input_shape[1] * input_shape[2], num_classes, shape="n1c")


def pair_in_training(num_classes, input_shape):
    return Head(input_shape[0] * input_shape[1] * input_shape[2], num_classes, train_tuple=True)


def pooled(num_classes, input_shape):
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.MaxPool2d(8), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))
'''


@pytest.fixture
def heads(tmp_path, monkeypatch):
    """``python:pitfall_heads:FACTORY`` importable from the working directory."""
    (tmp_path / "pitfall_heads.py").write_text(HEADS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "pitfall_heads", raising=False)


@pytest.mark.parametrize("factory, expect", [
    ("wide", "returns a (2, 1000) tensor in eval mode for 2 images; expected (N, C) = (2, 4) logits, C = num_classes "
             "= 4 (the data's classes): its output width 1000 must be num_classes = 4: pass num_classes to the final "
             "layer"),
    ("narrow", "returns a (2, 3) tensor in eval mode for 2 images; expected (N, C) = (2, 4) logits"),
    ("pair", "returns a tuple of 2 items in eval mode for 2 images; expected (N, C) = (2, 4) logits, C = num_classes "
             "= 4 (the data's classes): return the logits alone from forward, flattened to (N, C)"),
    ("n1c", "returns a (2, 1, 4) tensor in eval mode for 2 images; expected (N, C) = (2, 4) logits"),
    ("pair_in_training", "returns a tuple of 2 items in train mode for 2 images"),
])
def test_a_factory_must_return_n_by_num_classes_logits(tmp_path, tiny_npz, capsys, heads, factory, expect):
    fails_cleanly(capsys, *run(tmp_path, tiny_npz, model={"name": f"python:pitfall_heads:{factory}"}),
                  expect=f"[model] name: python:pitfall_heads:{factory} {expect}")


# --- 1. a device index this machine does not have ----------------------------------------------


@pytest.mark.parametrize("device", ["cuda:99999999999999999999", "cuda:128"])
def test_a_gpu_index_beyond_the_machines_names_its_devices(tmp_path, tiny_npz, capsys, device):
    count = torch.cuda.device_count()
    there = f"its GPUs are {', '.join(f'cuda:{i}' for i in range(count))}; use one of those, " if count else \
        "it has no CUDA device; use "
    fails_cleanly(capsys, *run(tmp_path, tiny_npz, f"train.device={device}"),
                  expect=f"[train] device = {device!r}: this machine has no such device ({there}'cpu' or 'auto')")


# --- 6. images smaller than a model can take ------------------------------------------------------


def test_the_cnn_on_1x1_images_names_the_size_it_needs(tmp_path, capsys):
    npz = save(tmp_path / "dots.npz", np.full((16, 1, 1), 200, np.uint8), np.arange(16) % 2)
    fails_cleanly(capsys, *run(tmp_path, npz, model={"name": "cnn"}),
                  expect="[model] name: cnn cannot take 1x1 images: its two 2x2 max-pools need at least 4x4; use "
                         "larger images or another [model] name (mlp, rnn and the resnets take any size)")


def test_a_model_that_pools_too_small_images_away_names_the_smallest_size(heads):
    from trainer.config import ModelConfig
    from trainer.models import build_model

    cfg = ModelConfig(name="python:pitfall_heads:pooled")
    with pytest.raises(ConfigError, match=r"python:pitfall_heads:pooled cannot take 1x4x4 inputs: 1 fails "
                                          r"\(RuntimeError: .*\); it needs images of at least 8x8: use larger images"):
        build_model(cfg, (1, 4, 4), 3)
    assert build_model(cfg, (1, 8, 8), 3)(torch.zeros(1, 1, 8, 8)).shape == (1, 3)


# --- 7. trace_bp probes that cannot fit in memory ------------------------------------------------


def test_probe_bytes_on_made_up_convs():
    from trainer.rules.trace_bp import ConvShape, probe_bytes

    convs = [ConvShape(c_in=3, c_out=8, taps=9, positions_in=16, positions_out=16),
             ConvShape(c_in=8, c_out=16, taps=9, positions_in=16, positions_out=4)]
    kept = (3 + 8) * 2 * 5  # X·Z of both convs, batch 2, r = 5
    largest_backward = max(8 * 9 * 2 + 16 + 9 * 16, 16 * 9 * 2 + 16 + 9 * 4) * 5  # A, Z and S_k Z of one conv
    assert probe_bytes(convs, batch=2, probes=5) == 4 * (kept + largest_backward) == 7240
    assert probe_bytes(convs, batch=4, probes=10) > 2 * probe_bytes(convs, batch=2, probes=5)


def test_conv_shapes_are_those_the_probes_see():
    from trainer.config import ModelConfig
    from trainer.models import build_model
    from trainer.rules import RuleContext, build_rule, rule_options_class
    from trainer.rules.trace_bp import ConvShape

    model = build_model(ModelConfig(name="cnn", width=4), (1, 12, 12), 3)
    rule = build_rule("trace_bp", rule_options_class("trace_bp")(probes=3), model,
                      RuleContext(num_classes=3, input_shape=(1, 12, 12)))
    rule.train_step(torch.randn(5, 1, 12, 12), torch.arange(5) % 3, torch.optim.SGD(model.parameters(), lr=0.1))
    assert rule.convs == [ConvShape(c_in=4, c_out=8, taps=9, positions_in=36, positions_out=36)]  # the first is exact


def test_probes_beyond_the_memory_are_refused_before_the_first_step(tmp_path, tiny_npz, capsys, monkeypatch):
    import trainer.rules.trace_bp as trace_bp

    monkeypatch.setattr(trace_bp.Backprop, "train_step", lambda *args: pytest.fail("the step ran"))
    err = fails_cleanly(capsys, *run(tmp_path, tiny_npz, "rule.probes=1000000000", model={"name": "cnn", "width": 8},
                                     rule={"name": "trace_bp"}),
                        expect="[rule] probes = 1000000000: trace_bp's probes need about ")
    assert "GiB at batch 32 (1 converted conv(s); it grows with probes x batch), but cpu has " in err
    assert "GiB free; lower rule.probes (16 to 64 are usual) or train.batch_size" in err


# --- 5. torchvision models with auxiliary heads -----------------------------------------------------


def test_googlenet_trains_on_its_main_logits(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = save(tmp_path / "rgb.npz", rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8), np.arange(4) % 2)
    argv = run(tmp_path, npz, model={"name": "torchvision:googlenet"},
               data={"val_fraction": 0.5}, train={"epochs": 1, "batch_size": 2})
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").is_file()


@pytest.mark.parametrize("builder, side", [("googlenet", 16), ("inception_v3", 75)])
def test_aux_heads_are_left_out_and_asking_for_them_says_why(builder, side):
    from trainer.config import ModelConfig
    from trainer.models import build_model

    model = build_model(ModelConfig(name=f"torchvision:{builder}"), (3, side, side), 3).train()
    assert model(torch.zeros(2, 3, side, side)).shape == (2, 3)
    if builder == "googlenet":
        with pytest.raises(ConfigError, match=r"torchvision:googlenet returns a GoogLeNetOutputs of 3 items in train "
                                              r"mode .*: the trainer trains the main logits alone: leave \[model\] "
                                              r"kwargs aux_logits unset"):
            build_model(ModelConfig(name="torchvision:googlenet", kwargs={"aux_logits": True}), (3, 16, 16), 3)


# --- 8. more of the same families: pixels, shapes, seeds, sizes ---------------------------------


def pixels(shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape).astype(dtype)


@pytest.mark.parametrize("x, y, expect", [
    (pixels((8, 12, 12)) / 255, np.arange(8) % 2,
     "x must be uint8 pixels 0 to 255, got float64 (8, 12, 12); save e.g. numpy.clip(x * 255, 0, 255).round()"),
    (np.full((8, 12, 12), np.nan, np.float32), np.arange(8) % 2,
     "x must be uint8 pixels 0 to 255, got float32 (8, 12, 12) (it holds NaN or infinite values: replace them first)"),
    (pixels((8, 12, 12), np.int64), np.arange(8) % 2,
     "x must be uint8 pixels 0 to 255, got int64 (8, 12, 12); save e.g. numpy.clip(x, 0, 255)"),
    (pixels((8, 3, 12, 12)), np.arange(8) % 2,
     "x is (N, H, W, C) = (8, 3, 12, 12), C = 12 channels: images are grey (C = 1) or RGB (C = 3), channels last; it "
     "looks channels-first: save x.transpose(0, 2, 3, 1)"),
    (pixels((8, 12, 12, 4)), np.arange(8) % 2,
     "x is (N, H, W, C) = (8, 12, 12, 4), C = 4 channels: images are grey (C = 1) or RGB (C = 3), channels last; "
     "drop other channels, e.g. RGBA's alpha: x[..., :3]"),
    (pixels((8, 12, 12)), np.arange(9) % 2, "x holds 8 images but y 9 labels; save one label per image"),
    (pixels((8, 12, 12)), (np.arange(8) % 2).reshape(8, 1), "y must be integer labels of shape (8,), got int64 (8, 1)"),
])
def test_npz_arrays_of_the_wrong_kind_name_the_fix(tmp_path, capsys, x, y, expect):
    npz = save(tmp_path / "bad.npz", x, y)
    fails_cleanly(capsys, *run(tmp_path, npz), expect=f"[data] path: {npz}: {expect}")


@pytest.mark.parametrize("override, expect", [
    ("train.seed=100000000000000000", "[train] seed: must be below 2**32 = 4294967296 in magnitude"),
    ("data.split_seed=-100000000000000000000", "[data] split_seed: must be below 2**32 = 4294967296 in magnitude"),
    ("data.crop_padding=100000",
     "[data] crop_padding = 100000 is more than the images' side (12 px): set it to at most 12"),
    ("model.hidden=[1000000000000]", "[model] name: mlp's parameters do not fit in memory (RuntimeError: "),
])
def test_values_that_type_check_but_cannot_reach_torch(tmp_path, tiny_npz, capsys, override, expect):
    fails_cleanly(capsys, *run(tmp_path, tiny_npz, override), expect=expect)


def test_a_builder_that_fails_on_a_kwarg_names_it(tmp_path, tiny_npz, capsys):
    fails_cleanly(capsys, *run(tmp_path, tiny_npz, model={"name": "torchvision:mobilenet_v2",
                                                          "kwargs": {"round_nearest": 0}}),
                  expect="[model] kwargs: torchvision:mobilenet_v2 refused {'round_nearest': 0} (ZeroDivisionError: ")


@st.composite
def bad_npz_arrays(draw) -> tuple[str, np.ndarray, np.ndarray]:
    """(family, x, y) of an npz that load_npz must refuse."""
    n, h, w = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    x, y = np.zeros((n, h, w), np.uint8), np.zeros(n, np.int64)
    kind = draw(st.sampled_from(["pixels", "channels", "length", "label", "empty"]))
    if kind == "pixels":  # floats include NaN and infinities
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_]))
        x = draw(hnp.arrays(dtype, (n, h, w)))
    elif kind == "channels":
        x = np.zeros((n, h, w, draw(st.sampled_from([2, 4, 5, 12]))), np.uint8)
    elif kind == "length":
        y = np.zeros(n + draw(st.sampled_from([-1, 1, 5])), np.int64)
    elif kind == "label":
        dtype = np.dtype(draw(st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64])))
        info = np.iinfo(dtype)
        wrong = [st.integers(int(info.min), -1)] if info.min < 0 else []
        wrong += [st.integers(MAX_CLASSES, int(info.max))] if info.max >= MAX_CLASSES else []
        y = y.astype(dtype)
        y[draw(st.integers(0, n - 1))] = draw(st.one_of(*wrong))
    else:
        x, y = x[:0], y[:0]
    return kind, x, y


@settings(max_examples=120, deadline=None, derandomize=True)
@given(case=bad_npz_arrays())
def test_generated_bad_npz_files_are_refused_naming_the_file(tmp_path_factory, case):
    kind, x, y = case
    path = tmp_path_factory.mktemp(kind) / "d.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(ConfigError) as refused:
        load_npz(path, key="[data] test_path")
    message = str(refused.value)
    assert message.startswith(f"[data] test_path: {path}") and "\n" not in message, message
