"""patchsearch add / remove / info: incremental updates of a built index (patchsearch/update.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import patchsearch
from patchsearch import PatchIndex, kcenter_greedy
from patchsearch.bank import exact_support_sets
from patchsearch.cli import main
from patchsearch.coreset import random_projection
from patchsearch.searchers import KnnSearcher
from patchsearch.store import PatchStore
from patchsearch.update import REL_TOL, add_images, history, remove_images

SMALL = ["--resize", "64", "--crop", "64", "--batch-size", "4"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _texture(rng, size=64, shift=(0, 0, 0)):
    base = rng.normal(128, 10, (size // 8, size // 8, 3)) + np.asarray(shift, float)
    img = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A generated category (8 train frames: 4 in the store, 4 held aside), its index, and
    frames from the line: 4 good ones like the training frames and 2 of a 'new supplier'."""
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("data") / "mvtec", n_train=8)
    rng = np.random.default_rng(7)
    line = root / "widget/line"
    line.mkdir()
    for i in range(4):
        _texture(rng).save(line / f"good_{i}.png")
    for i in range(2):
        _texture(rng, shift=(60, -40, 30)).save(line / f"supplier_{i}.png")
    idx = tmp_path_factory.mktemp("idx")
    r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", idx, "--coreset-ratio", "0.25", *SMALL)
    assert r.exit_code == 0, r.output
    from patchsearch.features import PatchEmbedder

    return root, idx, PatchEmbedder()


def _copy(idx: Path, dst: Path) -> Path:
    shutil.copytree(idx / "widget", dst / "widget")
    return dst / "widget"


def _version_dir(path: Path) -> Path:
    return path / (path / "CURRENT").read_text().strip()


def _projected(index):
    cs = index.manifest.coreset
    store = PatchStore(index.directory, partitions=index.manifest.store["partitions"])
    proj = lambda x: random_projection(x, cs["projection_dim"], cs["seed"]).astype(np.float64)  # noqa: E731
    return proj(store.embeddings()), proj(np.asarray(index.bank)), store


def _nearest(points, bank):
    """float64 exact L2 distance of each point to its nearest bank row."""
    d2 = (points ** 2).sum(1)[:, None] - 2 * points @ bank.T + (bank ** 2).sum(1)[None]
    return np.sqrt(np.maximum(d2, 0).min(1))


def test_kcenter_greedy_returns_its_covering_radius():
    rng = np.random.default_rng(0)
    for d in (160, 24):  # projected to 128-d, and unprojected
        x = rng.standard_normal((3000, d)).astype(np.float32)
        sel, radius = kcenter_greedy(x, 0.05, seed=1, return_radius=True)
        assert np.array_equal(sel, kcenter_greedy(x, 0.05, seed=1))  # same selection
        p = random_projection(x, 128, 1).astype(np.float64)
        assert radius == pytest.approx(_nearest(p, p[sel]).max(), rel=1e-5)


def test_build_records_radius_and_add_covers_every_store_patch(built, tmp_path):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    old = PatchIndex.load(path)
    cs = old.manifest.coreset
    assert cs["radius_space"] == "projected-128"
    pts, bank, store = _projected(old)
    assert cs["radius"] == pytest.approx(_nearest(pts, bank).max(), rel=1e-5)  # recorded at build
    old_files = {n: os.stat(old.directory / n).st_ino for n in old.manifest.store["files"]}
    frames = sorted((root / "widget/line").glob("good_*.png"))[:3]
    new = add_images(path, frames, data_root=root / "widget", embedder=emb)
    assert new.version == "v000002"
    # the store: the old partition hard-linked (never rewritten), one new partition
    assert new.manifest.store["partitions"] == [0, 1]
    for name, ino in old_files.items():
        assert os.stat(new.directory / name).st_ino == ino
    pts, bank, store = _projected(new)
    assert store.num_images == 4 + 3 and store.images()["path"].to_pylist()[4:] == \
        [f"line/good_{i}.png" for i in range(3)]
    # exhaustive: every store patch is within the covering radius of the bank (coreset space)
    r = new.manifest.coreset["radius"]
    assert r == cs["radius"]
    assert _nearest(pts, bank).max() <= r * (1 + REL_TOL)
    # old rows unchanged and first; each new row came from the new frames and was, when it joined,
    # the farthest new patch from the bank, beyond the radius (greedy k-center, continued)
    m0 = old.size
    np.testing.assert_array_equal(new.bank[:m0], old.bank)
    np.testing.assert_array_equal(new.memory_bank.sources["store_row"][:m0], old.memory_bank.sources["store_row"])
    added_rows = new.memory_bank.sources["store_row"][m0:]
    assert len(added_rows) > 0 and added_rows.min() >= old.manifest.store["num_patches"]
    fresh = pts[old.manifest.store["num_patches"]:]
    for j, row in enumerate(added_rows):
        d = _nearest(fresh, bank[:m0 + j])
        chosen = _nearest(pts[row][None], bank[:m0 + j])[0]
        assert chosen > r * (1 - REL_TOL) and chosen >= d.max() * (1 - 1e-5)
    np.testing.assert_array_equal(new.bank[m0:], store.embeddings(added_rows))
    # support sets exactly the new bank's kNN graph; shards hold the whole bank
    np.testing.assert_array_equal(new.support, exact_support_sets(new.bank, KnnSearcher(new.bank)))
    assert sum(s.ntotal for s in new.shards) == new.size == new.manifest.memory_bank["size"]
    rec = history(new.manifest)[-1]
    assert rec["action"] == "add" and rec["frames"] == [f"line/good_{i}.png" for i in range(3)]
    assert rec["bank_rows"] == [m0, new.size] and rec["covering_radius"] == pytest.approx(r)
    assert rec["radius_space"] == "projected-128" and rec["store_patches"] == [4 * 64, 7 * 64]
    rescored = re.match(r"re-fitted on 4 held-aside good frames \((\d+) re-scored;", rec["calibration"])
    assert rescored and 1 <= int(rescored.group(1)) < 4, rec["calibration"]  # only some re-scored, not all
    assert new.manifest.calibration["image"]["threshold"] <= old.manifest.calibration["image"]["threshold"]
    # ... and the thresholds are those of re-scoring every held-aside frame with the new bank
    from patchsearch.calibrate import fit_calibration

    new.embedder = emb
    held = [root / "widget" / p for p in old.manifest.calibration["images"]]
    full = fit_calibration(new, held, root / "widget", "all frames")
    for kind in ("image", "pixel"):
        assert new.manifest.calibration[kind]["threshold"] == pytest.approx(full[kind]["threshold"], rel=1e-6)
    old.close()
    new.close()


def test_add_same_frames_twice_changes_nothing(built, tmp_path):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    frames = sorted((root / "widget/line").glob("good_*.png"))[:2]
    twin = tmp_path / "twin.png"
    shutil.copyfile(frames[0], twin)  # the same frame under another name, in the same call
    first = add_images(path, [*frames, twin], data_root=root / "widget", embedder=emb)
    assert first.manifest.store["num_images"] == 4 + 2
    assert history(first.manifest)[-1]["skipped_duplicates"] == [twin.as_posix()]
    files = {p.name: p.read_bytes() for p in _version_dir(path).iterdir()}
    again = add_images(path, frames, data_root=root / "widget", embedder=emb)
    assert again.version == first.version == (path / "CURRENT").read_text().strip()  # no new version
    assert {p.name: p.read_bytes() for p in _version_dir(path).iterdir()} == files
    np.testing.assert_array_equal(again.bank, first.bank)
    assert len(history(again.manifest)) == 1
    first.close()
    again.close()


def _answers(index, frames):
    res = patchsearch.query(index, frames)
    return res.image_scores, np.stack(res.anomaly_maps), res.locations, res.decisions


def test_add_then_remove_restores_the_original(built, tmp_path):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    tests = sorted((root / "widget/test").rglob("*.png"))
    orig = PatchIndex.load(path)
    orig.embedder = emb
    before = _answers(orig, tests)
    frames = sorted((root / "widget/line").glob("*.png"))  # good and new-supplier frames
    added = add_images(path, frames, data_root=root / "widget", embedder=emb)
    assert added.size > orig.size
    r = cli("remove", "--category", "widget", "--index-dir", path.parent, "--data-root", root,
            *[a for f in frames for a in ("--image", f"line/{f.name}")])
    assert r.exit_code == 0, r.output
    back = PatchIndex.load(path)
    back.embedder = emb
    np.testing.assert_array_equal(back.bank, orig.bank)
    for k, v in orig.memory_bank.sources.items():
        np.testing.assert_array_equal(back.memory_bank.sources[k], v)
    np.testing.assert_array_equal(back.support, orig.support)
    assert back.manifest.calibration["image"] == orig.manifest.calibration["image"]
    assert back.manifest.calibration["pixel"] == orig.manifest.calibration["pixel"]
    assert back.manifest.store["partitions"] == [0]
    for name in ("images-00000.arrow", "patches-00000.arrow", "shard_000.faiss", "memory_bank.arrow"):
        assert (back.directory / name).read_bytes() == (orig.directory / name).read_bytes(), name
    after = _answers(back, tests)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rec = history(back.manifest)
    assert [h["action"] for h in rec] == ["add", "remove"] and rec[1]["bank_rows"] == [added.size, orig.size]
    assert rec[1]["bank_rows_reselected"] == 0
    for i in (orig, added, back):
        i.close()


def test_remove_of_a_build_frame_reselects_and_covers(built, tmp_path):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    old = PatchIndex.load(path)
    first = old.memory_bank.images[int(old.memory_bank.sources["image_id"][0])]  # holds bank rows
    new = remove_images(path, [first], data_root=root / "widget", embedder=emb)
    pts, bank, store = _projected(new)
    assert store.num_images == 3 and first not in store.image_paths()
    assert store.images()["image_id"].to_pylist() == [0, 1, 2]
    assert _nearest(pts, bank).max() <= new.manifest.coreset["radius"] * (1 + REL_TOL)
    rows = new.memory_bank.sources["store_row"]
    np.testing.assert_array_equal(new.bank, store.embeddings(rows))  # sources remapped to the new store
    locs = store.locations(rows)
    for k in ("image_id", "tile", "row", "col"):
        np.testing.assert_array_equal(new.memory_bank.sources[k], locs[k])
    np.testing.assert_array_equal(new.support, exact_support_sets(new.bank, KnnSearcher(new.bank)))
    rec = history(new.manifest)[-1]
    assert rec["action"] == "remove" and rec["bank_rows_removed"] > 0
    # the old version's files were not touched
    assert (old.directory / "patches-00000.arrow").stat().st_size == old.manifest.files["patches-00000.arrow"]["size"]
    old.close()
    new.close()


def test_remove_of_frames_whose_rows_covered_no_other_patch(built, tmp_path):
    """A dense bank: no remaining store patch lies within r of the removed rows, none re-selected."""
    from patchsearch.pipeline import rebuild

    root, idx, emb = built
    path = _copy(idx, tmp_path)
    rebuild(path, coreset_ratio=0.5, data_root=root / "widget").close()
    dense = PatchIndex.load(path)
    frame = root / "widget/test/blob/000.png"
    add_images(path, [frame], data_root=root / "widget", embedder=emb).close()
    back = remove_images(path, ["test/blob/000.png"], data_root=root / "widget", embedder=emb)
    rec = history(back.manifest)[-1]
    assert rec["bank_rows_removed"] > 0 and rec["bank_rows_reselected"] == 0
    np.testing.assert_array_equal(back.bank, dense.bank)
    for i in (dense, back):
        i.close()


def test_false_alarm_loop(built, tmp_path):
    """A good frame of a new supplier scores NG; the operator adds it; it then scores OK."""
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    frame = root / "widget/line/supplier_0.png"
    r = cli("query", frame, "--category", "widget", "--index-dir", path.parent)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["decision"] == "NG"
    r = cli("add", frame, "--category", "widget", "--index-dir", path.parent, "--data-root", root)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["version"] == "v000002"
    r = cli("query", frame, "--category", "widget", "--index-dir", path.parent)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["decision"] == "OK" and out["normalized_score"] < 1.0
    # and the index still finds the defects
    r = cli("query", root / "widget/test/blob", "--category", "widget", "--index-dir", path.parent)
    assert [json.loads(x)["decision"] for x in r.stdout.strip().splitlines()] == ["NG"] * 3
    r = cli("info", "--category", "widget", "--index-dir", path.parent)
    assert r.exit_code == 0 and "history       1 update(s)" in r.stdout and "line/supplier_0.png" in r.stdout


def test_cli_errors_and_odd_frames(built, tmp_path):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    trunc = tmp_path / "trunc.png"
    data = (root / "widget/line/good_0.png").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for bad in (trunc, text):
        r = cli("add", root / "widget/line/good_1.png", bad, "--category", "widget", "--index-dir", path.parent,
                "--data-root", root)
        assert r.exit_code == 1 and bad.name in r.stderr and "Traceback" not in r.output, r.output
        assert (path / "CURRENT").read_text().strip() == "v000001" and not list(path.glob(".tmp-*"))
    r = cli("add", root / "widget/line/good_1.png", "--category", "nothing", "--index-dir", path.parent)
    assert r.exit_code == 1 and "no index at" in r.stderr
    r = cli("remove", "--image", "line/never.png", "--category", "widget", "--index-dir", path.parent,
            "--data-root", root)
    assert r.exit_code == 1 and "line/never.png: not in the patch store" in r.stderr
    # a frame of another size is resized like a query frame
    _texture(np.random.default_rng(3), size=96).resize((120, 72)).save(tmp_path / "wide.png")
    r = cli("add", tmp_path / "wide.png", "--category", "widget", "--index-dir", path.parent, "--data-root", root)
    assert r.exit_code == 0, r.output
    index = PatchIndex.load(path)
    images = PatchStore(index.directory).images().to_pylist()
    assert images[-1]["width"] == 120 and images[-1]["height"] == 72
    assert index.manifest.store["num_patches"] == 5 * 64
    # held-aside frames found neither under the data root nor where recorded: thresholds kept, and said so
    man_path = _version_dir(path) / "manifest.json"
    raw = json.loads(man_path.read_text())
    raw["calibration"]["images_root"] = (tmp_path / "moved").as_posix()
    man_path.write_text(json.dumps(raw))
    index.close()
    index = PatchIndex.load(path)
    r = cli("add", root / "widget/line/good_2.png", "--category", "widget", "--index-dir", path.parent,
            "--data-root", tmp_path / "elsewhere")
    assert r.exit_code == 0 and "thresholds kept" in r.stderr
    again = PatchIndex.load(path)
    assert again.manifest.calibration == index.manifest.calibration
    assert history(again.manifest)[-1]["calibration"].startswith("thresholds kept: 4 of the 4 held-aside")
    index.close()
    again.close()


def test_ivf_and_sharded_indexes(built, tmp_path):
    root, idx, emb = built
    frames = sorted((root / "widget/line").glob("*.png"))
    for kind in (["--index", "ivfpq", "--nlist", "2"], ["--shards", "2"]):
        d = tmp_path / kind[1] / "idx"
        r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", d, "--coreset-ratio", "0.25",
                *kind, *SMALL)
        assert r.exit_code == 0, r.output
        old = PatchIndex.load(d / "widget")
        new = add_images(d / "widget", frames, data_root=root / "widget", embedder=emb)
        assert new.index_type == old.index_type and len(new.shards) == len(old.shards)
        bounds = [(s["start"], s["stop"]) for s in new.manifest.index["shards"]]
        assert bounds[0][0] == 0 and bounds[-1][1] == new.size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert [s.ntotal for s in new.shards] == [b - a for a, b in bounds]
        # every bank row finds itself (IVF: ids are bank rows), exactly as a flat search over the bank
        dist, rows = new.knn(new.bank, 1)
        np.testing.assert_array_equal(rows[:, 0], np.arange(new.size))
        q = new.bank[::3] + np.float32(0.05)
        np.testing.assert_array_equal(new.knn(q, 9)[1], KnnSearcher(new.bank).search(q, 9)[1])
        back = remove_images(d / "widget", [f"line/{f.name}" for f in frames], data_root=root / "widget",
                             embedder=emb)
        np.testing.assert_array_equal(back.bank, old.bank)
        np.testing.assert_array_equal(back.knn(q[: len(q) // 2], 9)[1], old.knn(q[: len(q) // 2], 9)[1])
        for i in (old, new, back):
            i.close()


def test_add_computes_the_radius_of_an_older_index(built, tmp_path):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    man_path = _version_dir(path) / "manifest.json"
    raw = json.loads(man_path.read_text())
    recorded = raw["coreset"].pop("radius")
    raw["coreset"].pop("radius_space")
    man_path.write_text(json.dumps(raw))
    messages = []
    new = add_images(path, [root / "widget/line/good_3.png"], data_root=root / "widget", embedder=emb,
                     log=messages.append)
    assert any("covering radius not recorded" in m for m in messages)
    assert new.manifest.coreset["radius"] == pytest.approx(recorded, rel=1e-5)
    assert history(new.manifest)[-1]["radius_computed_at_update"] is True
    new.close()


KILLABLE = r"""
import sys, time
from pathlib import Path
import patchsearch.index, patchsearch.store, patchsearch.update
from patchsearch.cli import main

marker, stage = Path(sys.argv[1]), sys.argv[2]


def stall(*args, **kwargs):
    marker.write_text(stage)
    while True:
        time.sleep(1)


def then_stall(fn):
    def wrapped(*args, **kwargs):
        fn(*args, **kwargs)
        stall()
    return wrapped


if stage == "embed":
    patchsearch.store.PatchStoreWriter.write = then_stall(patchsearch.store.PatchStoreWriter.write)
elif stage == "cover":
    patchsearch.update.cover = stall
elif stage == "index-write":
    patchsearch.index.write_bank = then_stall(patchsearch.index.write_bank)
main(sys.argv[3:])
"""


def _search_answer(path: Path) -> tuple:
    index = PatchIndex.load(path)
    q = np.random.default_rng(0).standard_normal((2, 16, index.dim)).astype(np.float32) + index.bank.mean(0)
    res = index.search(q)
    out = (index.version, index.size, res.locations.tolist(), res.image_scores.tolist(),
           index.manifest.calibration["image"]["threshold"])
    index.close()
    return out


@pytest.mark.parametrize("stage", ["embed", "cover", "index-write"])
def test_sigkill_during_add_keeps_previous_version(built, tmp_path, stage):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    before = _search_answer(path)
    marker = tmp_path / "reached"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), stage, "add",
                             str(root / "widget/line/good_0.png"), "--category", "widget", "--index-dir",
                             str(path.parent), "--data-root", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "add never reached the kill point"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(path.glob(".tmp-*"))) == 2  # killed mid-write
    assert _search_answer(path) == before  # the old version answers as before
    new = add_images(path, [root / "widget/line/good_0.png"], data_root=root / "widget", embedder=emb)
    assert new.version == "v000002" and not list(path.glob(".tmp-*"))  # the next writer cleans up
    new.close()


READER = r"""
import sys
from pathlib import Path
import numpy as np
from patchsearch import PatchIndex
path, me, done = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
seen = []
while True:
    finished = done.exists()
    index = PatchIndex.load(path)
    assert index.size == index.manifest.memory_bank["size"] == sum(s.ntotal for s in index.shards)
    assert index.size == len(index.memory_bank.sources["store_row"])
    res = index.search(index.bank[:20][None] + np.float32(0.01))
    assert (res.locations[0, :, 0] == np.arange(20)).all(), "answers from a mixed index"
    assert np.isfinite(res.image_scores).all()
    index.describe_locations(res.locations[0, :, 0])
    if not seen or seen[-1] != index.version:
        seen.append(index.version)
        (path.parent / f"{me}.seen").write_text(" ".join(seen))
    index.close()
    if finished:
        break
"""

WRITER = r"""
import sys, time
from pathlib import Path
from patchsearch.features import PatchEmbedder
from patchsearch.update import add_images
from patchsearch.versions import current_version
path, readers, done, root = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
emb = PatchEmbedder()

def all_saw(version):
    files = [path.parent / f"r{i}.seen" for i in range(readers)]
    return all(f.exists() and version in f.read_text().split() for f in files)

for frame in sorted((root / "widget/line").glob("*.png"))[:3]:
    while not all_saw(current_version(path)):
        time.sleep(0.02)
    add_images(path, [frame], data_root=root / "widget", embedder=emb).close()
while not all_saw(current_version(path)):
    time.sleep(0.02)
done.write_text("done")
"""


def test_queries_during_add_never_fail(built, tmp_path):
    root, idx, emb = built
    path = _copy(idx, tmp_path)
    done = tmp_path / "done"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(path), f"r{i}", str(done)],
                                stderr=subprocess.PIPE) for i in range(3)]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "3", str(done), str(root)],
                              stderr=subprocess.PIPE)
    try:
        assert writer.wait(timeout=300) == 0, writer.stderr.read().decode()
        for r in readers:
            assert r.wait(timeout=60) == 0, r.stderr.read().decode()
    finally:
        for p in [writer, *readers]:
            p.kill()
    for i in range(3):  # every reader loaded each of the 4 versions while the adds ran
        assert (tmp_path / f"r{i}.seen").read_text().split() == [f"v{n:06d}" for n in range(1, 5)]
    final = PatchIndex.load(path)
    assert final.manifest.store["num_images"] == 4 + 3 and len(history(final.manifest)) == 3
    final.close()


def test_an_update_never_drops_another_writers_version(built, tmp_path):
    """A rebuild installed while an add is being prepared: the add refuses to install over it."""
    from patchsearch.pipeline import rebuild
    from patchsearch.versions import VersionConflict

    root, idx, emb = built
    path = _copy(idx, tmp_path)
    fired = []

    def meanwhile(msg):
        if msg.startswith("added") and not fired:
            fired.append(rebuild(path).size)

    with pytest.raises(VersionConflict, match="another writer installed v000002"):
        add_images(path, [root / "widget/line/good_0.png"], data_root=root / "widget", embedder=emb, log=meanwhile)
    assert fired and (path / "CURRENT").read_text().strip() == "v000002"
    assert PatchIndex.load(path).manifest.store["num_images"] == 4  # the rebuild's version, intact
    assert not list(path.glob(".tmp-*"))
