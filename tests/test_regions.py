import numpy as np
import pytest

from patchsearch.errors import InputError
from patchsearch.regions import defect_regions


def hand_map():
    amap = np.full((10, 12), 0.2)
    amap[1:3, 1:4] = [[1.5, 2.0, 1.0], [1.2, 1.8, 5.0]]   # blob A, 6 px, peak 5 at (x 3, y 2)
    amap[7, 9], amap[8, 10] = 3.0, 2.5                     # B: touching by a corner only
    amap[5:7, 0:2] = 2.0                                   # C: 2 x 2, flat
    return amap


def test_regions_exact_values():
    regions = defect_regions(hand_map(), threshold=1.0)
    assert regions == [
        {"bbox": [1, 1, 4, 3], "area": 6, "peak": 5.0, "peak_xy": [3, 2], "mean": pytest.approx(12.5 / 6)},
        {"bbox": [9, 7, 11, 9], "area": 2, "peak": 3.0, "peak_xy": [9, 7], "mean": 2.75},
        {"bbox": [0, 5, 2, 7], "area": 4, "peak": 2.0, "peak_xy": [0, 5], "mean": 2.0},
    ]
    for r in regions:
        assert all(type(v) is int for v in r["bbox"] + r["peak_xy"] + [r["area"]])


def test_regions_threshold_is_inclusive_and_empty_map():
    regions = defect_regions(hand_map(), threshold=2.0)     # 2.0 itself belongs to a region
    assert [r["area"] for r in regions] == [2, 2, 4]        # A keeps (1, 2) = 2.0 and (2, 3) = 5.0
    assert regions[0]["bbox"] == [2, 1, 4, 3]
    assert defect_regions(hand_map(), threshold=5.1) == []
    assert defect_regions(np.zeros((4, 4), np.float32), threshold=0.0)[0]["area"] == 16


def test_regions_min_area():
    assert [r["area"] for r in defect_regions(hand_map(), 1.0, min_area=4)] == [6, 4]   # 4 is kept
    assert [r["area"] for r in defect_regions(hand_map(), 1.0, min_area=5)] == [6]
    assert defect_regions(hand_map(), 1.0, min_area=7) == []


def test_regions_scale_to_frame_pixels():
    # map 10 x 12 on a 48 x 20 frame: sx = 4, sy = 2
    regions = defect_regions(hand_map(), 1.0, scale=(4, 2))
    assert regions[0]["bbox"] == [4, 2, 16, 6] and regions[0]["area"] == 48 and regions[0]["peak_xy"] == [14, 5]
    assert regions[1]["bbox"] == [36, 14, 44, 18] and regions[1]["area"] == 16 and regions[1]["peak_xy"] == [38, 15]
    # min_area counts frame pixels: B (16 frame px) survives 16, not 17
    assert [r["area"] for r in defect_regions(hand_map(), 1.0, min_area=16, scale=(4, 2))] == [48, 16, 32]
    assert [r["area"] for r in defect_regions(hand_map(), 1.0, min_area=17, scale=(4, 2))] == [48, 32]
    odd = defect_regions(hand_map(), 1.0, scale=(1.5, 1.5))
    assert odd[0]["bbox"] == [1, 1, 6, 5] and odd[0]["area"] == 14   # floor/ceil outwards; 6 * 2.25 = 13.5 -> 14
    assert odd[1]["bbox"] == [13, 10, 17, 14] and odd[1]["peak_xy"] == [14, 11]   # 9 * 1.5 = 13.5 -> 13, ...


def test_regions_partition_the_mask_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(5):
        amap = rng.random((40, 50)).astype(np.float32)
        regions = defect_regions(amap, 0.8)
        assert sum(r["area"] for r in regions) == int((amap >= 0.8).sum())
        assert [r["peak"] for r in regions] == sorted((r["peak"] for r in regions), reverse=True)
        for r in regions:
            x0, y0, x1, y1 = r["bbox"]
            box = amap[y0:y1, x0:x1]
            assert r["peak"] == amap[r["peak_xy"][1], r["peak_xy"][0]] and box.max() >= r["peak"] >= 0.8
            assert (box >= 0.8).sum() >= r["area"] and min(box[0].max(), box[-1].max(), box[:, 0].max(),
                                                           box[:, -1].max()) >= 0.8   # tight box


def test_regions_errors():
    amap = hand_map()
    amap[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        defect_regions(amap, 1.0)
    with pytest.raises(InputError, match="2-D"):
        defect_regions(np.zeros((2, 3, 3)), 1.0)
    with pytest.raises(InputError, match="threshold"):
        defect_regions(hand_map(), float("nan"))
    with pytest.raises(InputError, match="scale"):
        defect_regions(hand_map(), 1.0, scale=(0, 1))


def _stub_index(geometry, pixel_t):
    from types import SimpleNamespace

    from patchsearch.format import Manifest

    manifest = SimpleNamespace(geometry=geometry.to_dict(),
                               calibration={"image": {"threshold": 1.0}, "pixel": {"threshold": pixel_t}})
    manifest.thresholds = lambda threshold=None: Manifest.thresholds(manifest, threshold)
    manifest.frame_geometry = lambda: Manifest.frame_geometry(manifest)
    return SimpleNamespace(device="cpu", manifest=manifest)


@pytest.mark.parametrize("kind", ["crop", "frame", "turned"])
def test_query_regions_cover_their_pixels_on_the_frame(kind):
    """Regions found by the query path, in frame pixels: every box holds the frame extent of
    its above-threshold input pixels, rounded outwards, also where the crop offset (crop
    mode) or the scale is fractional."""
    from patchsearch.geometry import choose_geometry, crop_geometry
    from patchsearch.query import add_maps
    from patchsearch.result import SearchResult
    from patchsearch.score import anomaly_maps

    geometry = {"crop": crop_geometry(64, 48), "frame": choose_geometry([(96, 48)], resize=48),
                "turned": choose_geometry([(96, 48)], resize=48, orient="auto")}[kind]
    H, W = geometry.input_size
    gh, gw = H // 8, W // 8
    sizes = [(101, 70), (70, 101), (333, 97), (97, 250)] if kind != "turned" else [(70, 101), (97, 250)]
    checked = 0
    for size in sizes:
        for cell in range(0, gh * gw, 3):
            grid = np.zeros((gh, gw), np.float32)
            grid.flat[cell] = 10.0
            part = SearchResult(grid.reshape(1, -1, 1), np.zeros((1, gh * gw, 1), np.int64), np.ones(1, np.float32),
                                np.zeros(1, np.int64), grid=(gh, gw), pixel_threshold=5.0)
            add_maps(_stub_index(geometry, 5.0), part, [size], sigma=0.0)
            imap = anomaly_maps(grid[None], (H, W), 0.0)[0]
            ys, xs = np.nonzero(imap >= 5.0)
            fx, fy = geometry.input_to_frame_xy([xs.min(), xs.max() + 1], [ys.min(), ys.max() + 1], size)
            (x0, x1), (y0, y1) = sorted(fx), sorted(fy)
            [region] = part.regions[0]
            bx0, by0, bx1, by1 = region["bbox"]
            assert bx0 <= x0 + 1e-6 and by0 <= y0 + 1e-6 and bx1 >= x1 - 1e-6 and by1 >= y1 - 1e-6, (size, cell)
            assert bx0 > x0 - 1 and by0 > y0 - 1 and bx1 < x1 + 1 and by1 < y1 + 1, (size, cell)  # tight
            px, py = region["peak_xy"]
            assert bx0 <= px < bx1 and by0 <= py < by1
            assert region["area"] == pytest.approx(len(xs) * (x1 - x0) * (y1 - y0) / ((xs.max() + 1 - xs.min()) *
                                                                                    (ys.max() + 1 - ys.min())), abs=1)
            checked += 1
    assert checked > 20
