import numpy as np
import pytest
from scipy import ndimage

from patchsearch.errors import InputError
from patchsearch.metrics import aupro, auroc, f1_max, precision_recall_f1, pro_curve
from patchsearch.score import anomaly_maps


def _bilinear_reference(grid, size):
    """Separable linear interpolation between patch centres, edges held (align_corners=False)."""
    (h, w), (H, W) = grid.shape, size
    ys = np.clip((np.arange(H) + 0.5) * h / H - 0.5, 0, h - 1)
    xs = np.clip((np.arange(W) + 0.5) * w / W - 0.5, 0, w - 1)
    rows = np.stack([np.interp(xs, np.arange(w), r) for r in grid])           # (h, W)
    return np.stack([np.interp(ys, np.arange(h), c) for c in rows.T], axis=1)  # (H, W)


def test_anomaly_map_upsample_and_blur():
    grid = np.zeros((2, 4, 4), np.float32)
    grid[1, 1, 2] = 1.0
    maps = anomaly_maps(grid, (32, 32), sigma=4)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert np.allclose(maps[0], 0)
    peak = np.unravel_index(maps[1].argmax(), (32, 32))
    assert abs(peak[0] - 12) <= 1 and abs(peak[1] - 20) <= 1  # patch (1, 2) centre in 8-px cells
    sharp = anomaly_maps(grid, (32, 32), sigma=0)
    assert sharp[1].max() > maps[1].max()  # the blur spreads the peak
    const = anomaly_maps(np.full((1, 3, 3), 2.5, np.float32), (20, 20))
    assert np.allclose(const, 2.5, atol=1e-5)
    # Bilinear, not nearest: pixel (11, 19) lies 1/16 of a patch from the centre of patch (1, 2)
    # along both axes, so it gets 15/16 * 15/16 of its score (nearest would give 1.0) ...
    assert sharp[1, 11, 19] == pytest.approx((15 / 16) ** 2, abs=1e-6)
    # ... and upsampled x2, the pixels a quarter patch either side of the midpoint between two
    # patch centres (scores 1 and 3) get 3/4 : 1/4 of them, 1.5 and 2.5 (nearest: 1 and 3).
    ramp = np.array([[[1.0, 3.0, 2.0, 6.0]] * 4], np.float32)
    up = anomaly_maps(ramp, (4, 8), sigma=0)[0]
    assert np.allclose(up[:, :4], [1.0, 1.5, 2.5, 2.75], atol=1e-6)
    rng = np.random.default_rng(0)
    patches = rng.random((5, 7)).astype(np.float32)
    assert np.allclose(anomaly_maps(patches[None], (40, 56), sigma=0)[0], _bilinear_reference(patches, (40, 56)),
                       atol=1e-6)


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.7, 1), 1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(labels, scores) == pytest.approx(pairwise, abs=1e-12)
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc(np.array([[0, 1], [1, 0]], bool), np.array([[0.0, 1], [1, 0]])) == 1.0


def test_auroc_errors():
    with pytest.raises(InputError, match="both"):
        auroc([1, 1], [0.2, 0.3])
    with pytest.raises(InputError, match="differ"):
        auroc([0, 1], [0.2])


# --- AUPRO -----------------------------------------------------------------------------------

def slow_aupro(masks, maps, fpr_limit=0.3):
    """MVTec AD's AUPRO by its definition: one pass over the images per distinct threshold."""
    regions = []                                            # (image, bool mask of one region)
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    n_normal = sum(int((~m).sum()) for m in masks)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fp = sum(int(((a >= t) & ~m).sum()) for a, m in zip(maps, masks))
        pro = np.mean([((maps[i] >= t) & r).sum() / r.sum() for i, r in regions])
        points.append((fp / n_normal, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x1 > fpr_limit:
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _random_case(rng, shapes, decimals):
    masks, maps = [], []
    for h, w in shapes:
        mask = np.zeros((h, w), bool)
        for _ in range(3):                                  # rectangles of different sizes
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            mask[y:y + rng.integers(1, h // 3), x:x + rng.integers(1, w // 3)] = True
        mask[rng.integers(0, h), rng.integers(0, w)] = True  # a one-pixel region, most likely
        maps.append(np.round(rng.normal(mask * 1.2, 1.0), decimals))  # rounding makes ties
        masks.append(mask)
    return masks, maps


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_definition_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    masks, maps = _random_case(rng, [(24, 31), (17, 20)], decimals=[1, 2, 6][seed % 3])
    for limit in (0.3, 0.05, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(slow_aupro(masks, maps, limit), abs=1e-6)
    same_shape = [m[:17, :20] for m in masks], [a[:17, :20] for a in maps]
    if any(m.any() for m in same_shape[0]):                 # a (N, H, W) array works as a list does
        assert aupro(np.stack(same_shape[0]), np.stack(same_shape[1]).astype(np.float32)) == pytest.approx(
            slow_aupro(*same_shape), abs=1e-6)


def test_aupro_hand_computed():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    mask[7:9, 6:9] = True
    assert aupro(mask, mask.astype(float)) == 1.0                    # perfect map
    assert aupro(mask, 1.0 - mask) == 0.0                            # inverted: every FP comes first
    # Constant map: one threshold, the curve jumps from (0, 0) to (1, 1); the area up to 0.3 is
    # 0.3 * 0.3 / 2, so the normalised AUPRO is 0.15.
    assert aupro([mask, mask], np.ones((2, 10, 10))) == pytest.approx(0.15, abs=1e-12)
    # 8-connectivity: (0, 0), (1, 1), (1, 2) form one region of 3 pixels. With only (0, 0) high,
    # the curve is (0, 0) -> (0, 1/3) -> (1, 1): AUPRO = (1/3 + 1/3 + 0.3 * 2/3) / 2 = 13/30.
    # (4-connectivity would give two regions, PRO 1/2 at the top threshold, and 0.575.)
    diag = np.zeros((6, 6), bool)
    diag[0, 0] = diag[1, 1] = diag[1, 2] = True
    amap = np.zeros((6, 6))
    amap[0, 0] = 1.0
    assert aupro(diag, amap) == pytest.approx(13 / 30, abs=1e-12)
    fpr, pro = pro_curve(diag, amap)
    assert np.allclose(fpr, [0, 0, 1]) and np.allclose(pro, [0, 1 / 3, 1])


def test_aupro_binned_thresholds():
    rng = np.random.default_rng(5)
    masks, maps = _random_case(rng, [(30, 30), (30, 30)], decimals=6)
    levels = [np.floor(np.clip(a, -3, 3) * 3) + 9 for a in maps]   # integers 0..18
    levels[0].flat[0], levels[1].flat[0] = 0, 18           # the full range, so bins == levels
    assert aupro(masks, levels, num_thresholds=19) == pytest.approx(aupro(masks, levels), abs=1e-12)
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(aupro(masks, maps), abs=5e-3)


def test_aupro_errors():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    amap = np.zeros((4, 4))
    with pytest.raises(InputError, match="anomalous region"):
        aupro(np.zeros((4, 4), bool), amap)
    with pytest.raises(InputError, match="normal pixels"):
        aupro(np.ones((4, 4), bool), amap)
    with pytest.raises(InputError, match="shape"):
        aupro([mask], [np.zeros((4, 5))])
    with pytest.raises(InputError, match="2 maps"):
        aupro([mask], [amap, amap])
    with pytest.raises(InputError, match="NaN"):
        aupro(mask, np.where(mask, np.nan, 0.0))
    with pytest.raises(InputError, match="fpr_limit"):
        aupro(mask, amap, fpr_limit=0.0)
    with pytest.raises(InputError, match="num_thresholds"):
        aupro(mask, amap, num_thresholds=1)


# --- precision, recall, F1 ---------------------------------------------------------------

def test_precision_recall_f1_counts():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    scores = [0.9, 0.5, 0.2, 0.5, 0.1, np.nan, 0.3, np.nan]
    r = precision_recall_f1(labels, scores, threshold=0.5)
    # >= 0.5 or NaN is anomalous: tp = {0.9, 0.5, nan}, fp = {0.5, nan}, fn = {0.2}, tn = {0.1, 0.3}
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (3, 2, 1, 2)
    assert r["precision"] == pytest.approx(3 / 5) and r["recall"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    none = precision_recall_f1([0, 0], [0.1, 0.2], threshold=1.0)
    assert none["precision"] == none["recall"] == none["f1"] == 0.0 and none["tn"] == 2
    with pytest.raises(InputError, match="differ"):
        precision_recall_f1([0, 1], [0.2], 0.5)


def test_f1_max_is_the_best_threshold():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels, 1.0), 1)
    best = f1_max(labels, scores)
    brute = [precision_recall_f1(labels, scores, t)["f1"] for t in np.unique(scores)]
    assert best["f1"] == pytest.approx(max(brute), abs=1e-12)
    at = precision_recall_f1(labels, scores, best["threshold"])
    assert (at["f1"], at["precision"], at["recall"]) == pytest.approx((best["f1"], best["precision"], best["recall"]))
    assert best["threshold"] == max(t for t, f in zip(np.unique(scores), brute) if f == pytest.approx(best["f1"]))
    hand = f1_max([0, 1, 1, 0, 1], [0.1, 0.8, 0.4, 0.5, 0.9])
    # threshold 0.8: P=1, R=2/3, F1=0.8; threshold 0.4: P=3/4, R=1, F1=6/7 (best)
    assert hand == pytest.approx({"f1": 6 / 7, "threshold": 0.4, "precision": 0.75, "recall": 1.0})
    # equal F1 (2/3) at thresholds 4 and 1: the higher one, fewer parts rejected
    assert f1_max([1, 0, 0, 1], [4.0, 3.0, 2.0, 1.0])["threshold"] == 4.0
    with pytest.raises(InputError, match="anomalous"):
        f1_max([0, 0], [0.1, 0.2])
    with pytest.raises(InputError, match="finite"):
        f1_max([0, 1], [0.1, np.nan])
