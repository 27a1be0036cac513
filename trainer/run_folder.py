"""A run folder: checked writable before anything is built, locked while a run uses it.

The lock is ``run.lock``, holding the owner's pid, host and start time; it is written to a
temporary file and hard-linked into place, so it never exists empty. A second run (or a
``--resume``) into a locked folder stops with exit code 2 and names the owner; a lock whose
process is gone (same host) is stale: it is replaced, and the run says so. A lock that cannot be
read is waited on while it is younger than ``LOCK_WRITE_S`` (a trainer that creates it first
and writes it next, as older versions did), then taken for stale.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

from trainer.config import ConfigError, path_kind

LOCK_NAME = "run.lock"
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_WRITE_S = 3.0  # how long an unreadable (empty) lock may be in the middle of being written


def _read_lock(path: Path) -> object:
    """The lock's JSON, waiting while it is unreadable but young; None when gone or unreadable."""
    while True:
        try:
            return json.loads(path.read_text())
        except OSError:
            return None
        except ValueError:  # empty, or half-written
            try:
                if time.time() - path.stat().st_mtime > LOCK_WRITE_S:
                    return None
            except OSError:
                return None
        time.sleep(0.05)


def lock_owner(folder: Path) -> dict | None:
    """The live owner of ``folder``'s lock ({pid, host, started}), or None when unlocked or stale."""
    owner = _read_lock(folder / LOCK_NAME)
    if owner is None:
        return None
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return owner if isinstance(owner, dict) else None  # another host's lock: assume it is live
    try:
        os.kill(int(owner["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return None
    except PermissionError:  # alive, but another user's
        pass
    return owner


def _place(written: Path, lock: Path) -> None:
    """Put the file ``written`` at ``lock`` unless a file is there (FileExistsError): by a hard link,
    atomic, so the lock is never seen empty; where the file system has no links, created then written."""
    try:
        os.link(written, lock)
    except FileExistsError:
        raise
    except OSError:
        with lock.open("x") as f:
            f.write(written.read_text())


class RunFolder:
    """``with RunFolder(path).claim(resume) as folder:`` — the folder checked, created and locked."""

    def __init__(self, path: Path):
        self.path = path
        self.notes: list[str] = []
        self._created = False
        self._locked = False

    def claim(self, resume: bool) -> "RunFolder":
        """Check that the folder can take this run, create it, and take its lock."""
        path = self.path
        if path_kind(path, "--out") == "file":
            raise ConfigError(f"--out {path}: is a file, not a folder; choose another --out")
        if resume and not (path / CHECKPOINT_NAME).exists():
            raise ConfigError(f"{path}: --resume given but there is no {CHECKPOINT_NAME} to resume from")
        if not resume and (path / CHECKPOINT_NAME).exists():
            raise ConfigError(f"{path}: already holds a run; continue it with --resume, or choose another --out "
                              "(--out auto makes a new timestamped folder)")
        try:
            self._created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            self.release()
            raise ConfigError(f"--out {path}: cannot write there ({err.strerror or err}); choose another --out") from None
        self._lock()
        return self

    def _lock(self) -> None:
        """Take the lock, written whole before it is put in place (``_place``); a stale one is replaced once."""
        lock = self.path / LOCK_NAME
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        written = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        written.write_text(json.dumps(me))
        owner = None
        try:
            for _ in range(2):
                try:
                    _place(written, lock)
                    self._locked = True
                    return
                except FileExistsError:
                    owner = lock_owner(self.path)
                    if owner is not None:
                        break
                    self.notes.append(f"removed a stale lock ({lock}: its process is gone)")
                    lock.unlink(missing_ok=True)
        finally:
            written.unlink(missing_ok=True)
        self.release()
        if owner is not None:
            raise ConfigError(f"{self.path}: in use by process {owner.get('pid')} on {owner.get('host')} since "
                              f"{owner.get('started')} ({LOCK_NAME}); wait for it to end, or choose another --out "
                              f"(if that process is gone, delete {lock})")
        raise ConfigError(f"{lock}: could not take the lock; another run is starting in this folder")

    def release(self) -> None:
        """Drop the lock; remove the folder again if this run created it and left nothing in it."""
        if self._locked:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            self._locked = False
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def auto_out(recipe_name: str, root: Path = Path("runs")) -> Path:
    """``--out auto``: runs/RECIPE-YYYYmmdd-HHMMSS (a suffix when two start in the same second)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{recipe_name}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{recipe_name}-{stamp}-{n}"
    return path
