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


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a fresh hidden temporary directory beside ``target``; on success, replace ``target``.

    Files written into it are fsynced, then the old ``target`` (if any) is moved aside,
    the temporary directory renamed to ``target`` and the old one removed. If the body
    raises, the temporary directory is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{tag}"
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)
