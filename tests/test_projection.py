"""Fixed projections: storages agree, scaling is independent of D, labels take the fast path."""

import math

import pytest
import torch

from trainer.rules.projection import FixedProjection


@pytest.mark.parametrize("dim", [1, 33, 70])
def test_binary_storages_give_identical_signals(dim):
    e = torch.randn(5, 7)
    mask = torch.rand(5, dim)
    outs = [FixedProjection(7, dim, init="binary", storage=s, seed=3, stream=2).project(e, mask)
            for s in ("dense", "packed", "seeded")]
    reference = (e @ FixedProjection(7, dim, init="binary", seed=3, stream=2).dense()) / math.sqrt(7) * mask
    for out in outs:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["gaussian", "uniform", "binary"])
def test_signal_variance_does_not_depend_on_unit_size(init):
    e = torch.randn(64, 10)
    e = e / e.norm(dim=1, keepdim=True)  # unit-norm errors: var(g) = scale^2 / C
    for dim in (50, 5000):
        g = FixedProjection(10, dim, init=init, seed=1).project(e)
        assert g.var().item() == pytest.approx(0.1, rel=0.15)


@pytest.mark.parametrize("storage", ["dense", "packed", "seeded"])
def test_label_projection_equals_one_hot_projection(storage):
    proj = FixedProjection(6, 45, init="binary", storage=storage, seed=9, stream=1, scale=2.0)
    labels = torch.tensor([0, 5, 2, 2])
    torch.testing.assert_close(proj.project_labels(labels), proj.project(torch.eye(6)[labels]))


def test_memory_and_bad_combinations():
    assert FixedProjection(10, 64, init="binary", storage="dense").nbytes == 10 * 64 * 4
    assert FixedProjection(10, 64, init="binary", storage="packed").nbytes == 10 * 2 * 4
    assert FixedProjection(10, 64, init="binary", storage="seeded").nbytes == 0
    with pytest.raises(ValueError, match="holds ±1 matrices only"):
        FixedProjection(10, 64, init="gaussian", storage="packed")
    a = FixedProjection(4, 20, init="gaussian", seed=1, stream=0).dense()
    assert torch.equal(a, FixedProjection(4, 20, init="gaussian", seed=1, stream=0).dense())
    assert not torch.equal(a, FixedProjection(4, 20, init="gaussian", seed=1, stream=1).dense())
