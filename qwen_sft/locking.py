"""A lock file beside a folder or file that a run writes (or, shared, reads), so that a second run into it is refused.

The lock is `.<name>.lock`, next to the output (which is replaced whole when written). An flock(2) on
it does the excluding: the kernel drops that when the owner dies, however it dies, so a lock left by a dead run is
taken over. The file names the owner's PID and host for the message a second run prints.

A lock never writes through a link nor into a file it did not create: the file is written complete under a temporary
name (O_EXCL|O_NOFOLLOW) and linked into place, and one left by a dead run is removed and created afresh. A symlink, a
folder or a FIFO at the lock path, or a file that is not a lock of this toolkit (an empty one too), is refused in one
line and left as it is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

from .cli import UserError, say


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


def _owner(fd: int) -> dict | None:
    """The owner a lock file names; None if it is not a lock file of this toolkit (one is never empty: see _create)."""
    text = os.pread(fd, 4096, 0)
    with contextlib.suppress(ValueError):
        owner = json.loads(text)
        if isinstance(owner, dict) and {"pid", "host", "started"} <= owner.keys():
            return owner
    return None


def _describe(owner: dict | None) -> str:
    owner = owner or {}
    return f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _create(path: Path) -> int | None:
    """A new lock file at `path`, already holding its owner and locked, or None if a file is there: it is written
    and flocked under a temporary name, then linked into place (link never replaces), so a lock file is never seen
    empty, and an empty file at the path is never ours."""
    temporary = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.link(temporary, path)
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.unlink(temporary)
    return fd


def _open(path: Path, flag: str) -> tuple[int, bool]:
    """(fd, created): a new lock file, or the regular file already at the path, never followed through a link."""
    try:
        return _create(path), True
    except FileExistsError:
        pass
    try:  # O_NONBLOCK: a FIFO there must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1, False  # its owner removed it meanwhile: try again
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UserError(f"{path}: the lock file of {flag} is a symbolic link; a lock is never written through a "
                            "link: remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: the lock path of {flag} holds something that is not a file (a folder, FIFO or "
                        "device); remove it or choose another folder")
    return fd, False


def _temporary_name(path: Path, fd: int, owner: dict | None) -> Path | None:
    """The name `_create` wrote the lock under, where its owner was killed between linking it into place and
    unlinking that name (so the lock still has two)."""
    if owner is None:
        return None
    try:
        temporary = path.with_name(f"{path.name}.partial-{owner['pid']}")
        here, held = os.stat(temporary, follow_symlinks=False), os.fstat(fd)
    except (OSError, ValueError):  # no such name, or a forged pid that is no file name
        return None
    return temporary if (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino) else None


def _still_at(path: Path, fd: int) -> bool:
    """Whether `fd` is still the file at `path` (not one its owner unlinked while we waited for it)."""
    try:
        here, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _acquire(path: Path, flag: str, folder: Path, shared: bool) -> int:
    while True:
        fd, created = _open(path, flag)
        if fd < 0:
            continue
        exclusive = _try_flock(fd, fcntl.LOCK_EX)
        if not exclusive and not (shared and _try_flock(fd, fcntl.LOCK_SH)):
            owner = _owner(fd)
            os.close(fd)
            raise UserError(f"{flag} {folder} is in use by another run ({_describe(owner)}; lock file {path}); "
                            f"wait for it to finish, or pass another {flag}")
        if not _still_at(path, fd):
            os.close(fd)
            continue
        if not exclusive:
            return fd  # shared with other readers: the first of them wrote the file
        if not created:  # held by nobody: left by a run that is gone
            owner = _owner(fd)
            temporary = _temporary_name(path, fd, owner)
            if owner is None or os.fstat(fd).st_nlink != 1 + (temporary is not None):  # ours have one name in place
                os.close(fd)
                raise UserError(f"{path}: the lock path of {flag} holds a file that is not a lock of this toolkit; "
                                "move it away or choose another folder")
            say(f"taking over the lock {path} left by a run that is gone ({_describe(owner)})")
            if temporary is not None:
                os.unlink(temporary)
            os.unlink(path)  # never written into: a hard link to another file keeps that file's bytes
            os.close(fd)
            continue
        if shared and not _try_flock(fd, fcntl.LOCK_SH):
            os.close(fd)
            raise UserError(f"{flag} {folder} was taken by another run just now (lock file {path}); try again")
        return fd


def _release(path: Path, fd: int) -> None:
    """The last holder removes the file (a reader still holding it shared keeps it)."""
    try:
        if _try_flock(fd, fcntl.LOCK_EX) and _still_at(path, fd):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, flag: str, shared: bool = False):
    """Hold the lock of `folder` for the block (shared: alongside other readers, but no writer); a UserError naming
    the owner if another live run holds it; an OSError (a writer's lock) if the lock cannot be made."""
    folder = Path(folder)
    path = lock_path(os.path.realpath(folder))  # one lock for every name of the folder
    try:
        if not shared:  # a reader's folder exists already; a missing one is reported by the reader
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, flag, folder, shared)
    except OSError as error:
        if shared and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
            yield None  # a folder nobody may write beside: no writer to keep out
            return
        if shared:
            raise UserError(f"{path}: cannot create the lock of {flag} ({error.strerror or error})") from None
        raise  # claim_outputs names the output that cannot be written (a read-only or full disk)
    try:
        yield path
    finally:
        _release(path, fd)
