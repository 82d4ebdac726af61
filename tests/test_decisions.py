"""Every frame gets OK, NG or ERROR with a reason: uncalibrated indexes, unreadable, unsupported,
too large and unjudgeable pixel values, through the library and `patchsearch query`."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchsearch import PatchIndex
from patchsearch.cli import main
from patchsearch.query import query
from patchsearch.report import record
from patchsearch.result import SearchResult

SMALL = ["--resize", "64", "--crop", "64", "--batch-size", "4", "--coreset-ratio", "0.25"]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nshowpage\n"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """A generated category with a calibrated and an uncalibrated index."""
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("data") / "mvtec")
    cal, uncal = tmp_path_factory.mktemp("cal"), tmp_path_factory.mktemp("uncal")
    for idx, extra in ((cal, []), (uncal, ["--calibration-fraction", "0"])):
        r = cli("build", "--category", "widget", "--data-root", root, "--index-dir", idx, *SMALL, *extra)
        assert r.exit_code == 0, r.output
    return root, cal, uncal


def _lines(r):
    """{file name: record}, or {folder/file name: record} where names repeat."""
    recs = [json.loads(x) for x in r.stdout.strip().splitlines()]
    names = [x["path"].replace("\\", "/").rsplit("/", 1)[-1] for x in recs]
    if len(set(names)) < len(names):
        names = ["/".join(x["path"].replace("\\", "/").rsplit("/", 2)[-2:]) for x in recs]
    return dict(zip(names, recs))


def test_uncalibrated_index_answers_error_uncalibrated(indexes):
    root, _, uncal = indexes
    frames = sorted((root / "widget/test").rglob("*.png"))
    assert PatchIndex.load(uncal / "widget").manifest.calibration in (None, {})
    r = cli("query", *frames, "--category", "widget", "--index-dir", uncal)
    assert r.exit_code == 1 and "has no image threshold" in r.stderr and "patchsearch calibrate" in r.stderr
    lines = _lines(r)
    assert len(lines) == len(frames)
    for rec in lines.values():
        assert rec["decision"] == "ERROR" and rec["reason"] == "uncalibrated" and np.isfinite(rec["image_score"])
    res = query(PatchIndex.load(uncal / "widget"), frames[:2], maps=False)
    assert res.decisions.tolist() == ["ERROR", "ERROR"] and res.reason(0) == "uncalibrated"
    # an explicit threshold judges again
    r = cli("query", frames[0], "--category", "widget", "--index-dir", uncal, "--threshold", "1e9")
    assert r.exit_code == 0 and json.loads(r.stdout)["decision"] == "OK" and "reason" not in json.loads(r.stdout)


def test_calibrated_decisions_are_ok_or_ng_without_reason(indexes):
    root, cal, _ = indexes
    r = cli("query", root / "widget/test", "--category", "widget", "--index-dir", cal)
    lines = _lines(r)
    assert {x["decision"] for x in lines.values()} <= {"OK", "NG"} and all("reason" not in x for x in lines.values())


def _bad_frames(tmp_path):
    rng = np.random.default_rng(1)
    f = rng.uniform(0.2, 0.8, (64, 64)).astype(np.float32)
    out = {}
    for name, value in (("nan", np.nan), ("posinf", np.inf), ("neginf", -np.inf), ("negative", -0.1),
                        ("above1", 1.5)):
        a = f.copy()
        a[10, 20] = value
        Image.fromarray(a, mode="F").save(tmp_path / f"float_{name}.tif")
        out[f"float_{name}.tif"] = "non_finite_pixels" if not np.isfinite(value) else "out_of_range_pixels"
    i32 = (f * 60000).astype(np.int32)
    i32[5, 5] = -3
    Image.fromarray(i32, mode="I").save(tmp_path / "int32_negative.tif")
    out["int32_negative.tif"] = "out_of_range_pixels"
    Image.fromarray(f, mode="F").save(tmp_path / "float_ok.tif")
    (tmp_path / "frame.eps").write_bytes(EPS)
    out["frame.eps"] = "unsupported_format"
    Image.fromarray((f * 255).astype(np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "big.png").read_bytes()[:200])
    out["trunc.png"] = "unreadable"
    return out


def test_unjudgeable_frames_are_error_with_reason(indexes, tmp_path):
    root, cal, _ = indexes
    expect = _bad_frames(tmp_path)
    names = sorted(expect) + ["float_ok.tif"]
    r = cli("query", *[tmp_path / n for n in names], "--category", "widget", "--index-dir", cal, "--batch-size", "3")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = _lines(r)
    for name, reason in expect.items():
        assert lines[name]["decision"] == "ERROR" and lines[name]["reason"] == reason, lines[name]
        assert name in lines[name]["error"]
    assert lines["float_ok.tif"]["decision"] in ("OK", "NG") and "reason" not in lines["float_ok.tif"]
    res = query(PatchIndex.load(cal / "widget"), [tmp_path / n for n in names], maps=False)
    assert {n: res.reason(i) for i, n in enumerate(names) if n in expect} == expect


def test_frames_over_the_budget_are_refused_naming_the_limit(indexes, tmp_path):
    root, cal, _ = indexes
    Image.new("RGB", (300, 200), (120, 120, 120)).save(tmp_path / "wide.png")
    good = root / "widget/test/good/000.png"
    r = cli("query", tmp_path / "wide.png", good, "--category", "widget", "--index-dir", cal, "--max-pixels", "59999")
    assert r.exit_code == 1
    lines = _lines(r)
    assert lines["wide.png"]["reason"] == "too_large" and "59999 pixel limit (--max-pixels)" in lines["wide.png"]["error"]
    assert lines["000.png"]["decision"] in ("OK", "NG")
    from patchsearch.query import iter_query

    index = PatchIndex.load(cal / "widget")
    part = next(iter_query(index, [tmp_path / "wide.png"], maps=False, max_pixels=59999))
    assert part.reason(0) == "too_large" and "59999 pixel limit" in part.errors[0]
    assert query(index, [tmp_path / "wide.png"], maps=False).reason(0) is None  # within the default budget


def test_non_finite_score_is_error_in_result_and_record():
    part = SearchResult(np.zeros((2, 1, 1), np.float32), np.zeros((2, 1, 1), np.int64),
                        np.array([np.nan, 1.0], np.float32), np.zeros(2, np.int64), threshold=2.0)
    assert part.decisions.tolist() == ["ERROR", "OK"]
    assert part.reason(0) == "non_finite_score" and part.reason(1) is None
    part.errors, part.reasons = {1: "x.png: cannot decode image"}, {1: "unreadable"}
    assert part.decisions.tolist() == ["ERROR", "ERROR"] and part.reason(1) == "unreadable"
    assert part.frame(1).reason(0) == "unreadable"
    part.threshold = None
    assert part.decisions.tolist() == ["ERROR", "ERROR"] and part.reason(0) == "uncalibrated"


def test_record_never_has_a_null_decision(indexes):
    root, _, uncal = indexes
    index = PatchIndex.load(uncal / "widget")
    res = query(index, [root / "widget/test/good/000.png"], maps=False)
    rec = record(index, res, 0)
    assert rec["decision"] == "ERROR" and rec["reason"] == "uncalibrated" and "not calibrated" in rec["error"]


def test_heatmap_decodes_the_frame_with_the_index_bit_depth(indexes, tmp_path, monkeypatch):
    from patchsearch import report
    from patchsearch.data import load_image

    root, cal, _ = indexes
    index = PatchIndex.load(cal / "widget")
    index.manifest.extra["decode"] = {"bit_depth": 12}  # as `build --bit-depth 12` records it
    gray = np.asarray(Image.open(root / "widget/test/good/000.png").convert("L")).astype(np.uint16)
    Image.fromarray(gray * 16).save(tmp_path / "deep12.png")  # a 12-bit camera's frame in a 16-bit PNG
    res = query(index, [tmp_path / "deep12.png"])
    drawn = []
    monkeypatch.setattr(report, "heatmap", lambda index, part, i, frame: drawn.append(frame) or np.zeros((4, 4, 3),
                                                                                                         np.uint8))
    report.write_maps(index, res, 0, tmp_path / "map.png")
    assert np.array_equal(drawn[0], np.asarray(load_image(tmp_path / "deep12.png", 12)))
    assert abs(int(drawn[0].mean()) - int(gray.mean())) <= 1  # the frame as judged, not 16 times darker
