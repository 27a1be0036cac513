"""Each data source, read from tiny files in the real on-disk format, and the device loader."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, DataConfig
from trainer.data import DeviceLoader, Images, NormStats, build_data, load_images, load_mnist5k, load_npz, random_crop

CPU = torch.device("cpu")


def test_mnist5k_is_the_embedded_sample():
    images = load_mnist5k()
    assert images.x.shape == (5000, 1, 28, 28) and images.x.dtype == torch.uint8
    assert torch.bincount(images.y).tolist() == [500] * 10
    train, test, name = load_images(DataConfig(name="mnist5k", val_fraction=0.1, split_seed=3))
    assert (len(train.y), len(test.y), name) == (4500, 500, "held-out")
    again = load_images(DataConfig(name="mnist5k", val_fraction=0.1, split_seed=3))[1]
    assert torch.equal(test.x, again.x), "the held-out split is fixed by its seed"


@pytest.mark.parametrize("channels", [None, 3])
def test_npz_hw_and_hwc(tmp_path, channels):
    shape = (10, 5, 6) if channels is None else (10, 5, 6, channels)
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3)
    images = load_npz(tmp_path / "d.npz")
    assert images.x.shape == (10, channels or 1, 5, 6)
    expected = x[3] if channels is None else x[3, :, :, 1]
    assert torch.equal(images.x[3, 0 if channels is None else 1], torch.from_numpy(expected))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 5, 5), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match="x must be uint8"):
        load_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", images=np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(ConfigError, match="must hold arrays 'x' and 'y'"):
        load_npz(tmp_path / "g.npz")
    with pytest.raises(ConfigError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def _write_idx(path: Path, array: np.ndarray) -> None:
    dtype_code = 0x08  # unsigned byte
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    train, test, name = load_images(DataConfig(name="mnist", root=str(tmp_path)))
    assert train.x.shape == (12, 1, 28, 28) and test.x.shape == (5, 1, 28, 28) and name == "test"
    assert test.y.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name, label_key", [("cifar10", "labels"), ("cifar100", "fine_labels")])
def test_torchvision_cifar_from_pickled_batches(tmp_path, monkeypatch, name, label_key):
    import torchvision.datasets.cifar as cifar

    # The files are tiny, so their md5 differ from the real ones: check existence only.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    cls = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    folder = tmp_path / cls.base_folder
    folder.mkdir()
    rng = np.random.default_rng(1)
    for filename, _ in cls.train_list + cls.test_list:
        batch = {"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), label_key: [1, 2, 3, 0]}
        (folder / filename).write_bytes(pickle.dumps(batch))
    meta_key = cls.meta["key"]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(4)]}))
    train, test, _ = load_images(DataConfig(name=name, root=str(tmp_path)))
    assert train.x.shape == (4 * len(cls.train_list), 3, 32, 32) and test.y.tolist() == [1, 2, 3, 0]


def test_missing_torchvision_data_says_where_to_put_it(tmp_path):
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py/, or set data.download=true"):
        load_images(DataConfig(name="cifar10", root=str(tmp_path)))


def test_imagefolder_streams_batches(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, num_workers=0)
    bundle = build_data(cfg, CPU, batch_size=4, eval_batch_size=5, seed=0)
    assert bundle.num_classes == 2 and bundle.input_shape == (3, 16, 16)
    (x, y), = list(bundle.train.batches(0))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert [len(y) for _, y in bundle.test.batches(0)] == [5, 1]


def test_device_loader_epochs_are_seeded_and_drop_the_last_batch():
    images = Images(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    stats = NormStats.of(images.x)
    loader = DeviceLoader(images, 16, CPU, stats, train=True, crop_padding=2, flip=True, seed=5)
    assert len(loader) == 3
    epoch0 = list(loader.batches(0))
    assert all(x.shape == (16, 3, 8, 8) for x, _ in epoch0)
    again = list(loader.batches(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch0, again))
    assert not torch.equal(epoch0[0][1], list(loader.batches(1))[0][1]), "each epoch reshuffles"
    labels = torch.cat([y for _, y in epoch0])
    assert len(set(labels.tolist())) == 48, "no image twice in an epoch"


def test_random_crop_matches_a_per_sample_reference():
    x = torch.randn(5, 2, 7, 9)
    shifts = torch.randint(0, 7, (5, 2))
    out = random_crop(x, 3, shifts)
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], padded[i, :, dy : dy + 7, dx : dx + 9])


def test_norm_stats_per_channel():
    x = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    x[:, 1] = 255
    x[0, 0] = 255
    stats = NormStats.of(x)
    assert stats.mean == pytest.approx((0.25, 1.0))
    assert stats.std[1] == pytest.approx(1e-3)  # a constant channel is not divided by zero
