"""An emulation of the Windows file semantics patchsearch depends on, for tests on POSIX.

What it emulates (from the documentation of ``msvcrt.locking``, ``MoveFileEx``,
``DeleteFile`` and ``FlushFileBuffers``, with files opened as Python opens them: share
mode read+write, no delete sharing):

- ``msvcrt.locking``: locks are byte ranges held per file handle (two handles of one
  process exclude each other; a region cannot be locked twice, not even by its holder);
  ``LK_NBLCK`` raises ``OSError(EACCES)`` at once when the range is held; ``LK_LOCK``
  tries 10 times, 1 second apart, then raises ``OSError(EDEADLOCK)``; ``LK_UNLCK`` of a
  range not held raises ``OSError(EACCES)``; closing the handle drops its locks.
- A file that is open (or memory-mapped) cannot be replaced, renamed or deleted, nor a
  directory holding one renamed or removed: ``PermissionError``. ``os.rename`` onto an
  existing name raises ``FileExistsError``.
- Directories cannot be opened (``PermissionError``), so they cannot be fsynced, and
  ``os.fsync`` of a handle opened read-only fails (``OSError(EBADF)``).
- ``shutil.rmtree`` walks without directory handles (as on Windows).

"Open" is what this process holds (``/proc/self/fd`` and ``/proc/self/maps``), so the
emulation covers threads of one process. Waits go through an injectable ``sleep``
(a :class:`FakeClock` makes ``LK_LOCK``'s 10 seconds instant).
"""

from __future__ import annotations

import errno
import os
import shutil
import threading

LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4
EDEADLOCK = 36  # the Windows CRT's value


class FakeClock:
    """Time that passes only when something sleeps; ``at(t, fn)`` runs fn once time reaches t."""

    def __init__(self):
        self.t = 0.0
        self._events: list[tuple[float, object]] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        due = [e for e in self._events if e[0] <= self.t]
        self._events = [e for e in self._events if e[0] > self.t]
        for _, fn in sorted(due, key=lambda e: e[0]):
            fn()

    def at(self, t: float, fn) -> None:
        self._events.append((t, fn))


class FakeMsvcrt:
    """``msvcrt.locking`` with its documented semantics (see the module docstring)."""

    LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK

    def __init__(self, sleep):
        self._sleep = sleep
        self._mutex = threading.Lock()
        self._held: dict[int, list[tuple]] = {}  # handle -> [(file key, start, stop)]
        self.calls: dict[int, int] = {}  # mode -> number of calls

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        self.calls[mode] = self.calls.get(mode, 0) + 1
        start = os.lseek(fd, 0, os.SEEK_CUR)
        st = os.fstat(fd)
        region = ((st.st_dev, st.st_ino), start, start + nbytes)
        if mode == LK_UNLCK:
            with self._mutex:
                if region in self._held.get(fd, []):
                    self._held[fd].remove(region)
                    return
            raise OSError(errno.EACCES, "Permission denied")
        tries = 10 if mode in (LK_LOCK, LK_RLCK) else 1
        for attempt in range(tries):
            with self._mutex:
                if not any(k == region[0] and a < region[2] and region[1] < b
                           for held in self._held.values() for k, a, b in held):
                    self._held.setdefault(fd, []).append(region)
                    return
            if attempt < tries - 1:
                self._sleep(1.0)
        if tries == 10:
            raise OSError(EDEADLOCK, "Resource deadlock avoided")
        raise OSError(errno.EACCES, "Permission denied")

    def closed(self, fd: int) -> None:
        with self._mutex:
            self._held.pop(fd, None)


def open_paths() -> set[str]:
    """Every path this process holds open or mapped right now."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with _real["open"]("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                found.add(parts[5].rstrip("\n"))
    return found


def in_use(path) -> str | None:
    """The open path that makes ``path`` (a file, or a directory holding it) busy, if any."""
    p = os.path.realpath(os.fspath(path))
    for q in open_paths():
        if q == p or q.startswith(p + os.sep):
            return q
    return None


_real: dict = {}


def install(monkeypatch, files_module, sleep, monotonic=None) -> FakeMsvcrt:
    """Make ``files_module`` (patchsearch.files) take its Windows branches on this emulation.

    Returns:
        the :class:`FakeMsvcrt` (its ``calls`` count the lock calls), with ``refused``:
        a list of (operation, path) the emulated Windows refused.
    """
    import builtins

    _real.update(open=builtins.open, os_open=os.open, close=os.close, fsync=os.fsync, replace=os.replace,
                 rename=os.rename, unlink=os.unlink, remove=os.remove, rmdir=os.rmdir)
    fake = FakeMsvcrt(sleep)
    fake.refused = []

    def busy(op, *paths):
        for p in paths:
            if os.path.lexists(p) and (holder := in_use(p)):
                fake.refused.append((op, os.fspath(p)))
                raise PermissionError(errno.EACCES, f"in use ({holder})", os.fspath(p))

    def w_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "directories cannot be opened", os.fspath(path))
        return _real["os_open"](path, flags, *args, **kwargs)

    def w_close(fd):
        fake.closed(fd)
        return _real["close"](fd)

    def w_fsync(fd):
        import fcntl

        fd = fd if isinstance(fd, int) else fd.fileno()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return _real["fsync"](fd)

    def w_replace(src, dst, **kwargs):
        busy("replace", src, dst)
        if os.path.isdir(dst):
            raise PermissionError(errno.EACCES, "Access is denied", os.fspath(dst))
        return _real["replace"](src, dst, **kwargs)

    def w_rename(src, dst, **kwargs):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "Cannot create a file when that file already exists", os.fspath(dst))
        busy("rename", src)
        return _real["rename"](src, dst, **kwargs)

    def w_unlink(path, **kwargs):
        busy("unlink", path)
        return _real["unlink"](path, **kwargs)

    def w_rmdir(path, **kwargs):
        busy("rmdir", path)
        return _real["rmdir"](path, **kwargs)

    for name, fn in [("open", w_open), ("close", w_close), ("fsync", w_fsync), ("replace", w_replace),
                     ("rename", w_rename), ("unlink", w_unlink), ("remove", w_unlink), ("rmdir", w_rmdir)]:
        monkeypatch.setattr(os, name, fn)
    monkeypatch.setattr(shutil, "_use_fd_functions", False)
    monkeypatch.setattr(files_module, "IS_WINDOWS", True)
    monkeypatch.setattr(files_module, "msvcrt", fake)
    monkeypatch.setattr(files_module, "fcntl", None)  # any POSIX lock call now fails loudly
    monkeypatch.setattr(files_module, "_sleep", sleep)
    if monotonic is not None:
        monkeypatch.setattr(files_module, "_now", monotonic)
    return fake
