"""Checkpoint files: written atomically with a sha256 digest and read back verified, whatever they
hold: a run's ``checkpoint.pt``, a pipeline stage's part beside it, or a ``trainer export``.

Every file written here carries a sha256 digest of its contents (``payload_digest``), checked on
every load: damaged bytes in a tensor's data unpickle without complaint (torch checks no checksum)
and would otherwise be trained on or evaluated as if they were the model. What a session puts in a
checkpoint and takes back from one is ``trainer.checkpoint``."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, path_kind
from trainer.run_folder import CHECKPOINT_NAME

FORMAT_VERSION = 1
PAYLOAD_KEYS = ("recipe", "epoch", "step", "world_size", "model", "rule", "optimizer", "scheduler", "rng", "data")
MODEL_KEYS = ("recipe", "epoch", "step", "model", "data")  # what trainer eval needs: a run's checkpoint or an export
DIGEST_KEY = "digest"  # sha256 of the rest of the file's payload, written last
DIGEST_SINCE = "0.2.0"  # the first version whose checkpoints carry a digest
NOTE_KEY = "note"  # set by load_checkpoint on a checkpoint without a digest: the note a caller shows
EXPORTED_KIND = "exported model"  # the "kind" of a file written by trainer export (weights only)


def payload_digest(payload: Any) -> str:
    """The sha256 (hex) of a payload, walked deterministically: dict keys in order, tensors by dtype,
    shape and raw bytes (any dtype, viewed as bytes), other values by type and repr. A tensor's
    bytes are what torch.save stores, so the digest of what was saved equals that of what loads."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}\n".encode())
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}\n".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}\n".encode())
            for item in value:
                feed(item)
        elif isinstance(value, (set, frozenset)):  # iteration order of strings differs between processes
            digest.update(f"{type(value).__name__} {sorted(map(repr, value))!r}\n".encode())
        else:
            digest.update(f"{type(value).__name__} {value!r}\n".encode())

    feed(payload)
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any], fix: str = "free some space or choose another --out") -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: a crash, a full
    disk or a signal never leaves half a file, and the previous checkpoint stays until the rename.
    The payload's digest is written with it (``DIGEST_KEY``); ``fix`` ends the error of a failed write."""
    body = {"format_version": FORMAT_VERSION, **payload}
    body[DIGEST_KEY] = payload_digest(body)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # torch's serializer reports a full disk as RuntimeError
            kept = f"the previous checkpoint {path} is kept" if path.exists() else "no checkpoint was written yet"
            raise ConfigError(f"{path}: could not write the checkpoint ({' '.join(str(err).split())}); {kept}; "
                              f"{fix}") from None
        raise


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder or a checkpoint file, as the user named it, to the checkpoint file."""
    path = Path(path)
    candidate = path / CHECKPOINT_NAME if path_kind(path, "checkpoint") == "folder" else path
    if not candidate.is_file():
        raise ConfigError(f"{path}: no checkpoint found (expected a run folder holding {CHECKPOINT_NAME}, or the file)")
    return candidate


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = PAYLOAD_KEYS) -> dict[str, Any]:
    """Read a checkpoint (or a stage's part, or an exported model, whose ``keys`` differ) onto the CPU
    (tensors only: no arbitrary objects are unpickled) and verify its digest. A checkpoint written
    before digests loads with ``payload[NOTE_KEY]``, the note a caller shows once."""
    file = resolve_checkpoint(path)
    if file.stat().st_size == 0:
        raise ConfigError(f"{file}: the checkpoint is empty (0 bytes); it was never completely written")
    if not zipfile.is_zipfile(file):
        raise ConfigError(f"{file}: not a checkpoint of this trainer (not a file written by torch.save)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses objects other than tensors and plain containers
        raise ConfigError(f"{file}: not a checkpoint of this trainer (it holds Python objects, not only tensors)"
                          ) from None
    except Exception as err:  # noqa: BLE001 -- truncated or damaged archives fail in several ways
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"{file}: the checkpoint is damaged ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise ConfigError(f"{file}: not a checkpoint of this trainer (format {found!r}, expected {FORMAT_VERSION})")
    if DIGEST_KEY not in payload:
        payload[NOTE_KEY] = f"{file} has no digest (written before version {DIGEST_SINCE}); it cannot be verified"
    elif payload.pop(DIGEST_KEY) != payload_digest(payload):
        raise ConfigError(f"{file}: the checkpoint is damaged (its contents do not match the digest written with "
                          "it: the file changed after it was written); restore it from a copy, or train again")
    missing = [key for key in keys if key not in payload]
    if missing and payload.get("kind") == EXPORTED_KIND:
        raise ConfigError(f"{file} is an exported model (weights only); --resume needs the run folder's "
                          f"{CHECKPOINT_NAME}")
    if missing:
        raise ConfigError(f"{file}: the checkpoint lacks {', '.join(missing)}; it is not one of this trainer's")
    return payload


# --- pipeline stages' parts ------------------------------------------------------------------------
# Under a pipeline every rank's optimizer state covers its own stage only. Each rank writes it as a
# part named by the epoch, all ranks wait, and then the main checkpoint (which names the epoch) is
# written: a crash between the two leaves the previous checkpoint and its parts complete. Parts of
# older epochs are removed after the new checkpoint is in place (``Pipeline`` of trainer.parallel.layout
# does both).

STAGE_PARTS = "stages"  # the folder of the parts, in the run folder


def stage_part_path(out_dir: Path, epoch: int, rank: int) -> Path:
    return out_dir / STAGE_PARTS / f"epoch{epoch:04d}-rank{rank}.pt"


def save_stage_part(out_dir: Path, epoch: int, rank: int, optimizer_state: dict[str, Any]) -> None:
    path = stage_part_path(out_dir, epoch, rank)
    path.parent.mkdir(exist_ok=True)
    save_checkpoint(path, {"epoch": epoch, "rank": rank, "optimizer": optimizer_state})


def load_stage_part(out_dir: Path, epoch: int, rank: int) -> dict[str, Any]:
    path = stage_part_path(out_dir, epoch, rank)
    if not path.is_file():
        raise ConfigError(f"{out_dir}: the checkpoint of epoch {epoch} lacks the part of rank {rank} ({path}); "
                          "resume with the same train.pipeline_stages and number of processes")
    return load_checkpoint(path, keys=("epoch", "rank", "optimizer"))


def remove_stage_parts(out_dir: Path, rank: int, keep: int) -> None:
    """Delete this rank's parts of every epoch but ``keep``."""
    for path in (out_dir / STAGE_PARTS).glob(f"epoch*-rank{rank}.pt"):
        if path != stage_part_path(out_dir, keep, rank):
            path.unlink(missing_ok=True)
