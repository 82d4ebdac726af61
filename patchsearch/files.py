"""Portable file primitives: checksums, fsync, atomic file replacement, advisory locks.

Everything here works on Linux, macOS and Windows with the standard library alone:
files are replaced with :func:`os.replace` (atomic on all three), directories are
fsynced where the platform allows it (POSIX; Windows has no directory handles and
NTFS journals the rename), and locks are ``fcntl.flock`` (POSIX, one lock per open
file description, released when the process dies) or ``msvcrt.locking`` (Windows,
one byte range per file handle, released when the handle closes).

Windows differs in three ways this module absorbs: a file that any process holds open
cannot be replaced, renamed or deleted (:func:`atomic_write` retries the replacement
for a bounded time, :func:`remove_stale` leaves a file that is in use); ``os.fsync``
needs a handle opened for writing (:func:`fsync_file`); and ``msvcrt.locking`` waits
at most 10 seconds, so :class:`FileLock` never asks it to wait and polls instead,
until a deadline of its own. The platform is chosen at call time from
:data:`IS_WINDOWS`, ``msvcrt`` and ``fcntl`` (module attributes), so a test can run
the Windows branches on any system.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import PatchsearchError

try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

IS_WINDOWS = os.name == "nt"
REPLACE_TIMEOUT_S = 10.0  # how long atomic_write retries a replacement Windows refuses (file in use)
_now, _sleep = time.monotonic, time.sleep  # the clock waits use (tests make it fast)
_POLL_S = (0.001, 0.05)  # first and longest sleep between lock attempts, seconds


class LockTimeout(PatchsearchError, TimeoutError):
    """A :class:`FileLock` was still held by another holder when the wait's deadline passed."""


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the file ``src`` at the new path ``dst``: a hard link (no copy of the bytes; a
    version's files are never changed in place, so versions may share them), or a copy
    where the file system refuses links (another device, FAT, some network shares).

    Raises:
        OSError: ``src`` cannot be read or ``dst`` cannot be written.
    """
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def file_entry(path: str | os.PathLike) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file (what a manifest records)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256(path)}


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to disk (Windows flushes only through a handle open for writing)."""
    fd = os.open(path, (os.O_RDWR if IS_WINDOWS else os.O_RDONLY) | getattr(os, "O_BINARY", 0))
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


def atomic_write(path: str | os.PathLike, data: bytes, replace_timeout_s: float = REPLACE_TIMEOUT_S) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, :func:`os.replace`.

    A reader sees the old content or the new one, never a part; a crash leaves at most
    a ``.<name>.tmp-*`` file behind.

    Args:
        replace_timeout_s: Windows refuses to replace a file another process holds open
            (PermissionError); the replacement is retried for up to this many seconds
            (default :data:`REPLACE_TIMEOUT_S`, 10 s). POSIX never refuses for that reason
            and does not retry.

    Raises:
        PermissionError: the file stayed in use for ``replace_timeout_s`` (the old content stays).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path, replace_timeout_s)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _replace(src: Path, dst: Path, timeout: float) -> None:
    deadline, delay = _now() + timeout, _POLL_S[0]
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError as exc:
            if not IS_WINDOWS:
                raise
            if _now() >= deadline:
                raise PermissionError(exc.errno, f"{dst}: could not be replaced for {timeout:g} s "
                                      f"(replace_timeout_s): another process keeps it open ({exc.strerror})",
                                      str(dst)) from None
        _sleep(max(0.0, min(delay, deadline - _now())))
        delay = min(2 * delay, _POLL_S[1])


class FileLock:
    """An exclusive advisory lock on a file, held while the object is open.

    POSIX: ``fcntl.flock``; Windows: ``msvcrt.locking`` of the first byte, taken without
    waiting and retried here (``msvcrt``'s own wait gives up after 10 seconds). The
    operating system releases it when the holder dies, so a lock left by a killed
    process never needs cleaning. Locks taken through two different ``FileLock``
    objects exclude each other inside one process too. A lock file that is removed
    while this object waits for it (:func:`remove_stale`) is not a lock: on POSIX the
    lock is taken again on the file now at ``path`` (with ``create=True``).

    Args:
        path: the lock file (created if missing).
        blocking: wait for the lock (True) or raise :class:`BlockingIOError` at once.
        create: create the file if missing (else :class:`FileNotFoundError`).
        timeout: with ``blocking``, the longest wait in seconds; None (the default) waits
            as long as it takes.

    Raises:
        BlockingIOError: ``blocking=False`` and another holder has the lock.
        LockTimeout: ``timeout`` seconds passed and another holder still has the lock
            (the message names the lock file and the wait).
        FileNotFoundError: ``create=False`` and the file is missing (or was removed meanwhile).
    """

    _fd = None

    def __init__(self, path: str | os.PathLike, blocking: bool = True, create: bool = True,
                 timeout: float | None = None):
        self.path = Path(path)
        deadline = None if timeout is None or not blocking else _now() + timeout
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_BINARY", 0)
        while True:
            fd = os.open(self.path, flags, 0o644)
            try:
                _acquire(fd, blocking, deadline, self.path, timeout)
                if _is_at(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            with contextlib.suppress(OSError):  # removed while we waited: not a lock any more
                _unlock(fd)
            os.close(fd)
            if not create:
                raise FileNotFoundError(errno.ENOENT, "lock file removed meanwhile", str(self.path))
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
    """True when another holder has the :class:`FileLock` on ``path`` right now (or the file
    exists but cannot be opened to tell: counted as held)."""
    try:
        probe = FileLock(path, blocking=False, create=False)
    except FileNotFoundError:
        return False
    except (BlockingIOError, PermissionError):
        return True
    probe.release()
    return False


def remove_stale(path: str | os.PathLike, before: Callable[[], None] | None = None) -> bool:
    """Delete the lock file ``path`` if no one holds its lock, calling ``before()`` first
    (with the lock held, so whatever the lock protected can be removed safely).

    POSIX: the file is unlinked while the lock is held, so a holder that opened it just
    before and locks it just after sees it gone (:class:`FileLock` then locks a new file).
    Windows: a file anyone holds open cannot be deleted, so it is deleted after release,
    and left (for a later call) while in use.

    Returns:
        True when the lock was free (``before`` ran), False when held, in use or missing.
    """
    path = Path(path)
    try:
        probe = FileLock(path, blocking=False, create=False)
    except (FileNotFoundError, BlockingIOError, PermissionError):
        return False
    try:
        if before is not None:
            before()
        if not IS_WINDOWS:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    finally:
        probe.release()
    if IS_WINDOWS:
        with contextlib.suppress(OSError):
            path.unlink()
    return True


def _acquire(fd: int, blocking: bool, deadline: float | None, path: Path, timeout: float | None) -> None:
    """Lock ``fd``: at once, or polling until ``deadline`` (None: forever)."""
    if not blocking:
        _try_lock(fd)
        return
    if deadline is None and not IS_WINDOWS:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel queues the wait
        return
    delay = _POLL_S[0]
    while True:
        try:
            _try_lock(fd)
            return
        except BlockingIOError:
            if deadline is not None and _now() >= deadline:
                raise LockTimeout(f"{path}: still locked by another holder after waiting {timeout:g} s") from None
        _sleep(delay if deadline is None else max(0.0, min(delay, deadline - _now())))
        delay = min(2 * delay, _POLL_S[1])


def _try_lock(fd: int) -> None:
    """Lock ``fd`` without waiting; BlockingIOError where another holder has it."""
    if IS_WINDOWS:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EDEADLK, getattr(errno, "EDEADLOCK", errno.EDEADLK)):
                raise
            raise BlockingIOError(errno.EAGAIN, str(exc)) from None
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fd: int) -> None:
    if IS_WINDOWS:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _is_at(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (POSIX: it may have been unlinked by
    :func:`remove_stale` between our open and our lock). Windows deletes no open file."""
    if IS_WINDOWS:
        return True
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
