"""Crash-safe versions of an index directory (LevelDB's CURRENT file, made portable).

An index directory ``<index-dir>/<category>/`` holds::

    CURRENT                 one line naming the current version, e.g. "v000042"
    v000041/  v000042/      immutable version directories (manifest.json + files)
    LOCK                    writers hold it while they install a version
    leases/                 one lock file per reader of a version
    .tmp-<id>/ .tmp-<id>.lock   a version being written, and its writer's lock

Writing (:func:`new_version`): the files go into ``.tmp-<id>/`` (its writer holds
``.tmp-<id>.lock``), are fsynced, the directory is renamed to the next free
``vNNNNNN`` and then ``CURRENT`` is replaced by :func:`os.replace` of a temporary
file: the one atomic step, on Linux, macOS and Windows alike. A crash at any point
leaves ``CURRENT`` naming the previous complete version.

Reading (:func:`open_version`): a reader reads ``CURRENT``, takes a *lease* (an
OS lock on its own file ``leases/<version>.<id>.lease``), then reads ``CURRENT``
again: only if it still names the leased version is the lease kept (else the reader
releases it and starts over). It may keep reading that version, for as long as it
holds the lease, while newer versions are installed.

Removal: after installing, a writer removes every version that is neither current
nor leased. A lease is live while its lock is held; the OS drops the lock when the
reader exits or dies, so a crashed reader never pins a version (its stale lease file
is removed), and liveness is judged by the lock, not by a process id, so it holds
across containers sharing a file system. No leased version is removed: the writer
reads ``CURRENT`` (under ``LOCK``, after its install) and only then looks for the
leases of the versions it did not name; a reader keeps a lease only if its second
read of ``CURRENT``, made after leasing, still named the version, so the version
stopped being current after the lease was taken, and the writer's look saw it. (A
stale lease file is unlinked while its lock is held, and :class:`~patchsearch.files.FileLock`
re-checks after locking that its file is still there: no lease is lost to that either.)

A reader that cannot create a lease because the directory is read-only (EROFS: a
read-only mount or medium; EACCES/EPERM: no write permission for this user) reads
without one. No one can remove a version on a read-only file system; where only this
user lacks the permission, a writer may remove the version once it is no longer
current: give readers write access to ``leases/`` where writers run.

Directories of format version 1 (files directly in ``<category>/``, no ``CURRENT``)
are read as they are, under a lease ``leases/format1.<id>.lease`` taken the same way
(kept only if ``CURRENT`` is still missing after it was taken), and replaced by the
first version installed over them: their files are removed once no lease holds them.

Windows: a file that is open cannot be deleted nor a directory holding one renamed;
what cannot be removed now is left (``.trash-*``, stale leases, legacy files) for the
next writer's clean-up, and no reader holds ``CURRENT`` open beyond one short read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path

from . import files
from .errors import IndexFormatError, VersionConflict
from .files import (
    FileLock,
    LockTimeout,
    atomic_write,
    fsync_dir,
    fsync_tree,
    remove_stale,
)

CURRENT = "CURRENT"
LOCK = "LOCK"
LEASES = "leases"
LEGACY_MANIFEST = "manifest.json"
LEGACY_LEASE = "format1"  # the lease name of a format-1 directory's files
LOCK_TIMEOUT_S = 600.0  # how long a writer waits for another writer's LOCK, seconds
_VERSION = re.compile(r"^v(\d{6,})$")
_held: set[Path] = set()  # lease files held by this process


def version_name(number: int) -> str:
    """``v000042`` for 42."""
    return f"v{number:06d}"


def list_versions(root: str | os.PathLike) -> list[str]:
    """Names of the version directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))]
    return [name for _, name in sorted(found)]


def current_version(root: str | os.PathLike) -> str | None:
    """The version ``CURRENT`` names, or None where there is no ``CURRENT``.

    Raises:
        IndexFormatError: ``CURRENT`` exists but does not name a version.
    """
    path = Path(root) / CURRENT
    for attempt in range(20):
        try:
            name = path.read_text(encoding="ascii").strip()  # opened, read and closed at once
            break
        except FileNotFoundError:
            return None
        except PermissionError as exc:  # Windows: being replaced this very moment
            if not files.IS_WINDOWS or attempt == 19:
                raise IndexFormatError(f"{path}: unreadable ({exc})") from None
            files._sleep(0.01 * (attempt + 1))
        except (OSError, UnicodeDecodeError) as exc:
            raise IndexFormatError(f"{path}: unreadable ({exc})") from None
    if not _VERSION.match(name):
        raise IndexFormatError(f"{path}: does not name a version ({name[:40]!r})")
    return name


class Lease:
    """A reader's hold on one version directory; release it (or close the index) when done.

    Attributes:
        path: the version directory to read (for a format-1 index, the index directory).
        version: the version name, or None for a format-1 index.
    """

    def __init__(self, path: Path, version: str | None, lock: FileLock | None):
        self.path = path
        self.version = version
        self._lock = lock

    def release(self) -> None:
        """Let writers remove this version (idempotent)."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            _held.discard(lock.path)
            lock.release()
            with contextlib.suppress(OSError):
                lock.path.unlink()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def open_version(root: str | os.PathLike, attempts: int = 20) -> Lease:
    """Lease the version ``CURRENT`` names (or a format-1 directory as it is).

    The returned version stays in place until the lease is released, whatever writers
    install meanwhile (see the module docstring); callers need no retry. On a read-only
    directory the lease holds no lock (nothing can remove the version there).

    Args:
        attempts: how many times to start over when a writer installs a newer version
            between reading ``CURRENT`` and taking the lease.

    Raises:
        IndexFormatError: no index at ``root``, or ``CURRENT`` keeps naming a missing version.
        OSError: the lease file cannot be created for another reason than a read-only directory.
    """
    root = Path(root)
    for _ in range(attempts):
        name = current_version(root)
        if name is None:
            if (root / LEGACY_MANIFEST).is_file():
                lease = _lease(root, LEGACY_LEASE, root, None)
                if current_version(root) is None and (root / LEGACY_MANIFEST).is_file():
                    return lease
                lease.release()  # a version was installed over it meanwhile
                continue
            if current_version(root) is None:
                raise IndexFormatError(f"no index at {root}: run 'patchsearch build' first")
            continue
        lease = _lease(root, name, root / name, name)
        now = current_version(root)
        if now == name and (root / name).is_dir():
            return lease
        lease.release()
        if now == name:  # installs rename the version into place before CURRENT names it
            raise IndexFormatError(f"{root / CURRENT}: names {name}, which does not exist")
    raise IndexFormatError(f"{root}: a newer version was installed each of the {attempts} times it was "
                           f"opened (attempts); open it again")


def _lease(root: Path, name: str, path: Path, version: str | None) -> Lease:
    """Lock a new lease file for ``name`` (a lock-less lease where the directory is read-only)."""
    lease_path = root / LEASES / f"{name}.{uuid.uuid4().hex[:12]}.lease"
    try:
        (root / LEASES).mkdir(exist_ok=True)
        lock = FileLock(lease_path)
    except OSError as exc:
        if not (isinstance(exc, PermissionError) or exc.errno == errno.EROFS):
            raise
        return Lease(path, version, None)  # read-only here: no writer can remove anything
    _held.add(lease_path)
    return Lease(path, version, lock)


def _leased(root: Path, name: str) -> bool:
    """Whether a live lease holds ``name``; stale lease files (dead readers) are removed."""
    held = False
    for path in (root / LEASES).glob(f"{name}.*.lease"):
        if path in _held or (not remove_stale(path) and path.exists()):  # locked, or in use (Windows)
            held = True
    return held


def _remove(path: Path) -> None:
    """Rename ``path`` out of the way, then delete it; what cannot be deleted now
    (Windows keeps files that are open, and refuses to rename a directory holding one)
    stays, as ``.trash-*`` or under its name, for the next writer."""
    trash = path.with_name(f".trash-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def collect_garbage(root: str | os.PathLike) -> list[str]:
    """Remove what no one needs: versions neither current nor leased, temporaries of
    dead writers, stale leases, trash, and format-1 files no reader leases once a
    version replaced them. Call with the writer ``LOCK`` held.

    Returns:
        names removed (for logs and tests).
    """
    root = Path(root)
    current = current_version(root)  # first: a reader keeps a lease on another version only if taken before this
    removed = []
    for name in list_versions(root):
        if name != current and not _leased(root, name):
            _remove(root / name)
            removed.append(name)
    for lock in root.glob(".tmp-*.lock"):
        tmp = lock.with_suffix("")
        if remove_stale(lock, before=lambda tmp=tmp: shutil.rmtree(tmp, ignore_errors=True)):  # its writer died
            removed.append(tmp.name)
    for tmp in root.glob(".tmp-*"):  # left by a writer that could not delete it (Windows: a file was open)
        if tmp.is_dir() and not tmp.with_name(tmp.name + ".lock").exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for trash in root.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)
    if current is not None and (root / LEGACY_MANIFEST).is_file() and not _leased(root, LEGACY_LEASE):
        removed.extend(_remove_legacy(root))
    return removed


def tidy(root: str | os.PathLike, lock_timeout_s: float | None = LOCK_TIMEOUT_S) -> list[str]:
    """Take the writer ``LOCK`` and :func:`collect_garbage` (e.g. after releasing a lease
    that kept an old version alive while a new one was installed).

    Args:
        lock_timeout_s: see :func:`new_version`.

    Raises:
        LockTimeout: another writer held ``LOCK`` for ``lock_timeout_s`` seconds.
    """
    with _writer_lock(Path(root), lock_timeout_s):
        return collect_garbage(root)


def _writer_lock(root: Path, timeout: float | None) -> FileLock:
    try:
        return FileLock(root / LOCK, timeout=timeout)
    except LockTimeout:
        raise LockTimeout(f"{root / LOCK}: another writer still held the lock after {timeout:g} s "
                          f"(lock_timeout_s); nothing was installed or removed: run it again") from None


def _remove_legacy(root: Path) -> list[str]:
    """Delete the files of a format-1 index once a version has replaced it; the manifest
    goes last, once every file it lists is gone (Windows may refuse some for now)."""
    import json

    try:
        names = list(json.loads((root / LEGACY_MANIFEST).read_text()).get("files") or {})
    except (OSError, ValueError):
        names = []
    removed = []
    for name in names:
        path = root / name
        if path.parent != root or path.name in (CURRENT, LOCK, LEASES) or _VERSION.match(path.name):
            continue  # not a format-1 file
        try:
            path.unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError:
            return removed  # in use: the next writer tries again
    with contextlib.suppress(OSError):
        (root / LEGACY_MANIFEST).unlink()
        removed.append(LEGACY_MANIFEST)
    return removed


_ANY = object()


@contextlib.contextmanager
def new_version(root: str | os.PathLike, expect_current=_ANY, *, lock_timeout_s: float | None = LOCK_TIMEOUT_S):
    """Write a new version: yields an empty directory; on success it becomes current.

    If the body raises (or the process dies), the current version is untouched and
    the temporary directory is removed (by the next writer, after a crash).

    Args:
        expect_current: for a writer that derives its version from a version it read
            (``patchsearch add`` / ``remove``): install only if ``CURRENT`` still names
            it, checked under the writer ``LOCK`` in the same critical section as the
            install, so no other writer's version can be overwritten unseen.
        lock_timeout_s: how long to wait for another writer's ``LOCK`` (held while it
            installs and cleans up), seconds; default :data:`LOCK_TIMEOUT_S` (600 s);
            None waits as long as it takes.

    Yields:
        Path of the temporary directory to write the version's files into.

    Raises:
        VersionConflict: ``CURRENT`` no longer names ``expect_current`` (nothing installed).
        LockTimeout: another writer held ``LOCK`` for ``lock_timeout_s`` (nothing installed).
        PermissionError: Windows kept ``CURRENT`` in use for longer than
            :data:`patchsearch.files.REPLACE_TIMEOUT_S` (nothing installed).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = root / f".tmp-{tag}"
    writing = FileLock(root / f".tmp-{tag}.lock")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        with _writer_lock(root, lock_timeout_s):
            now = current_version(root)
            if expect_current is not _ANY and now != expect_current:
                raise VersionConflict(f"{root}: another writer installed {now} while this update was prepared "
                                      f"from {expect_current}; nothing was installed: run it again")
            install(root, tmp)
            collect_garbage(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        writing.release()
        with contextlib.suppress(OSError):
            (root / f".tmp-{tag}.lock").unlink()


def install(root: Path, tmp: Path) -> str:
    """Rename a complete, fsynced ``tmp`` to the next version and point ``CURRENT`` at it
    (call with the writer ``LOCK`` held). Returns the version name."""
    existing = list_versions(root)
    current = current_version(root)
    numbers = [int(n[1:]) for n in existing + ([current] if current else [])]
    number = max(numbers, default=0) + 1
    while True:
        name = version_name(number)
        try:
            if (root / name).exists():
                raise FileExistsError(name)
            os.rename(tmp, root / name)
            break
        except FileExistsError:
            number += 1
    fsync_dir(root)
    try:
        atomic_write(root / CURRENT, f"{name}\n".encode("ascii"))
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(root / name, tmp)  # not installed: back to the caller's temporary (else removed as garbage)
        raise
    return name
