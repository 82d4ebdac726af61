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

from patchsearch import PatchIndex
from patchsearch.cli import main
from patchsearch.errors import IndexFormatError

SMALL = ["--resize", "64", "--crop", "64", "--batch-size", "4"]
EXE = [sys.executable, "-m", "patchsearch.cli"]


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
         "built with backbone efficientnet_lite0, not resnet18"),
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


def test_damaged_files_are_named_with_rebuild_hint(built, tmp_path):
    _, idx = built
    base = tmp_path / "indexes"
    cases = {
        "shard_000.faiss": lambda b: b[:-50],
        "memory_bank.arrow": lambda b: b[: len(b) // 2],
        "manifest.json": lambda b: b.replace(b'"format_version": 1', b'"format_version": 7'),
    }
    for name, damage in cases.items():
        d = _copy_index(idx / "widget", base / name / "widget")
        (d / name).write_bytes(damage((d / name).read_bytes()))
        r = cli("query", built[0] / "widget/test/good/000.png", "--category", "widget", "--index-dir", d.parent)
        assert r.exit_code == 1 and "Traceback" not in r.output
        if name == "manifest.json":
            assert "format version 7 is not supported" in r.stderr
        else:
            assert name in r.stderr and "damaged index file" in r.stderr
            assert "patchsearch rebuild --category widget" in r.stderr
    # a corrupted patch store: rebuild says so, and the index stays as it was
    d = _copy_index(idx / "widget", base / "store" / "widget")
    store = d / "patches.arrow"
    store.write_bytes(store.read_bytes()[:1000])
    before = sorted(p.name for p in d.iterdir())
    r = cli("rebuild", "--category", "widget", "--index-dir", d.parent)
    assert r.exit_code == 1 and "patches.arrow" in r.stderr and "corrupted" in r.stderr
    assert sorted(p.name for p in d.iterdir()) == before


def test_verify(built, tmp_path):
    _, idx = built
    r = cli("verify", "--category", "widget", "--index-dir", idx)
    assert r.exit_code == 0 and "intact" in r.stdout
    d = _copy_index(idx / "widget", tmp_path / "widget")
    bank = d / "memory_bank.arrow"
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


@pytest.mark.parametrize("stage", ["extract", "coreset", "index-write"])
def test_sigkill_during_build_keeps_previous_index(built, tmp_path, stage):
    root, idx = built
    work = _copy_index(idx / "widget", tmp_path / "idx" / "widget").parent
    before = _search_answer(work / "widget")
    marker = tmp_path / "reached"
    env = {**os.environ, "PATCHSEARCH_FAILPOINT": stage, "PATCHSEARCH_FAILPOINT_FILE": str(marker)}
    proc = subprocess.Popen([*EXE, "build", "--category", "widget", "--data-root", str(root), "--index-dir",
                             str(work), "--coreset-ratio", "0.5", *SMALL], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "build never reached the failpoint"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    debris = [p.name for p in work.iterdir() if p.name != "widget"]
    assert debris and all(n.startswith(".widget.tmp-") for n in debris)  # killed mid-write
    assert _search_answer(work / "widget") == before  # the old index, untouched
    # the next build cleans the dead writer's temporary directory
    r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", work, "--coreset-ratio", "0.5",
            *SMALL)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in work.iterdir()) == ["widget"]
    assert _search_answer(work / "widget")[0] == int(6 * 64 * 0.5)


def test_deterministic_builds(built, tmp_path):
    root, idx = built
    other = tmp_path / "again"
    r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", other, "--coreset-ratio", "0.25",
            *SMALL)
    assert r.exit_code == 0, r.output
    for name in ("memory_bank.arrow", "shard_000.faiss", "patches.arrow"):
        assert (other / "widget" / name).read_bytes() == (idx / "widget" / name).read_bytes(), name
    a = PatchIndex.load(idx / "widget").query([root / "widget/test/blob/000.png"])
    b = PatchIndex.load(other / "widget").query([root / "widget/test/blob/000.png"])
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)


READER = r"""
import sys, json, numpy as np
from patchsearch import PatchIndex
path, n = sys.argv[1], int(sys.argv[2])
sizes = set()
for i in range(n):
    index = PatchIndex.load(path)
    assert index.size == index.meta["memory_bank"]["size"] == index.shards[0].ntotal
    q = index.bank[:20][None] + np.float32(0.01)
    res = index.search(q)
    assert (res.locations[0, :, 0] == np.arange(20)).all(), "answers from a mixed index"
    assert np.isfinite(res.image_scores).all()
    sizes.add(index.size)
print(json.dumps(sorted(sizes)))
"""


def test_queries_during_rebuild_never_fail(built, tmp_path):
    _, idx = built
    work = _copy_index(idx / "widget", tmp_path / "idx" / "widget").parent
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom patchsearch.pipeline import rebuild\n"
         "for i in range(8): rebuild(sys.argv[1], coreset_ratio=(0.2, 0.6)[i % 2])", str(work / "widget")],
        stderr=subprocess.PIPE)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(work / "widget"), "40"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [r.communicate(timeout=300) for r in readers]
    assert writer.wait(timeout=300) == 0, writer.stderr.read().decode()
    seen = set()
    for r, (out, err) in zip(readers, outs):
        assert r.returncode == 0, err.decode()
        seen.update(json.loads(out))
    assert len(seen) >= 2  # the readers did see the index change under them
    assert sorted(p.name for p in work.iterdir()) == ["widget"]


def test_query_memory_stays_flat(built, tmp_path):
    """RSS after 100 and after 600 streamed images differ by a small constant."""
    root, idx = built
    index = PatchIndex.load(idx / "widget")
    paths = [root / "widget/test/blob/000.png"] * 600

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    rss = {}
    done = 0
    for part in index.iter_query(paths, batch_size=20):
        done += len(part.image_scores)
        if done in (100, 600):
            rss[done] = rss_mb()
    assert rss[600] - rss[100] < 25, rss
