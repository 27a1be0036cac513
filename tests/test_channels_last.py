"""``train.channels_last``: NHWC weights and activations give the default layout's update (up to the
convolution algorithms' rounding), for backprop and every rule that trains a ResNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_rel_close, make_pattern_images, write_recipe
from trainer.config import ConfigError
from trainer.recipes import load_recipe
from trainer.session import build_session

RULES = {  # rule -> its [rule] options on a CIFAR ResNet-20
    "bp": {}, "dfa": {"granularity": "layer"}, "bdfa": {"granularity": "layer"},
    "dfa+bp": {"name": "dfa", "granularity": "block", "bp_units": ["stem", "layer1"]},
    "drtp": {"granularity": "block"}, "tpsgd": {"granularity": "block"},
    "rec_lra": {"granularity": "block"}, "trace_bp": {"probes": 4}, "fa": {}, "usf": {}, "kp": {},
}


@pytest.fixture(scope="module")
def rgb_npz(tmp_path_factory) -> str:
    x, y = make_pattern_images(96, size=12, classes=4)
    path = tmp_path_factory.mktemp("cl") / "rgb.npz"
    np.savez(path, x=np.repeat(x[..., None], 3, axis=3), y=y)
    return str(path)


def one_update(tmp_path, npz: str, rule: str, channels_last: bool) -> dict[str, torch.Tensor]:
    """Each floating-point parameter's change in one step of plain SGD (lr 1: minus the update),
    from the same weights and batch whatever the layout."""
    path = write_recipe(tmp_path / f"{rule.replace('+', '_')}-{channels_last}.toml", npz, model={"name": "resnet20"},
                        rule={"name": rule, **RULES[rule]}, optim={"name": "sgd", "lr": 1.0, "momentum": 0.0},
                        train={"batch_size": 16, "channels_last": channels_last})
    torch.manual_seed(0)
    session = build_session(load_recipe(path))
    assert session.model.conv1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    session.rule.train()
    before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
    torch.manual_seed(1)  # the step's own randomness (e.g. brsf's redrawn R) alike in both layouts
    session.stepper.train_step(*next(session.data.train.batches(0)), session.optimizer)
    return {n: p.detach() - before[n] for n, p in session.model.named_parameters()}


@pytest.mark.parametrize("rule", list(RULES))
def test_channels_last_updates_as_the_default_layout(tmp_path, rgb_npz, rule, monkeypatch):
    # trace_bp's kernels are checked elsewhere; here its PyTorch path (the CPU's), not the interpreter's
    # ~50 s a step of Triton kernels on this ResNet-20
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    want = one_update(tmp_path, rgb_npz, rule, False)
    got = one_update(tmp_path, rgb_npz, rule, True)
    assert got.keys() == want.keys()
    moved = 0
    for name, value in want.items():
        if value.abs().max() > 0:
            moved += 1
            assert_rel_close(got[name], value, 1e-4, f"{rule}: {name}", norm="fro")
    assert moved > len(want) // 2, f"{rule}: only {moved} of {len(want)} parameters moved"


def test_channels_last_with_pipeline_stages_is_refused(tmp_path, rgb_npz):
    path = write_recipe(tmp_path / "r.toml", rgb_npz, train={"channels_last": True, "pipeline_stages": 2})
    with pytest.raises(ConfigError, match="train.channels_last = false or train.pipeline_stages = 1"):
        load_recipe(path)
