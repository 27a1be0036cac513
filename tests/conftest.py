"""Shared fixtures and assertions.

Triton kernels run under the CPU interpreter in the whole suite: ``TRITON_INTERPRET`` is set here,
and only here, before any test module imports triton (pytest loads this file first). Run with
``TRITON_INTERPRET=0`` to test the kernels' PyTorch paths instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# at most two threads (CI's machine has two cores), fewer where OMP_NUM_THREADS says so: on a machine
# whose cores another job is using, two threads a process wait on each other and run many times slower
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2))))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "", *,
                     norm: str = "max", ignore: torch.Tensor | None = None) -> None:
    """``got`` equals ``want`` up to a relative error of ``rtol``, with every element finite (so an
    unwritten output cannot pass). ``norm="max"``: each element's error against the largest
    ``|want|``; ``"fro"``: ‖got − want‖ / ‖want‖. ``ignore`` masks elements out (e.g. ties at a kink)."""
    label = f"{what}: " if what else ""
    assert got.shape == want.shape, f"{label}shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{label}non-finite entries (unwritten output?)"
    err = got.double() - want.double()
    if ignore is not None:
        err = err.masked_fill(ignore, 0)
    if norm == "fro":
        rel = (err.norm() / want.double().norm().clamp_min(1e-30)).item()
        assert rel <= rtol, f"{label}relative error {rel:.3e} > {rtol:.1e}"
        return
    tol = rtol * max(want.double().abs().max().item() if want.numel() else 0.0, 1e-8)
    worst = err.abs().max().item() if err.numel() else 0.0
    assert worst <= tol, f"{label}max abs error {worst:.3e} > {tol:.3e} (rtol {rtol:.1e} of the largest entry)"


def make_pattern_images(n: int, size: int = 12, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small learnable image set: each class is a bright bar at its own position, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, (n, size, size)).astype(np.int64)
    width = size // classes
    for i, label in enumerate(y):
        x[i, :, label * width : (label + 1) * width] += 150
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    x, y = make_pattern_images(400)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


def write_recipe(path: Path, npz: Path, **sections: dict) -> Path:
    """A fast recipe on ``npz`` (MLP, CPU, no compile, the default layout); ``sections`` override or add keys."""
    tree = {
        "data": {"name": "npz", "path": str(npz), "val_fraction": 0.25, "crop_padding": 0},
        "model": {"name": "mlp", "hidden": [32]},
        "rule": {"name": "bp"},
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "compile": False, "channels_last": False,
                  "log_every": 5},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    from trainer.config import dump_toml

    path.write_text(dump_toml(tree))
    return path
