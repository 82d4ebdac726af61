"""Inspection on the whole frame: non-square frames, defects outside the centre square,
tiling, and fail-closed decisions."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import patchsearch
from patchsearch import PatchIndex
from patchsearch.cli import main
from patchsearch.query import geometry_of

H, W = 64, 192  # a 3:1 line-scan frame


def _frame(rng, defect_at=None):
    base = rng.normal(128, 10, (H // 8, W // 8, 3))
    img = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 3, (H, W, 3))
    if defect_at is not None:
        y, x = defect_at
        img[y:y + 14, x:x + 14] = [250, 20, 20]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def line_scan(tmp_path_factory):
    """train/good: 10 frames; test: good, a defect at the right edge (outside the centre
    square) and one in the top-left corner."""
    root = tmp_path_factory.mktemp("data") / "mvtec"
    rng = np.random.default_rng(0)
    train = root / "scan/train/good"
    train.mkdir(parents=True)
    for i in range(10):
        _frame(rng).save(train / f"{i:03d}.png")
    test = tmp_path_factory.mktemp("test")
    _frame(rng).save(test / "good.png")
    _frame(rng, (25, 170)).save(test / "edge.png")
    _frame(rng, (2, 2)).save(test / "corner.png")
    return root, test


def _build_and_query(root, test, idx, *options):
    r = CliRunner().invoke(main, ["build", "--category", "scan", "--data-root", str(root), "--index-dir", str(idx),
                                  "--coreset-ratio", "0.5", *options])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["query", str(test / "good.png"), str(test / "edge.png"), str(test / "corner.png"),
                                  "--category", "scan", "--index-dir", str(idx)])
    assert r.exit_code == 0, r.output
    return {rec["path"].rsplit("/", 1)[-1]: rec for rec in map(json.loads, r.stdout.splitlines())}


def _inside(region, x, y):
    x0, y0, x1, y1 = region["bbox"]
    return x0 <= x < x1 and y0 <= y < y1


def test_whole_frame_sees_a_defect_outside_the_centre_square(line_scan, tmp_path):
    root, test = line_scan
    frame = _build_and_query(root, test, tmp_path / "frame", "--resize", "64")
    manifest = PatchIndex.load(tmp_path / "frame/scan").manifest
    assert manifest.geometry["mode"] == "frame" and manifest.geometry["input_size"] == [64, 192]
    assert manifest.grid == [8, 24]  # a non-square patch grid
    edge = frame["edge.png"]
    assert edge["decision"] == "NG" and frame["good.png"]["decision"] == "OK"
    assert _inside(edge["regions"][0], 177, 32)  # the region is where the defect is, in frame pixels
    assert edge["top_patch"]["col"] >= 20  # the top patch is at the right edge of the 24-column grid
    # the paper's centre crop never sees it: its score is a good frame's
    crop = _build_and_query(root, test, tmp_path / "crop", "--resize", "64", "--crop", "64")
    assert crop["edge.png"]["decision"] == "OK"
    assert crop["edge.png"]["normalized_score"] < 1 < edge["normalized_score"]


def test_tiles_find_a_defect_in_the_corner_tile(line_scan, tmp_path):
    root, test = line_scan
    tiled = _build_and_query(root, test, tmp_path / "tiled", "--resize", "64", "--tile", "64", "--tile-overlap", "16")
    index = PatchIndex.load(tmp_path / "tiled/scan")
    boxes = geometry_of(index).tile_boxes()
    assert len(boxes) == 4 and boxes[0] == (0, 0, 64, 64) and boxes[-1] == (0, 128, 64, 192)
    corner = tiled["corner.png"]
    assert corner["decision"] == "NG" and tiled["good.png"]["decision"] == "OK"
    assert corner["top_patch"]["tile"] == 0  # found by the top-left tile
    assert _inside(corner["regions"][0], 8, 8)
    # the store holds every training tile's patches: 5 of 10 frames x 4 tiles x 8 x 8 (5 held aside)
    assert index.manifest.store["num_patches"] == 5 * 4 * 64
    res = patchsearch.query(index, [test / "corner.png"])
    assert res.anomaly_maps[0].shape == (H, W) and res.tiles == 4


def test_unreadable_frames_are_errors_never_ok(line_scan, tmp_path):
    root, test = line_scan
    _build_and_query(root, test, tmp_path / "idx", "--resize", "64")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    index = PatchIndex.load(tmp_path / "idx/scan")
    res = patchsearch.query(index, [tmp_path / "broken.png", test / "good.png"])
    assert res.decisions.tolist() == ["ERROR", "OK"]
    assert np.isnan(res.image_scores[0]) and res.regions[0] == []
    res.image_scores[1] = np.nan  # a score that is not a number is never good
    assert res.decisions.tolist() == ["ERROR", "ERROR"]
    r = CliRunner().invoke(main, ["query", str(tmp_path / "broken.png"), str(test / "good.png"), "--category", "scan",
                                  "--index-dir", str(tmp_path / "idx")])
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.exit_code == 1 and recs[0]["decision"] == "ERROR" and "broken.png" in recs[0]["error"]
    assert recs[1]["decision"] == "OK"
    # a threshold given on the command line overrides the calibrated one
    r = CliRunner().invoke(main, ["query", str(test / "good.png"), "--category", "scan", "--index-dir",
                                  str(tmp_path / "idx"), "--threshold", "0.001"])
    assert json.loads(r.stdout)["decision"] == "NG" and json.loads(r.stdout)["threshold"] == 0.001


def test_calibrate_refits_from_new_good_frames(line_scan, tmp_path):
    root, test = line_scan
    _build_and_query(root, test, tmp_path / "idx", "--resize", "64")
    before = PatchIndex.load(tmp_path / "idx/scan")
    r = CliRunner().invoke(main, ["calibrate", "--category", "scan", "--index-dir", str(tmp_path / "idx"),
                                  "--good", str(test / "good.png"), "--good", str(test / "corner.png"),
                                  "--margin", "0"])
    assert r.exit_code == 0, r.output
    after = PatchIndex.load(tmp_path / "idx/scan")
    assert after.version == "v000002" and before.version == "v000001"
    corner_score = patchsearch.query(after, [test / "corner.png"], maps=False).image_scores[0]
    # margin 0, target_fpr 0: the threshold is the largest of the two good scores (here the corner's)
    assert after.manifest.calibration["image"]["threshold"] == pytest.approx(float(corner_score), rel=1e-6)
    np.testing.assert_array_equal(after.bank, before.bank)  # only the thresholds changed
    r = CliRunner().invoke(main, ["calibrate", "--category", "scan", "--index-dir", str(tmp_path / "idx"),
                                  "--good", str(test / "good.png"), "--defect", str(test / "edge.png"),
                                  "--good", str(root / "scan/train/good/000.png"), "--pick", "f1"])
    assert r.exit_code == 0, r.output
    cal = json.loads(r.stdout)["calibration"]
    assert cal["f1_optimal"]["f1"] == 1.0 and cal["image"]["threshold"] == cal["f1_optimal"]["threshold"]
