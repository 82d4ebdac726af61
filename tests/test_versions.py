"""Crash-safe versions: CURRENT pointer, reader leases, garbage collection, format-1 indexes,
and the whole cycle with no Linux-only call available (as on Windows)."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from patchsearch import PatchIndex, files, versions
from patchsearch.errors import IndexFormatError


def _bank(m=300, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)


def _dirs(root):
    return sorted(p.name for p in root.iterdir() if p.name not in ("CURRENT", "LOCK", "leases"))


def test_current_names_the_newest_complete_version(tmp_path):
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    assert (root / "CURRENT").read_text() == "v000001\n" and _dirs(root) == ["v000001"]
    PatchIndex.from_embeddings(_bank(200, seed=2)).save(root)
    assert versions.current_version(root) == "v000002" and _dirs(root) == ["v000002"]  # v1 unleased: removed
    loaded = PatchIndex.load(root)
    assert loaded.version == "v000002" and loaded.size == 200


def test_expect_current_refuses_to_install_over_another_writers_version(tmp_path):
    """A writer that prepared its version from v000001 installs nothing once another writer
    has installed v000002 (checked under LOCK, with the install); with v000001 still current
    it installs."""
    from patchsearch.errors import VersionConflict

    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    with pytest.raises(VersionConflict, match="another writer installed v000002"):
        with versions.new_version(root, expect_current="v000001") as tmp:
            (tmp / "x").write_text("prepared from v000001")
            PatchIndex.from_embeddings(_bank(200, seed=2)).save(root)  # the other writer, meanwhile
    assert versions.current_version(root) == "v000002" and _dirs(root) == ["v000002"]
    with versions.new_version(root, expect_current="v000002") as tmp:
        (tmp / "x").write_text("prepared from v000002")
    assert versions.current_version(root) == "v000003" and (root / "v000003" / "x").exists()


def test_a_leased_version_stays_until_released(tmp_path):
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    reader = PatchIndex.load(root)
    before = reader.search(_bank(20, seed=3).reshape(4, 5, 8))
    for i in range(3):
        PatchIndex.from_embeddings(_bank(100 + i, seed=4 + i)).save(root)
    assert _dirs(root) == ["v000001", "v000004"]  # the reader's version and the current one
    after = reader.search(_bank(20, seed=3).reshape(4, 5, 8))  # still answering from its version
    np.testing.assert_array_equal(before.locations, after.locations)
    reader.close()
    PatchIndex.from_embeddings(_bank(seed=9)).save(root)
    assert _dirs(root) == ["v000005"]


def test_a_dead_readers_lease_does_not_pin_its_version(tmp_path):
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    code = ("import sys, os\nfrom patchsearch import PatchIndex\nindex = PatchIndex.load(sys.argv[1])\n"
            "print('loaded', flush=True)\nos._exit(0)")  # exits without releasing: the OS drops the lock
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True)
    assert "loaded" in out.stdout
    assert len(list((root / "leases").iterdir())) == 1  # its lease file is left behind ...
    PatchIndex.from_embeddings(_bank(seed=2)).save(root)
    assert _dirs(root) == ["v000002"] and not list((root / "leases").iterdir())  # ... and judged stale


def test_a_crashed_writer_leaves_current_and_is_cleaned(tmp_path):
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    code = ("import sys, os\nfrom patchsearch import versions\n"
            "with versions.new_version(sys.argv[1]) as tmp:\n"
            "    (tmp / 'half.bin').write_bytes(b'x' * 100)\n"
            "    os._exit(9)\n")  # dies mid-write
    assert subprocess.run([sys.executable, "-c", code, str(root)]).returncode == 9
    assert [p.name for p in root.glob(".tmp-*") if p.is_dir()]  # its temporary directory is left
    assert PatchIndex.load(root).version == "v000001"
    PatchIndex.from_embeddings(_bank(seed=2)).save(root)
    assert not list(root.glob(".tmp-*")) and _dirs(root) == ["v000002"]


def test_live_writer_temporaries_are_kept(tmp_path):
    root = tmp_path / "cat"
    with versions.new_version(root) as tmp:
        (tmp / "f").write_text("x")
        PatchIndex.from_embeddings(_bank()).save(root)  # another writer installs meanwhile
        assert tmp.is_dir()  # and does not remove a temporary whose writer is alive
        (tmp / "manifest.json").write_text("{}")
    assert versions.current_version(root) == "v000002"


def test_current_errors(tmp_path):
    root = tmp_path / "cat"
    with pytest.raises(IndexFormatError, match="no index at"):
        PatchIndex.load(root)
    root.mkdir()
    (root / "CURRENT").write_text("../../etc\n")
    with pytest.raises(IndexFormatError, match="does not name a version"):
        PatchIndex.load(root)
    (root / "CURRENT").write_text("v000007\n")
    with pytest.raises(IndexFormatError, match="names v000007, which does not exist"):
        PatchIndex.load(root)


def test_file_locks_exclude_each_other_in_one_process(tmp_path):
    a = files.FileLock(tmp_path / "l")
    assert files.is_locked(tmp_path / "l")
    with pytest.raises(BlockingIOError):
        files.FileLock(tmp_path / "l", blocking=False)
    a.release()
    assert not files.is_locked(tmp_path / "l") and not files.is_locked(tmp_path / "missing")


def _format1_index(root):
    """A format-1 (patchsearch 0.1) index directory: files directly in root, no CURRENT."""
    index = PatchIndex.from_embeddings(_bank(seed=5), shards=2)
    tmp = root.parent / "tmp"
    index.save(tmp)
    src = tmp / versions.current_version(tmp)
    root.mkdir()
    for p in src.iterdir():
        (root / p.name).write_bytes(p.read_bytes())
    man = json.loads((root / "manifest.json").read_text())
    man["format_version"] = 1
    params = man["index"].pop("params")
    man["ivfpq"] = params or None
    (root / "manifest.json").write_text(json.dumps(man))
    return index


def test_format1_directories_load_and_are_replaced(tmp_path):
    root = tmp_path / "cat"
    index = _format1_index(root)
    q = _bank(30, seed=6).reshape(3, 10, 8)
    old = PatchIndex.load(root)
    assert old.version is None and old.manifest.index["params"] == {}
    np.testing.assert_array_equal(old.search(q).locations, index.search(q).locations)
    PatchIndex.from_embeddings(_bank(seed=7)).save(root)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == \
        ["CURRENT", "LOCK", "v000001"]  # the format-1 files are gone
    assert PatchIndex.load(root).version == "v000001"


@pytest.fixture
def windows_like(monkeypatch):
    """No Linux-only call works: directories cannot be opened (as on Windows), no /proc,
    no renameat2; patchsearch takes its Windows branches where it has them."""
    real_open = os.open

    def no_dirs(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "directories cannot be opened here", str(path))
        return real_open(path, flags, *args, **kwargs)

    real_builtin_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(str(path))
        return real_builtin_open(path, *args, **kwargs)

    import builtins
    import ctypes

    import patchsearch.pipeline  # noqa: F401 - torch and faiss load their libraries before the patch
    import torch  # noqa: F401

    real_cdll = ctypes.CDLL

    def no_libc(name, *args, **kwargs):
        if name is None:  # the process's own libc: where renameat2 would come from
            raise OSError("no libc symbols here")
        return real_cdll(name, *args, **kwargs)

    import shutil

    monkeypatch.setattr(shutil, "_use_fd_functions", False)  # rmtree as on Windows: no directory handles
    monkeypatch.setattr(os, "open", no_dirs)
    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    monkeypatch.setattr(files, "IS_WINDOWS", True)


def test_whole_cycle_without_linux_only_calls(tmp_path, mvtec_root, windows_like):
    from patchsearch.data import train_images
    from patchsearch.pipeline import build, rebuild

    root = tmp_path / "idx" / "widget"
    build(train_images(mvtec_root, "widget"), root, category="widget", resize=64,
          coreset_ratio=0.25, batch_size=4)
    first = PatchIndex.load(root)
    q = first.bank[:20][None] + np.float32(0.01)
    errors = []

    def reader():
        try:
            for _ in range(15):
                index = PatchIndex.load(root)
                res = index.search(index.bank[:20][None] + np.float32(0.01))
                assert (res.locations[0, :, 0] == np.arange(20)).all()
                index.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(3):
        rebuild(root, coreset_ratio=(0.5, 0.25)[i % 2])
    for t in threads:
        t.join()
    assert not errors, errors
    assert first.search(q).locations[0, :, 0].tolist() == list(range(20))  # its version is still readable
    assert "v000001" in _dirs(root)
    first.close()
    rebuild(root)
    assert _dirs(root) == ["v000005"]
