"""Portable file primitives: checksums, fsync, atomic file replacement, advisory locks.

Everything here works on Linux, macOS and Windows with the standard library alone:
files are replaced with :func:`os.replace` (atomic on all three), directories are
fsynced where the platform allows it (POSIX; Windows has no directory handles and
NTFS journals the rename), and locks are ``fcntl.flock`` (POSIX, one lock per open
file description, released when the process dies) or ``msvcrt.locking`` (Windows).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

IS_WINDOWS = os.name == "nt"


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file (what a manifest records)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256(path)}


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry table (POSIX); a no-op on Windows, which cannot open directories."""
    if IS_WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file of a directory tree, then the directories themselves."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for path in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(path)
    fsync_dir(directory)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, :func:`os.replace`.

    A reader sees the old content or the new one, never a part; a crash leaves at most
    a ``.<name>.tmp-*`` file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


class FileLock:
    """An exclusive advisory lock on a file, held while the object is open.

    POSIX: ``fcntl.flock``; Windows: ``msvcrt.locking`` of the first byte. The
    operating system releases it when the holder dies, so a lock left by a killed
    process never needs cleaning. Locks taken through two different ``FileLock``
    objects exclude each other inside one process too.

    Args:
        path: the lock file (created if missing).
        blocking: wait for the lock (True) or raise :class:`BlockingIOError` at once.
        create: create the file if missing (else :class:`FileNotFoundError`).

    Raises:
        BlockingIOError: ``blocking=False`` and another holder has the lock.
    """

    _fd = None

    def __init__(self, path: str | os.PathLike, blocking: bool = True, create: bool = True):
        self.path = Path(path)
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            _lock(fd, blocking)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Release the lock and close the file (idempotent)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def is_locked(path: str | os.PathLike) -> bool:
    """True when another holder has the :class:`FileLock` on ``path`` right now."""
    try:
        probe = FileLock(path, blocking=False, create=False)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    probe.release()
    return False


if IS_WINDOWS:  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int, blocking: bool) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            raise BlockingIOError(str(exc)) from None

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int, blocking: bool) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
