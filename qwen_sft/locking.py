"""A lock file beside a folder that one training run writes, so that a second run into it is refused.

The lock is `.<folder>.lock`, next to the folder (the folder itself is replaced whole when written). It holds
the owner's PID and host for the message a second run prints, and an flock(2) on it does the excluding: the
kernel drops that when the owner dies, however it dies, so a lock left by a dead run is taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .cli import UserError, say


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


def _read_owner(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        owner = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(owner, dict):
            return owner
    return {}


def _describe(owner: dict) -> str:
    return f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _open_locked(path: Path, flag: str, folder: Path) -> int:
    """An fd of `path` holding its flock; the loop guards against a file that its owner unlinked meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{flag} {folder} is in use by another training run ({_describe(_read_owner(path))}; lock file "
                f"{path}); wait for it to finish, or pass another {flag}"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, flag: str):
    """Hold the lock of `folder` for the block; a UserError naming the owner if another live run holds it."""
    folder = Path(folder)
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, flag, folder)
    try:
        stale = _read_owner(path)
        if stale:
            say(f"taking over the lock {path} left by a run that is gone ({_describe(stale)})")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
