"""Checkpoints: written atomically, holding everything a resume or ``trainer eval`` needs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder or a checkpoint file, as the user named it, to the checkpoint file."""
    path = Path(path)
    candidate = path / CHECKPOINT_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(f"{path}: no checkpoint found (expected a run folder holding {CHECKPOINT_NAME}, or the file)")
    return candidate


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (tensors only: no arbitrary objects are unpickled)."""
    file = resolve_checkpoint(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise ConfigError(f"{file}: not a readable checkpoint ({err})") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{file}: checkpoint format {payload.get('format_version')!r}, expected {FORMAT_VERSION}")
    return payload


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
