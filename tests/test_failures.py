"""Failure behaviour: bad input, crashes during build, damaged files, determinism, concurrency, memory."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import patchsearch
from patchsearch import PatchIndex
from patchsearch.cli import main

SMALL = ["--resize", "64", "--crop", "64", "--batch-size", "4"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small generated category and its index (built once for the module)."""
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("data") / "mvtec")
    idx = tmp_path_factory.mktemp("idx")
    r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", idx, "--coreset-ratio", "0.25", *SMALL)
    assert r.exit_code == 0, r.output
    return root, idx


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height but holds no pixel data (a huge frame, cheaply)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_query_bad_and_odd_images(built, tmp_path):
    root, idx = built
    good = root / "widget/test/good/000.png"
    rgb = np.asarray(Image.open(good))
    files = {}
    files["zero.png"] = b""
    png = good.read_bytes()
    files["trunc.png"] = png[: len(png) // 2]
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=90)
    jpg = (tmp_path / "full.jpg").read_bytes()
    files["trunc.jpg"] = jpg[: len(jpg) // 2]
    files["text.png"] = b"this is not an image\n"
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    _png_header_only(tmp_path / "huge.png", 20000, 20000)
    Image.fromarray((rgb.mean(-1) * 257).astype(np.uint16)).save(tmp_path / "deep16.png")
    Image.fromarray(rgb.mean(-1).astype(np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(tmp_path / "rgba.png")
    order = ["zero.png", "trunc.png", "trunc.jpg", "text.png", "tiny.png", "huge.png", "deep16.png", "gray.png",
             "rgba.png"]
    r = cli("query", *[tmp_path / n for n in order], good, "--category", "widget", "--index-dir", idx,
            "--batch-size", "3")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = {Path(x["path"]).name: x for x in map(json.loads, r.stdout.strip().splitlines())}
    assert len(lines) == 10
    expect = {"zero.png": "empty file", "trunc.png": "cannot decode", "trunc.jpg": "cannot decode",
              "text.png": "not a readable image", "tiny.png": "smaller than 16", "huge.png": "larger than"}
    for name, msg in expect.items():
        assert msg in lines[name]["error"] and name in lines[name]["error"], lines[name]
    for name in ("deep16.png", "gray.png", "rgba.png", "000.png"):
        assert "error" not in lines[name] and np.isfinite(lines[name]["image_score"])
    # grayscale versions of the same frame score like each other (16-bit scaled to 8-bit)
    assert lines["deep16.png"]["image_score"] == pytest.approx(lines["gray.png"]["image_score"], rel=1e-2)
    assert "6 of 10 images could not be scored" in r.stderr


def test_clear_cli_errors(built, tmp_path):
    root, idx = built
    good = root / "widget/test/good/000.png"
    empty = tmp_path / "empty_root"
    (empty / "widget/train/good").mkdir(parents=True)
    cases = [
        (["build", "--category", "widget", "--data-root", empty], "holds no image"),
        (["query", good, "--category", "widget", "--index-dir", idx, "--backbone", "resnet18"],
         "built with backbone efficientnet_lite1, not resnet18"),
        (["query", good, "--category", "widget", "--index-dir", idx, "--embed-dim", "99"], "152-d embeddings, not 99-d"),
        (["query", good, "--category", "widget", "--index-dir", idx, "--k", "100000"], "larger than the memory bank"),
        (["query", good, "--category", "nothing", "--index-dir", idx], "no index at"),
        (["evaluate", "--category", "widget", "--data-root", tmp_path / "nope", "--index-dir", idx], "does not exist"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.stderr and "Traceback" not in r.output, (args, r.stderr)


def _copy_index(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _files(index_dir: Path) -> Path:
    """The current version directory of an index directory."""
    return index_dir / (index_dir / "CURRENT").read_text().strip()


def test_damaged_files_are_named_with_rebuild_hint(built, tmp_path):
    _, idx = built
    base = tmp_path / "indexes"
    cases = {
        "shard_000.faiss": lambda b: b[:-50],
        "memory_bank.arrow": lambda b: b[: len(b) // 2],
        "manifest.json": lambda b: b.replace(b'"format_version": 2', b'"format_version": 7'),
    }
    for name, damage in cases.items():
        d = _copy_index(idx / "widget", base / name / "widget")
        (_files(d) / name).write_bytes(damage((_files(d) / name).read_bytes()))
        r = cli("query", built[0] / "widget/test/good/000.png", "--category", "widget", "--index-dir", d.parent)
        assert r.exit_code == 1 and "Traceback" not in r.output
        if name == "manifest.json":
            assert "format version 7 is not supported" in r.stderr
        else:
            assert name in r.stderr and "damaged index file" in r.stderr
            assert "patchsearch rebuild --category widget" in r.stderr
    # a corrupted patch store: rebuild says so, and the index stays as it was
    d = _copy_index(idx / "widget", base / "store" / "widget")
    store = _files(d) / "patches-00000.arrow"
    store.write_bytes(store.read_bytes()[:1000])
    before = sorted(p.name for p in d.iterdir() if p.name != "leases")  # readers' leases come and go
    r = cli("rebuild", "--category", "widget", "--index-dir", d.parent)
    assert r.exit_code == 1 and "patches-00000.arrow" in r.stderr and "corrupted" in r.stderr
    assert sorted(p.name for p in d.iterdir() if p.name != "leases") == before


def test_verify(built, tmp_path):
    _, idx = built
    r = cli("verify", "--category", "widget", "--index-dir", idx)
    assert r.exit_code == 0 and "intact" in r.stdout
    d = _copy_index(idx / "widget", tmp_path / "widget")
    bank = _files(d) / "memory_bank.arrow"
    data = bytearray(bank.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    bank.write_bytes(bytes(data))
    PatchIndex.load(d)  # the fast size check on load cannot see it ...
    r = cli("verify", "--category", "widget", "--index-dir", tmp_path)
    assert r.exit_code == 1  # ... verify does
    assert "memory_bank.arrow: checksum mismatch" in r.stderr and "patchsearch rebuild" in r.stderr


def _search_answer(path: Path) -> tuple:
    index = PatchIndex.load(path)
    q = np.random.default_rng(0).standard_normal((2, 16, index.dim)).astype(np.float32) + index.bank.mean(0)
    res = index.search(q)
    return index.size, res.locations.tolist(), res.image_scores.tolist()


KILLABLE = r"""
import sys, time
from pathlib import Path
import patchsearch.index, patchsearch.pipeline, patchsearch.store
from patchsearch.cli import main

marker, stage = Path(sys.argv[1]), sys.argv[2]


def stall(*args, **kwargs):  # tell the test where we are, then wait for SIGKILL
    marker.write_text(stage)
    while True:
        time.sleep(1)


def then_stall(fn):
    def wrapped(*args, **kwargs):
        fn(*args, **kwargs)
        stall()
    return wrapped


if stage == "extract":
    patchsearch.store.PatchStoreWriter.write = then_stall(patchsearch.store.PatchStoreWriter.write)
elif stage == "coreset":
    patchsearch.pipeline.kcenter_greedy = stall
elif stage == "index-write":
    patchsearch.index.write_bank = then_stall(patchsearch.index.write_bank)
main(sys.argv[3:])
"""


@pytest.mark.parametrize("stage", ["extract", "coreset", "index-write"])
def test_sigkill_during_build_keeps_previous_index(built, tmp_path, stage):
    root, idx = built
    work = _copy_index(idx / "widget", tmp_path / "idx" / "widget").parent
    before = _search_answer(work / "widget")
    marker = tmp_path / "reached"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), stage, "build", "--category", "widget",
                             "--data-root", str(root), "--index-dir", str(work), "--coreset-ratio", "0.5", *SMALL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "build never reached the kill point"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    debris = sorted(p.name for p in (work / "widget").glob(".tmp-*"))
    assert len(debris) == 2 and debris[1] == debris[0] + ".lock"  # killed mid-write
    assert _search_answer(work / "widget") == before  # the old version, untouched
    # the next build removes the dead writer's temporary directory and the old version
    r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", work, "--coreset-ratio", "0.5",
            *SMALL)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (work / "widget").iterdir() if p.name != "leases") == ["CURRENT", "LOCK", "v000002"]
    assert _search_answer(work / "widget")[0] == int(3 * 64 * 0.5)  # 3 of 6 frames held aside


def test_deterministic_builds(built, tmp_path):
    root, idx = built
    other = tmp_path / "again"
    r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", other, "--coreset-ratio", "0.25",
            *SMALL)
    assert r.exit_code == 0, r.output
    for name in ("memory_bank.arrow", "shard_000.faiss", "patches-00000.arrow", "images-00000.arrow"):
        assert (_files(other / "widget") / name).read_bytes() == (_files(idx / "widget") / name).read_bytes(), name
    a = patchsearch.query(PatchIndex.load(idx / "widget"), [root / "widget/test/blob/000.png"])
    b = patchsearch.query(PatchIndex.load(other / "widget"), [root / "widget/test/blob/000.png"])
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)


READER = r"""
import sys, time
from pathlib import Path
import numpy as np
from patchsearch import PatchIndex
path, me, done = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
seen = []
while True:
    finished = done.exists()
    index = PatchIndex.load(path)
    assert index.size == index.manifest.memory_bank["size"] == sum(s.ntotal for s in index.shards)
    res = index.search(index.bank[:20][None] + np.float32(0.01))
    assert (res.locations[0, :, 0] == np.arange(20)).all(), "answers from a mixed index"
    assert np.isfinite(res.image_scores).all()
    if not seen or seen[-1] != index.version:
        seen.append(index.version)
        (path.parent / f"{me}.seen").write_text(" ".join(seen))  # the writer waits for this
    index.close()
    if finished:
        break
"""

WRITER = r"""
import sys, time
from pathlib import Path
from patchsearch.pipeline import rebuild
from patchsearch.versions import current_version
path, readers, done = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])

def all_saw(version):
    files = [path.parent / f"r{i}.seen" for i in range(readers)]
    return all(f.exists() and version in f.read_text().split() for f in files)

for i in range(6):
    while not all_saw(current_version(path)):  # every reader has loaded the current version
        time.sleep(0.02)
    rebuild(path, coreset_ratio=(0.2, 0.6)[i % 2])
while not all_saw(current_version(path)):
    time.sleep(0.02)
done.write_text("done")
"""


def test_queries_during_rebuild_never_fail(built, tmp_path):
    _, idx = built
    work = _copy_index(idx / "widget", tmp_path / "idx" / "widget").parent
    done = tmp_path / "done"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(work / "widget"), f"r{i}", str(done)],
                                stderr=subprocess.PIPE) for i in range(3)]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(work / "widget"), "3", str(done)],
                              stderr=subprocess.PIPE)
    try:
        assert writer.wait(timeout=300) == 0, writer.stderr.read().decode()
        for r in readers:
            assert r.wait(timeout=60) == 0, r.stderr.read().decode()
    finally:
        for p in [writer, *readers]:
            p.kill()
    for i in range(3):  # every reader loaded each of the 7 versions while rebuilds ran
        assert (work / f"r{i}.seen").read_text().split() == [f"v{n:06d}" for n in range(1, 8)]
    from patchsearch.versions import tidy

    tidy(work / "widget")  # the readers have exited: what they held goes with the next writer
    assert sorted(p.name for p in (work / "widget").iterdir() if p.name != "leases") == ["CURRENT", "LOCK", "v000007"]


def test_query_streams_in_bounded_batches(built, monkeypatch):
    """iter_query decodes one batch ahead at most and keeps no reference to earlier batches."""
    import gc
    import weakref

    import patchsearch.frames

    root, idx = built
    index = PatchIndex.load(idx / "widget")
    decoded = []
    real = patchsearch.frames.prepare_frame
    monkeypatch.setattr(patchsearch.frames, "prepare_frame", lambda p, *a, **k: decoded.append(p) or real(p, *a, **k))
    stream = patchsearch.iter_query(index, [root / "widget/test/blob/000.png"] * 600, batch_size=20)
    first = next(stream)
    assert len(first.image_scores) == 20 and len(decoded) == 20  # nothing decoded beyond the first batch
    ref = weakref.ref(first.distances)
    del first
    for n, part in enumerate(stream, start=2):
        if n == 3:
            gc.collect()
            assert ref() is None  # the first batch's results were freed while streaming
    assert n == 30 and len(decoded) == 600
