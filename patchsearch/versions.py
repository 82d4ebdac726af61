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
OS lock on its own file ``leases/<version>.<id>.lease``), checks the version is
still there and reads it; it may keep reading it, for as long as it holds the lease,
while newer versions are installed.

Removal: after installing, a writer removes every version that is neither current
nor leased. A lease is live while its lock is held; the OS drops the lock when the
reader exits or dies, so a crashed reader never pins a version (its lease file is
removed as stale), and liveness is judged by the lock, not by a process id, so it
holds across containers sharing a file system. A version is renamed away before it
is deleted and a reader checks after leasing, so either the writer sees the lease
or the reader sees the version gone and retries on the new ``CURRENT``.

Directories of format version 1 (files directly in ``<category>/``, no ``CURRENT``)
are read as they are, and replaced by the first version installed over them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path

from .errors import IndexFormatError, VersionConflict
from .files import FileLock, atomic_write, fsync_dir, fsync_tree, is_locked

CURRENT = "CURRENT"
LOCK = "LOCK"
LEASES = "leases"
LEGACY_MANIFEST = "manifest.json"
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
    try:
        name = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
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

    Raises:
        IndexFormatError: no index at ``root``, or ``CURRENT`` keeps naming a missing version.
    """
    root = Path(root)
    for _ in range(attempts):
        name = current_version(root)
        if name is None:
            if (root / LEGACY_MANIFEST).is_file():
                return Lease(root, None, None)
            raise IndexFormatError(f"no index at {root}: run 'patchsearch build' first")
        (root / LEASES).mkdir(exist_ok=True)
        lease_path = root / LEASES / f"{name}.{uuid.uuid4().hex[:12]}.lease"
        lock = FileLock(lease_path)
        _held.add(lease_path)
        if (root / name).is_dir():
            return Lease(root / name, name, lock)
        Lease(root / name, name, lock).release()  # removed meanwhile: a newer CURRENT exists
    raise IndexFormatError(f"{root / CURRENT}: names {name}, which does not exist")


def _leased(root: Path, name: str) -> bool:
    for path in (root / LEASES).glob(f"{name}.*.lease"):
        if path in _held or is_locked(path):
            return True
        with contextlib.suppress(OSError):  # its reader is gone
            path.unlink()
    return False


def _remove(path: Path) -> None:
    """Rename ``path`` out of the way, then delete it; what cannot be deleted now
    (Windows keeps files that are open) stays as ``.trash-*`` for the next writer."""
    trash = path.with_name(f".trash-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def collect_garbage(root: str | os.PathLike) -> list[str]:
    """Remove what no one needs: versions neither current nor leased, temporaries of
    dead writers, stale leases and trash. Call with the writer ``LOCK`` held.

    Returns:
        names removed (for logs and tests).
    """
    root = Path(root)
    current = current_version(root)
    removed = []
    for name in list_versions(root):
        if name != current and not _leased(root, name):
            _remove(root / name)
            removed.append(name)
    for lock in root.glob(".tmp-*.lock"):
        tmp = lock.with_suffix("")
        if not is_locked(lock):  # its writer died
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock.unlink()
            removed.append(tmp.name)
    for trash in root.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)
    if current is not None and (root / LEGACY_MANIFEST).is_file():
        removed.extend(_remove_legacy(root))
    return removed


def tidy(root: str | os.PathLike) -> list[str]:
    """Take the writer ``LOCK`` and :func:`collect_garbage` (e.g. after releasing a lease
    that kept an old version alive while a new one was installed)."""
    with FileLock(Path(root) / LOCK):
        return collect_garbage(root)


def _remove_legacy(root: Path) -> list[str]:
    """Delete the files of a format-1 index once a version has replaced it (manifest first)."""
    import json

    try:
        names = list(json.loads((root / LEGACY_MANIFEST).read_text()).get("files") or {})
    except (OSError, ValueError):
        names = []
    removed = []
    for name in [LEGACY_MANIFEST, *names]:
        with contextlib.suppress(OSError):
            (root / name).unlink()
            removed.append(name)
    return removed


_ANY = object()


@contextlib.contextmanager
def new_version(root: str | os.PathLike, expect_current=_ANY):
    """Write a new version: yields an empty directory; on success it becomes current.

    If the body raises (or the process dies), the current version is untouched and
    the temporary directory is removed (by the next writer, after a crash).

    Args:
        expect_current: for a writer that derives its version from a version it read
            (``patchsearch add`` / ``remove``): install only if ``CURRENT`` still names
            it, checked under the writer ``LOCK`` in the same critical section as the
            install, so no other writer's version can be overwritten unseen.

    Yields:
        Path of the temporary directory to write the version's files into.

    Raises:
        VersionConflict: ``CURRENT`` no longer names ``expect_current`` (nothing installed).
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
        with FileLock(root / LOCK):
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
    atomic_write(root / CURRENT, f"{name}\n".encode("ascii"))
    return name
