"""Crash-safe versions: CURRENT pointer, reader leases (also against a writer cleaning up at the
same moment), garbage collection, format-1 indexes, read-only index directories.
(Windows semantics: tests/test_windows.py.)"""

import errno
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
    legacy = sorted(p.name for p in root.iterdir() if p.is_file())
    PatchIndex.from_embeddings(_bank(seed=7)).save(root)
    assert PatchIndex.load(root).version == "v000001"
    assert set(legacy) <= {p.name for p in root.iterdir()}  # leased by the format-1 reader: kept
    np.testing.assert_array_equal(old.search(q).locations, index.search(q).locations)
    old.close()
    versions.tidy(root)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == \
        ["CURRENT", "LOCK", "leases", "v000001"]  # the format-1 files are gone


def test_a_reader_racing_the_clean_up_keeps_its_version(tmp_path, monkeypatch):
    """The reader reads CURRENT (v000001); a writer installs v000002 and checks v000001's leases
    (none yet); the reader leases v000001 and finishes opening; the writer removes v000001.
    The reader must hold a version that exists (it gets v000002)."""
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    read_current, checked, opened = threading.Event(), threading.Event(), threading.Event()
    real_lock, real_leased = versions.FileLock, versions._leased
    out = {}

    def lock(path, *args, **kwargs):
        if threading.current_thread() is reader and "leases" in path.parts and not read_current.is_set():
            read_current.set()  # CURRENT read, the lease not taken yet: let the writer check leases
            assert checked.wait(30)
        return real_lock(path, *args, **kwargs)

    def leased(where, name):
        held = real_leased(where, name)
        if threading.current_thread() is writer and name == "v000001":
            checked.set()  # leases checked, version not removed yet: let the reader finish
            opened.wait(30)
        return held

    def read():
        out["lease"] = versions.open_version(root)
        opened.set()

    def write():
        assert read_current.wait(30)
        PatchIndex.from_embeddings(_bank(200, seed=2)).save(root)

    monkeypatch.setattr(versions, "FileLock", lock)
    monkeypatch.setattr(versions, "_leased", leased)
    reader, writer = threading.Thread(target=read), threading.Thread(target=write)
    reader.start(), writer.start()
    reader.join(60), writer.join(60)
    assert checked.is_set() and opened.is_set()
    lease = out["lease"]
    assert lease.path.is_dir() and (lease.path / "manifest.json").is_file(), lease.version
    PatchIndex.from_embeddings(_bank(100, seed=3)).save(root)  # the next writer keeps it while leased
    assert lease.version in _dirs(root)
    lease.release()


@pytest.mark.parametrize("when", ["after reading CURRENT", "when leasing"])
def test_a_format1_reader_racing_the_first_install(tmp_path, monkeypatch, when):
    """A writer installs v000001 over a format-1 directory (and removes its files) right after a
    reader found no CURRENT, or while the reader takes its lease: the reader gets v000001."""
    root = tmp_path / "cat"
    _format1_index(root)
    real_current, real_lease = versions.current_version, versions.Lease
    fired = []

    def install_once():
        if not fired:
            fired.append(True)
            PatchIndex.from_embeddings(_bank(seed=7)).save(root)

    def current(where):
        name = real_current(where)
        if when == "after reading CURRENT" and name is None:
            install_once()
        return name

    def lease(path, version, lock):
        if when == "when leasing" and version is None:
            install_once()
        return real_lease(path, version, lock)

    monkeypatch.setattr(versions, "current_version", current)
    monkeypatch.setattr(versions, "Lease", lease)
    index = PatchIndex.load(root)
    assert fired and index.version == "v000001" and index.size == 300
    index.close()


@pytest.mark.parametrize("leases_exist", [False, True])
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_index_directories_load_and_answer(built_cli, tmp_path, monkeypatch, leases_exist, code):
    """An index on a read-only mount (EROFS) or in a directory this user cannot write (EACCES) loads
    and answers without a lease. Emulated: the tests run as root, where chmod does not stop
    writes, so every call that would write under the index directory raises what the mount raises."""
    import builtins
    import pathlib
    import shutil

    from click.testing import CliRunner

    from patchsearch.cli import main

    data, idx = built_cli[0], tmp_path / "ro"
    shutil.copytree(built_cli[1], idx)
    if leases_exist:
        PatchIndex.load(idx / "widget").close()
    assert (idx / "widget" / "leases").is_dir() == leases_exist
    before = sorted(str(p) for p in idx.rglob("*"))
    ro = str(idx)
    error = OSError(code, os.strerror(code)) if code == errno.EROFS else PermissionError(code, os.strerror(code))

    def refuse(path):
        if os.path.abspath(os.fspath(path)).startswith(ro):
            raise type(error)(error.errno, error.strerror, os.fspath(path))

    def guard(fn, writes=lambda *a, **k: True):
        def wrapped(path, *args, **kwargs):
            if writes(*args, **kwargs):
                refuse(path)
            return fn(path, *args, **kwargs)
        return wrapped

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    for name in ("mkdir", "unlink", "remove", "rmdir", "rename", "replace", "link"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: flags & write_flags))
    wmode = lambda mode="r", *a, **k: any(c in mode for c in "wax+")
    monkeypatch.setattr(builtins, "open", guard(builtins.open, wmode))
    monkeypatch.setattr(pathlib.Path, "open", guard(pathlib.Path.open, wmode))

    index = PatchIndex.load(idx / "widget")
    assert index.version == "v000001" and index._lease._lock is None
    res = index.search(index.bank[:20][None] + np.float32(0.01))
    assert (res.locations[0, :, 0] == np.arange(20)).all()
    index.close()
    if code == errno.EROFS and not leases_exist:  # and through the CLI (loads the backbone: once)
        good = data / "widget/test/good/000.png"
        for args in (["verify", "--category", "widget"], ["query", str(good), "--category", "widget"]):
            r = CliRunner().invoke(main, [*args, "--index-dir", str(idx)])
            assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    monkeypatch.undo()
    assert sorted(str(p) for p in idx.rglob("*")) == before  # nothing was written


@pytest.fixture(scope="module")
def built_cli(tmp_path_factory):
    """A small generated category and its built index (once for the module)."""
    from click.testing import CliRunner
    from conftest import make_mvtec

    from patchsearch.cli import main

    data = make_mvtec(tmp_path_factory.mktemp("data") / "mvtec")
    idx = tmp_path_factory.mktemp("idx")
    r = CliRunner().invoke(main, ["build", "--category", "widget", "--data-root", str(data), "--index-dir", str(idx),
                                  "--coreset-ratio", "0.25", "--resize", "64", "--crop", "64", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    return data, idx


def test_a_stale_lease_clean_up_cannot_take_a_live_writers_temporary(tmp_path, monkeypatch):
    """A clean-up probes a writer's fresh .tmp-*.lock between its creation and its lock (finds it
    free: stale) and removes it; the writer must still hold a lock file there, so that a later
    clean-up does not remove its temporary directory as abandoned."""
    root = tmp_path / "cat"
    PatchIndex.from_embeddings(_bank(seed=1)).save(root)
    real_open = os.open
    probed = []

    def open_then_clean(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        name = os.path.basename(os.fspath(path))
        if name.startswith(".tmp-") and name.endswith(".lock") and flags & os.O_CREAT and not probed:
            probed.append(name)
            versions.collect_garbage(root)  # another writer's clean-up, at this very moment
        return fd

    monkeypatch.setattr(os, "open", open_then_clean)
    with versions.new_version(root) as tmp:
        assert probed
        (tmp / "f").write_text("x")
        versions.collect_garbage(root)  # a later clean-up, while this writer writes
        assert (tmp / "f").is_file() and files.is_locked(root / (tmp.name + ".lock"))
        PatchIndex.from_embeddings(_bank(200, seed=2)).write(tmp)
    assert versions.current_version(root) == "v000002" and PatchIndex.load(root).size == 200


def test_a_stale_lock_file_is_unlinked_before_its_lock_is_let_go(tmp_path, monkeypatch):
    """A holder that locks the lock file in the instant between the clean-up's release and its
    unlink would hold a lock on a deleted file: the clean-up unlinks while it still holds the lock."""
    path = tmp_path / "x.lock"
    files.FileLock(path).release()  # a stale lock file: there, unlocked
    real_release, taken = files.FileLock.release, []

    def release(self):
        real_release(self)
        if self.path == path and not taken:
            taken.append(files.FileLock(path))  # a new holder, at this very moment

    monkeypatch.setattr(files.FileLock, "release", release)
    assert files.remove_stale(path)
    monkeypatch.undo()
    assert taken and files.is_locked(path)  # the new holder's lock is on the file at the path
    taken.pop().release()


RO_READER = r"""
import sys
from patchsearch import PatchIndex
from patchsearch.cli import main
index = PatchIndex.load(sys.argv[1] + "/widget")
assert index._lease._lock is None
print("loaded", index.version, index.size, flush=True)
main(["verify", "--category", "widget", "--index-dir", sys.argv[1]], standalone_mode=False)
main(["query", sys.argv[2], "--category", "widget", "--index-dir", sys.argv[1]], standalone_mode=False)
"""


def test_a_real_read_only_mount(built_cli, tmp_path):
    """The same on a real read-only bind mount, in a private mount namespace (needs root and
    CAP_SYS_ADMIN, e.g. not in an unprivileged container: skipped there)."""
    import shutil

    data, src = built_cli[0], tmp_path / "src"
    shutil.copytree(built_cli[1], src)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount --bind {src} {mnt} && mount -o remount,bind,ro {mnt} && ! touch {mnt}/x"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"no read-only bind mount here ({probe and probe.stderr.strip()})")
    script = (f"mount --bind {src} {mnt} && mount -o remount,bind,ro {mnt} && "
              f"exec {sys.executable} -c '{RO_READER}' {mnt} {data / 'widget/test/good/000.png'}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded v000001" in r.stdout and "intact" in r.stdout and '"image_score"' in r.stdout
    assert not (src / "widget" / "leases").exists()
