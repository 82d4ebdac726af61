"""The index directory: its ``manifest.json`` and crash-safe replacement.

An index directory ``<index-dir>/<category>/`` holds::

    manifest.json        what was built and how (this module)
    shard_NNN.faiss      FAISS index shards over the memory bank (index.py)
    memory_bank.arrow    memory-bank embeddings and their source patches (search.py)
    patches.arrow        every raw training patch embedding (store.py)

A directory is written complete into a hidden temporary directory beside the
target and only then renamed into place (:func:`atomic_directory`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import IndexFormatError

MANIFEST = "manifest.json"
FORMAT = "patchsearch-index"
FORMAT_VERSION = 1


def package_versions() -> dict:
    """Versions of the packages an index depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("patchsearch", "torch", "torchvision", "numpy", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import faiss

    out["faiss"] = faiss.__version__
    return out


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest.json`` (format and version added) and fsync it."""
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    path = Path(directory) / MANIFEST
    with open(path, "w") as f:
        json.dump(body, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and check ``manifest.json``.

    Raises:
        IndexFormatError: no index there, unreadable JSON, another format, or a format
            version this patchsearch does not know.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"no index at {directory} ({MANIFEST} missing): run 'patchsearch build' first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not a patchsearch index manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: index format version {version!r} is not supported "
                               f"(this patchsearch reads version {FORMAT_VERSION}); rebuild the index")
    return manifest


def file_entry(path: Path) -> dict:
    """{"size": bytes, "sha256": hex} of a file."""
    from .features import file_sha256

    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def check_sizes(directory: str | os.PathLike, manifest: dict) -> None:
    """Fast integrity check: every file the manifest lists exists with its recorded size.

    Raises:
        IndexFormatError: a file is missing or has another size (names it, and says
            whether the Arrow patch store can rebuild the index).
    """
    directory = Path(directory)
    files = manifest.get("files") or {}
    for name, entry in files.items():
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["size"]:
            what = "missing" if size is None else f"{size} bytes, the manifest says {entry['size']}"
            raise IndexFormatError(f"{path}: damaged index file ({what}){_rebuild_hint(directory, manifest, name)}")


def verify(directory: str | os.PathLike) -> list[str]:
    """Full integrity check: sizes and SHA-256 of every file the manifest lists.

    Returns:
        one line per damaged file (empty when the index is intact).

    Raises:
        IndexFormatError: no readable manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for name, entry in sorted((manifest.get("files") or {}).items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing{_rebuild_hint(directory, manifest, name)}")
            continue
        got = file_entry(path)
        if got["size"] != entry["size"]:
            problems.append(f"{path}: {got['size']} bytes, the manifest says {entry['size']}"
                            f"{_rebuild_hint(directory, manifest, name)}")
        elif got["sha256"] != entry["sha256"]:
            problems.append(f"{path}: checksum mismatch (content damaged){_rebuild_hint(directory, manifest, name)}")
    return problems


def _rebuild_hint(directory: Path, manifest: dict, damaged: str) -> str:
    store = (manifest.get("store") or {}).get("file")
    files = manifest.get("files") or {}
    if not store or damaged == store or store not in files:
        return ""
    path = directory / store
    if path.is_file() and path.stat().st_size == files[store]["size"]:
        category = manifest.get("category") or directory.name
        return f"; its Arrow patch store is intact: 'patchsearch rebuild --category {category}' restores it"
    return ""


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove temporary and old directories of ``target`` left by killed writers.

    A ``.<name>.tmp-<pid>-<tag>`` or ``.<name>.old-<pid>-<tag>`` directory is stale when
    process <pid> no longer runs. Returns the removed paths.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.glob(f".{target.name}.*-*-*"):
        kind, _, rest = path.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a fresh hidden temporary directory beside ``target``; on success, replace ``target``.

    Stale temporaries of killed writers are removed first. Files written into the
    temporary directory are fsynced, then it is swapped with ``target`` in one atomic
    ``renameat2(RENAME_EXCHANGE)`` (plain renames where that is unsupported), so a
    reader finds the old complete index or the new one, never a mix or nothing; the old
    one is then removed. If the body raises (or the process dies), ``target`` is left
    untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() and _exchange(tmp, target):
        old = tmp  # after the swap, the temporary name holds the old index
    else:
        old = target.parent / f".{target.name}.old-{tag}"
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def failpoint(stage: str) -> None:
    """Crash-test hook: when ``$PATCHSEARCH_FAILPOINT`` names ``stage``, write the marker
    file ``$PATCHSEARCH_FAILPOINT_FILE`` and wait to be killed. No effect otherwise."""
    if os.environ.get("PATCHSEARCH_FAILPOINT") != stage:
        return
    import time

    Path(os.environ["PATCHSEARCH_FAILPOINT_FILE"]).write_text(stage)
    while True:
        time.sleep(1)
