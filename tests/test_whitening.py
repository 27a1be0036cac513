"""[data] whiten (GCN, ZCA), train_subset and input_noise: each against a plain reference of its equation."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_rel_close, write_recipe
from trainer.cli import main
from trainer.config import ConfigError, DataConfig
from trainer.data import DeviceLoader, Images, NormStats, balanced_subset, build_data

CPU = torch.device("cpu")


def _images(n: int = 300, shape: tuple[int, int, int] = (3, 5, 7), seed: int = 0) -> Images:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    return Images(x, torch.randint(0, 4, (n,), generator=gen))


def _zca_reference(p: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) of ZCA by numpy in float64: W = U diag(1/sqrt(λ + ε·mean λ)) Uᵀ."""
    flat = p.reshape(len(p), -1)
    mean = flat.mean(0)
    cov = np.cov(flat, rowvar=False)
    lam, u = np.linalg.eigh(cov)
    lam = np.clip(lam, 0, None)
    return mean, (u / np.sqrt(lam + epsilon * lam.mean())) @ u.T


def _gcn_reference(p: np.ndarray) -> np.ndarray:
    flat = p.reshape(len(p), -1)
    centred = flat - flat.mean(1, keepdims=True)
    return (centred / np.maximum(centred.std(1, ddof=1, keepdims=True), 1e-2)).reshape(p.shape)


@pytest.mark.parametrize("kind", ["gcn", "zca", "gcn_zca"])
def test_whitening_matches_the_numpy_reference(kind):
    images = _images()
    pixels = images.x.double().numpy() / 255
    stats = NormStats.of(images.x, kind, zca_epsilon=0.05)
    fresh = _images(seed=1).x  # applied to other images than it was fitted on, as the held-out split is
    want = fresh.double().numpy() / 255
    if "gcn" in kind:
        pixels, want = _gcn_reference(pixels), _gcn_reference(want)
    if "zca" in kind:
        mean, w = _zca_reference(pixels, 0.05)
        want = ((want.reshape(len(want), -1) - mean) @ w).reshape(want.shape)
    got = stats.apply(fresh)
    assert got.dtype == torch.float32 and got.shape == fresh.shape
    assert_rel_close(got, torch.from_numpy(want).float(), 2e-4, kind)


def test_zca_whitens_the_training_images():
    images = _images(n=2000, shape=(2, 3, 3))  # D = 18, many samples: the covariance is well estimated
    stats = NormStats.of(images.x, "zca", zca_epsilon=1e-6)
    z = stats.apply(images.x).reshape(len(images.y), -1).double()
    cov = torch.cov(z.T)
    assert_rel_close(cov, torch.eye(18, dtype=torch.float64), 1e-3, "covariance of the whitened images")
    assert z.mean(0).abs().max() < 1e-4


def test_no_whitening_is_the_per_channel_normalisation():
    images = _images()
    stats = NormStats.of(images.x)
    pixels = images.x.double() / 255
    mean = pixels.mean((0, 2, 3)).view(1, -1, 1, 1)
    std = pixels.transpose(0, 1).reshape(3, -1).std(1).view(1, -1, 1, 1)
    assert_rel_close(stats.apply(images.x), ((pixels - mean) / std).float(), 1e-5)
    assert stats.zca_matrix is None


def test_the_loader_serves_whitened_images_and_keeps_augmenting():
    images = _images(n=64)
    stats = NormStats.of(images.x, "gcn_zca")
    loader = DeviceLoader(images, 16, CPU, stats, train=False)
    x, y = next(loader.batches(0))
    assert_rel_close(x, stats.apply(images.x[:16]), 1e-6)
    train = DeviceLoader(images, 16, CPU, stats, train=True, crop_padding=1, flip=True, seed=3)
    first, second = [b[0] for b in train.batches(0)], [b[0] for b in train.batches(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "an epoch is fixed by (seed, epoch)"


def test_input_noise_is_gaussian_of_that_std_and_seeded():
    images = Images(torch.full((512, 1, 4, 4), 128, dtype=torch.uint8), torch.zeros(512, dtype=torch.int64))
    stats = NormStats((0.5,), (1.0,))
    noisy = DeviceLoader(images, 512, CPU, stats, train=True, seed=1, input_noise=0.3)
    clean = DeviceLoader(images, 512, CPU, stats, train=True, seed=1)
    delta = next(noisy.batches(0))[0] - next(clean.batches(0))[0]
    assert abs(delta.std().item() - 0.3) < 0.01 and abs(delta.mean().item()) < 0.01
    assert torch.equal(next(noisy.batches(0))[0], next(noisy.batches(0))[0])
    assert not torch.equal(next(noisy.batches(0))[0], next(noisy.batches(1))[0])
    evaluation = DeviceLoader(images, 512, CPU, stats, train=False)
    assert torch.equal(next(evaluation.batches(0))[0], next(clean.batches(0))[0]), "no noise outside training"


@pytest.mark.parametrize("count", [1, 37, 40, 200, 299])
def test_balanced_subset_is_as_equal_as_the_classes_allow(count):
    images = _images()
    sub = balanced_subset(images, count, seed=5)
    assert len(sub.y) == count
    counts = torch.bincount(sub.y, minlength=4)
    available = torch.bincount(images.y, minlength=4)
    quota = count // 4
    assert all(int(c) >= min(quota, int(a)) for c, a in zip(counts, available))
    assert int(counts.max()) - int(counts.min()) <= max(1, int(available.max() - available.min()))
    rows = {tuple(r.flatten().tolist()) for r in images.x}
    assert all(tuple(r.flatten().tolist()) in rows for r in sub.x), "a subset of the images, not new ones"
    assert torch.equal(balanced_subset(images, count, seed=5).x, sub.x), "fixed by its seed"
    assert balanced_subset(images, 300, seed=5) is images


def test_subset_whitening_and_noise_through_a_run_and_its_checkpoint(tmp_path, tiny_npz, capsys):
    data = {"whiten": "gcn_zca", "train_subset": 120, "input_noise": 0.1, "zca_epsilon": 0.2}
    path = write_recipe(tmp_path / "r.toml", tiny_npz, data=data)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    bundle = build_data(DataConfig(name="npz", path=str(tiny_npz), val_fraction=0.25, crop_padding=0, **data),
                        CPU, 32, 512, seed=0)
    assert bundle.train.num_samples == 120 and bundle.test.num_samples == 100
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    saved = NormStats.from_state(payload["data"])
    assert saved.whiten == "gcn_zca" and torch.equal(saved.zca_matrix, bundle.stats.zca_matrix)
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0  # evaluates with the saved whitening
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(results["accuracy"])


def test_checkpoints_without_whitening_fields_still_load():
    stats = NormStats.from_state({"mean": [0.5], "std": [0.25]})
    assert stats.whiten == "none" and stats.zca_matrix is None


@pytest.mark.parametrize("key, value, message", [
    ("train_subset", 1000, "train_subset = 1000, but the training split holds 300"),
    ("train_subset", -1, "train_subset: must be 0"),
    ("zca_epsilon", 0, "zca_epsilon: must be positive"),
    ("input_noise", -0.5, "input_noise: must be non-negative"),
    ("whiten", "pca", "whiten"),
])
def test_bad_data_options_are_named(tmp_path, tiny_npz, capsys, key, value, message):
    path = write_recipe(tmp_path / "r.toml", tiny_npz, data={key: value})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_imagefolder_refuses_in_memory_options():
    from trainer.recipes import recipe_from_dict

    with pytest.raises(ConfigError, match="whiten"):
        recipe_from_dict({"data": {"name": "imagefolder", "root": "x", "whiten": "zca"}})
