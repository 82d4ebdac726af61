"""Detection and segmentation metrics: AUROC, AUPRO (MVTec AD), precision/recall/F1 and F1-max."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError


def auroc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U; tied scores count one half).

    Args:
        labels: bool or {0, 1} array, any shape (1 = anomalous).
        scores: float array of the same shape (higher = more anomalous).

    Returns:
        AUROC in [0, 1].

    Raises:
        InputError: shapes differ, or only one class is present.
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise InputError(f"labels ({labels.size}) and scores ({scores.size}) differ in size")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError("AUROC needs both normal and anomalous samples")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average 1-based ranks over runs of tied scores.
    starts = np.concatenate([[0], np.nonzero(np.diff(sorted_scores))[0] + 1])
    ends = np.concatenate([starts[1:], [scores.size]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.repeat(avg_rank, ends - starts)
    pos_rank_sum = ranks[labels[order]].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ---------------------------------------------------------------------------
# Per-region overlap (PRO), MVTec AD's segmentation metric
# ---------------------------------------------------------------------------

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_frames(arrays, name: str) -> list[np.ndarray]:
    """A (H, W) array, an (N, H, W) array or a sequence of 2-D arrays -> list of 2-D arrays."""
    if isinstance(arrays, np.ndarray):
        if arrays.ndim == 2:
            return [arrays]
        if arrays.ndim == 3:
            return list(arrays)
        raise InputError(f"{name} must be (H, W), (N, H, W) or a list of 2-D arrays, got shape {arrays.shape}")
    frames = [np.asarray(a) for a in arrays]
    bad = [i for i, a in enumerate(frames) if a.ndim != 2]
    if bad:
        raise InputError(f"{name}[{bad[0]}] is not 2-D (shape {frames[bad[0]].shape})")
    return frames


def _region_labels(masks, maps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened scores, global region ids (0 = normal pixel) and region sizes (index 0 unused)."""
    masks, maps = _as_frames(masks, "masks"), _as_frames(maps, "maps")
    if len(masks) != len(maps):
        raise InputError(f"{len(masks)} masks but {len(maps)} maps")
    labels, offset = [], 0
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        if mask.shape != amap.shape:
            raise InputError(f"mask {i} has shape {mask.shape} but map {i} has shape {amap.shape}")
        lab, n = ndimage.label(mask != 0, structure=_EIGHT_CONNECTED)
        labels.append(np.where(lab > 0, lab + offset, 0).ravel())
        offset += n
    scores = np.concatenate([np.ravel(m) for m in maps])
    if not np.issubdtype(scores.dtype, np.number) or not np.isfinite(scores).all():
        raise InputError("maps must be finite numbers (found NaN, inf or a non-numeric dtype)")
    labels = np.concatenate(labels)
    sizes = np.bincount(labels, minlength=offset + 1)
    return scores, labels, sizes


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max]; y at x_max is linearly interpolated.

    x is sorted ascending (ties allowed) and x[-1] >= x_max.
    """
    end = int(np.searchsorted(x, x_max, side="right"))      # x[:end] <= x_max
    xs, ys = x[:end], y[:end]
    if xs[-1] < x_max:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def pro_curve(masks, maps, fpr_limit: float = 1.0, num_thresholds: int | None = None):
    """Per-region overlap curve: (fpr, pro) float64 arrays, ascending, starting at (0, 0).

    One point per distinct threshold t (a pixel is predicted anomalous when its score
    >= t), from the highest score down to at least the first threshold whose FPR
    exceeds ``fpr_limit``; the whole curve, ending at (1, 1), with fpr_limit 1.0 or
    num_thresholds. Arguments as :func:`aupro`.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise InputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, labels, sizes = _region_labels(masks, maps)
    n_normal, n_regions = int(sizes[0]), sizes.size - 1
    if n_regions == 0:
        raise InputError("PRO needs at least one anomalous region; the masks are all empty")
    if n_normal == 0:
        raise InputError("PRO needs normal pixels; the masks cover every pixel")
    if num_thresholds is None:
        # Only pixels scoring at least the first normal score past the FPR limit matter:
        # keeping them (plus everything scoring as high) saves most of the sort.
        past_limit = int(np.floor(fpr_limit * n_normal)) + 2
        keep = slice(None)
        if past_limit < n_normal:
            normal = scores[labels == 0]
            keep = scores >= np.partition(normal, n_normal - past_limit)[n_normal - past_limit]
        values, bins = np.unique(scores[keep], return_inverse=True)
        labels, n_bins = labels[keep], values.size
    else:
        if int(num_thresholds) < 2:
            raise InputError(f"num_thresholds must be None or >= 2, got {num_thresholds}")
        # Thresholds evenly spaced from min to max; a pixel counts from every bin it reaches.
        lo, hi = float(scores.min()), float(scores.max())
        step = (hi - lo) / (num_thresholds - 1) or 1.0
        n_bins = int(num_thresholds)
        bins = np.clip(np.floor((scores - lo) / step), 0, n_bins - 1).astype(np.int64)
    region_weight = np.concatenate([[0.0], 1.0 / sizes[1:]])     # overlap gained per pixel
    fp = np.bincount(bins.ravel(), weights=labels == 0, minlength=n_bins)[::-1]
    overlap = np.bincount(bins.ravel(), weights=region_weight[labels], minlength=n_bins)[::-1]
    fpr = np.concatenate([[0.0], np.cumsum(fp) / n_normal])
    pro = np.concatenate([[0.0], np.minimum(np.cumsum(overlap) / n_regions, 1.0)])
    return fpr, pro


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (AUPRO).

    The segmentation metric of MVTec AD (Bergmann et al., "The MVTec Anomaly Detection
    Dataset", IJCV 2021, Sec. 5.2; reference code ``compute_pro``): the ground-truth
    regions are the 8-connected components of each mask; at a threshold t the PRO is
    the mean over all regions (of all images) of the fraction of the region's pixels
    with score >= t, and the FPR is the fraction of all normal pixels (of all images)
    with score >= t. The curve is integrated with the trapezoid rule from FPR 0 to
    exactly ``fpr_limit`` (PRO linearly interpolated there) and divided by
    ``fpr_limit``, so a perfect map scores 1.

    Exact: every distinct score is a threshold (one sort of the pixels that score at
    least as high as the first normal pixel past the FPR limit, O(P log P) for P
    pixels; memory a few P-sized arrays: scores, int64 region ids, the kept pixels).

    Args:
        masks: ground truth, bool (nonzero = anomalous), (H, W), (N, H, W), or a list of
            2-D arrays whose shapes may differ between images.
        maps: anomaly maps, float (higher = more anomalous), shaped like ``masks``.
        fpr_limit: upper integration limit, in (0, 1]; MVTec AD reports 0.3.
        num_thresholds: None for the exact curve; an int >= 2 bins the scores to that
            many thresholds evenly spaced from the lowest to the highest score (O(P),
            no sort; an approximation, as binned implementations do).

    Returns:
        AUPRO in [0, 1].

    Raises:
        InputError: shapes differ, maps hold NaN/inf, no anomalous region, no normal
            pixel, or fpr_limit / num_thresholds out of range.
    """
    fpr, pro = pro_curve(masks, maps, fpr_limit, num_thresholds)
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


# ---------------------------------------------------------------------------
# Decisions at a threshold: precision, recall, F1
# ---------------------------------------------------------------------------

def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise InputError(f"labels ({labels.size}) and scores ({scores.size}) differ in size")
    return labels, scores


def _ratio(num, den):
    """num / den, 0 where den == 0 (precision with no positive prediction, and so on)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def precision_recall_f1(labels, scores, threshold: float) -> dict:
    """Precision, recall and F1 of the decision ``score >= threshold`` -> anomalous.

    NaN scores are predicted anomalous (fail closed: an unscorable part is not passed).
    A ratio whose denominator is 0 (no predicted or no actual anomaly) is reported as 0.

    Args:
        labels: bool or {0, 1}, any shape (1 = anomalous).
        scores: float, same size.
        threshold: decision threshold, in score units.

    Returns:
        {"precision", "recall", "f1": float, "tp", "fp", "fn", "tn": int}.

    Raises:
        InputError: labels and scores differ in size.
    """
    labels, scores = _labels_scores(labels, scores)
    predicted = ~(scores < threshold)                      # NaN < t is False -> anomalous
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    tn = int(np.sum(~predicted & ~labels))
    return {"precision": float(_ratio(tp, tp + fp)), "recall": float(_ratio(tp, tp + fn)),
            "f1": float(_ratio(2 * tp, 2 * tp + fp + fn)), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def f1_max(labels, scores) -> dict:
    """The best F1 over all thresholds (an oracle: the threshold is chosen on the labels).

    Exact: every distinct score is tried as a threshold (``score >= threshold`` is
    anomalous), in one sort. Of thresholds with equal F1 the highest is returned.

    Args:
        labels: bool or {0, 1}, any shape (1 = anomalous); at least one anomalous.
        scores: finite float, same size.

    Returns:
        {"f1", "threshold", "precision", "recall"} (floats); passing the threshold to
        :func:`precision_recall_f1` gives the same F1.

    Raises:
        InputError: sizes differ, no anomalous label, or a score is NaN/inf.
    """
    labels, scores = _labels_scores(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise InputError("F1 needs at least one anomalous sample")
    if not np.isfinite(scores).all():
        raise InputError("scores must be finite (found NaN or inf)")
    order = np.argsort(-scores, kind="stable")
    desc = scores[order]
    tp = np.cumsum(labels[order])
    predicted = np.arange(1, desc.size + 1)
    last_of_tie = np.append(desc[1:] != desc[:-1], True)    # the threshold includes all ties
    tp, predicted, thresholds = tp[last_of_tie], predicted[last_of_tie], desc[last_of_tie]
    f1 = 2.0 * tp / (predicted + n_pos)
    best = int(np.argmax(f1))
    return {"f1": float(f1[best]), "threshold": float(thresholds[best]),
            "precision": float(tp[best] / predicted[best]), "recall": float(tp[best] / n_pos)}
