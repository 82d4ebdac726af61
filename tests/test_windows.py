"""patchsearch's Windows branches, run on an emulation of Windows file semantics (tests/winemu.py):
msvcrt.locking with its documented 10-try limit, files that cannot be replaced, renamed or deleted
while open, directories that cannot be opened or fsynced."""

import gc
import os
import threading

import numpy as np
import pytest
import winemu

from patchsearch import PatchIndex, files, versions
from patchsearch.files import LockTimeout


def _bank(m=300, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)


def _dirs(root):
    return sorted(p.name for p in root.iterdir() if p.name not in ("CURRENT", "LOCK", "leases"))


@pytest.fixture
def clock():
    return winemu.FakeClock()


@pytest.fixture
def windows(monkeypatch, clock):
    """Windows semantics on a fake clock (single-threaded tests: time passes when something waits)."""
    return winemu.install(monkeypatch, files, clock.sleep, clock.monotonic)


def test_the_emulation_follows_msvcrt_locking(tmp_path, clock, windows):
    a = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    b = os.open(tmp_path / "f", os.O_RDWR)
    windows.locking(a, windows.LK_NBLCK, 1)
    with pytest.raises(OSError) as exc:
        windows.locking(b, windows.LK_NBLCK, 1)  # another handle of this process: refused at once
    assert exc.value.errno == 13 and clock.t == 0
    with pytest.raises(OSError) as exc:
        windows.locking(b, windows.LK_LOCK, 1)  # 10 tries, 1 s apart, then an error
    assert exc.value.errno == winemu.EDEADLOCK and clock.t == 9
    with pytest.raises(OSError):
        windows.locking(a, windows.LK_NBLCK, 1)  # not even its holder locks it twice
    with pytest.raises(OSError):
        windows.locking(b, windows.LK_UNLCK, 1)  # unlocking what this handle does not hold
    os.close(a)  # closing the handle drops its locks
    windows.locking(b, windows.LK_NBLCK, 1)
    with open(tmp_path / "g", "w") as f, pytest.raises(PermissionError):
        os.replace(tmp_path / "f", f.name)  # an open target cannot be replaced ...
    with pytest.raises(PermissionError):
        os.unlink(tmp_path / "f")  # ... nor an open file deleted
    os.close(b)
    with pytest.raises(PermissionError):
        os.open(tmp_path, os.O_RDONLY)  # nor a directory opened


def test_a_writer_waits_for_the_lock_longer_than_msvcrt_would(tmp_path, clock, windows):
    """Another writer holds LOCK for 15 s: msvcrt's own wait would give up after 10 and throw the
    finished version away; the lock wait polls until its own deadline and installs."""
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    holder = files.FileLock(root / "LOCK")
    clock.at(15.0, holder.release)
    PatchIndex.from_embeddings(_bank(200, seed=2)).save(root)
    assert clock.t >= 15.0 and versions.current_version(root) == "v000002" and _dirs(root) == ["v000002"]
    assert PatchIndex.load(root).size == 200
    assert windows.calls.get(winemu.LK_LOCK, 0) == 0 and windows.calls[winemu.LK_NBLCK] > 3


def test_the_lock_wait_ends_at_its_deadline(tmp_path, clock, windows):
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    holder = files.FileLock(root / "LOCK")
    with pytest.raises(LockTimeout, match=r"LOCK: another writer still held the lock after 30 s \(lock_timeout_s\)"):
        with versions.new_version(root, lock_timeout_s=30) as tmp:
            PatchIndex.from_embeddings(_bank(200, seed=2)).write(tmp)
    assert 30 <= clock.t < 31
    holder.release()
    assert versions.current_version(root) == "v000001" and not list(root.glob(".tmp-*"))
    with pytest.raises(LockTimeout, match="still locked by another holder after waiting 2 s"):
        with files.FileLock(root / "x"), files.FileLock(root / "x", timeout=2):
            pass


def test_current_held_open_by_a_reader_is_replaced_once_it_is_closed(tmp_path, clock, windows):
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    reader = open(root / "CURRENT")  # a reader reading CURRENT this very moment
    clock.at(0.5, reader.close)
    PatchIndex.from_embeddings(_bank(200, seed=2)).save(root)
    assert ("replace", str(root / "CURRENT")) in windows.refused  # refused while open ...
    assert versions.current_version(root) == "v000002"  # ... and retried


def test_current_held_open_too_long_installs_nothing(tmp_path, clock, windows):
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    with open(root / "CURRENT"):
        with pytest.raises(PermissionError, match=r"CURRENT: could not be replaced for 10 s \(replace_timeout_s\)"):
            PatchIndex.from_embeddings(_bank(200, seed=2)).save(root)
    assert versions.current_version(root) == "v000001" and _dirs(root) == ["v000001"]
    assert PatchIndex.load(root).size == 300


def test_open_files_delay_removal_until_closed(tmp_path, clock, windows):
    """A version with an open file cannot be renamed away, a temporary with an open file cannot be
    deleted: both stay, and a later writer removes them once closed."""
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    held = open(root / "v000001" / "manifest.json", "rb")  # unleased, but open
    with pytest.raises(RuntimeError):
        with versions.new_version(root) as tmp:
            leak = open(tmp / "half.bin", "wb")  # a writer that fails with a file open
            raise RuntimeError("boom")
    assert [p.name for p in root.glob(".tmp-*") if p.is_dir()]  # could not be deleted
    PatchIndex.from_embeddings(_bank(200, seed=2)).save(root)
    assert "v000001" in _dirs(root)  # still open: not removed
    held.close()
    leak.close()
    PatchIndex.from_embeddings(_bank(100, seed=3)).save(root)
    assert _dirs(root) == ["v000003"] and not list(root.glob(".tmp-*")) and not list(root.glob(".trash-*"))


def test_reading_current_retries_while_it_is_being_replaced(tmp_path, clock, windows, monkeypatch):
    """Windows refuses to open a file whose replacement is under way (PermissionError): a reader
    of CURRENT tries again instead of reporting a damaged index."""
    import pathlib

    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    real, refusals = pathlib.Path.read_text, [2]

    def busy_twice(self, *args, **kwargs):
        if self.name == "CURRENT" and refusals[0]:
            refusals[0] -= 1
            raise PermissionError(13, "Access is denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", busy_twice)
    assert versions.current_version(root) == "v000001" and refusals == [0]


def test_build_load_rebuild_add_cycle_on_windows(tmp_path, monkeypatch):
    """The whole cycle on emulated Windows (real time, threads): build, readers loading and
    searching while rebuilds install new versions, add; a reader's version stays while it is open."""
    import time

    import torch
    from conftest import make_mvtec

    from patchsearch.data import train_images
    from patchsearch.pipeline import build, rebuild
    from patchsearch.update import add_images, remove_images

    data = make_mvtec(tmp_path / "mvtec", n_train=6)
    extra = make_mvtec(tmp_path / "more", n_train=2, seed=5)
    emu = winemu.install(monkeypatch, files, time.sleep)
    root = tmp_path / "idx" / "widget"
    build(train_images(data, "widget"), root, category="widget", data_root=data / "widget", resize=64,
          coreset_ratio=0.25, batch_size=4)
    first = PatchIndex.load(root)
    q = first.bank[:20][None] + np.float32(0.01)
    errors, loads = [], [0]

    def reader():
        try:
            for _ in range(12):
                index = PatchIndex.load(root)
                res = index.search(index.bank[:20][None] + np.float32(0.01))
                assert (res.locations[0, :, 0] == np.arange(20)).all()
                index.close()
                loads[0] += 1
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(3):
        rebuild(root, coreset_ratio=(0.5, 0.25)[i % 2])
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert loads[0] == 24
    assert first.search(q).locations[0, :, 0].tolist() == list(range(20))  # its version is still readable
    assert "v000001" in _dirs(root)
    before = PatchIndex.load(root).size
    frames = sorted((extra / "widget" / "train" / "good").glob("*.png"))
    added = add_images(root, frames, data_root=extra, batch_size=4)
    assert added.version == "v000005" and added.size >= before
    assert added.manifest.store["num_images"] == first.manifest.store["num_images"] + 2
    removed = remove_images(root, frames[:1], data_root=extra, batch_size=4)
    assert removed.version == "v000006" and removed.manifest.store["num_images"] == added.manifest.store["num_images"] - 1
    for index in (first, added, removed):
        index.close()
    del first, added, removed, index
    gc.collect()  # memory maps of closed indexes go with their objects (Windows keeps mapped files)
    versions.tidy(root)
    assert _dirs(root) == ["v000006"] and not list(root.glob(".t*"))
    assert emu.calls[winemu.LK_NBLCK] > 0 and emu.calls.get(winemu.LK_LOCK, 0) == 0


def test_format1_files_in_use_are_removed_later_and_manifest_last(tmp_path, clock, windows):
    """Replacing a format-1 directory while one of its files is open (Windows cannot delete it):
    the manifest that lists the files stays until every file is gone, so a later writer finishes."""
    import json

    root, tmp = tmp_path / "cat", tmp_path / "tmp"
    PatchIndex.from_embeddings(_bank(seed=5)).save(tmp)
    root.mkdir()
    for p in (tmp / versions.current_version(tmp)).iterdir():
        (root / p.name).write_bytes(p.read_bytes())
    man = json.loads((root / "manifest.json").read_text())
    legacy = ["manifest.json", *man["files"]]
    last = max(man["files"])
    man["format_version"] = 1
    man["ivfpq"] = man["index"].pop("params") or None
    (root / "manifest.json").write_text(json.dumps(man))
    held = open(root / last, "rb")  # open, and not through a lease
    PatchIndex.from_embeddings(_bank(seed=7)).save(root)
    assert (root / "manifest.json").is_file() and (root / last).is_file()
    held.close()
    PatchIndex.from_embeddings(_bank(seed=8)).save(root)
    assert not [n for n in legacy if (root / n).exists()] and _dirs(root) == ["v000002"]


def test_link_or_copy_copies_where_links_are_refused(tmp_path, monkeypatch):
    src = tmp_path / "a.bin"
    src.write_bytes(b"patch rows")
    files.link_or_copy(src, tmp_path / "linked.bin")
    assert os.path.samefile(src, tmp_path / "linked.bin")  # a hard link where the file system allows it

    def refuse(a, b):
        raise OSError("links not supported")

    monkeypatch.setattr(os, "link", refuse)
    files.link_or_copy(src, tmp_path / "copied.bin")
    assert (tmp_path / "copied.bin").read_bytes() == b"patch rows"
    assert not os.path.samefile(src, tmp_path / "copied.bin")
