"""Decision thresholds fitted on good images only, and the OK / NG / ERROR verdict.

PatchCore scores are L2 distances (not squared) in feature space: >= 0, higher = more
anomalous, in no fixed unit, so a threshold is only meaningful for the memory bank
(index) it was fitted with. Fit it on *held-aside* good images, never on the training
images: those are in the memory bank and score near 0.

The rule (one for images and pixels)::

    threshold = (1 + margin) * q,   q = the (k+1)-th largest good score,
                                    k = floor(target_fpr * (n - 1))

q is the empirical (1 - target_fpr) quantile with the "higher" order statistic, as
``numpy.quantile(scores, 1 - target_fpr, method="higher")`` (numpy computes 1 - target_fpr
in floating point and can land one rank higher, e.g. n=11, target_fpr=0.7). At most
k <= target_fpr * n calibration scores are strictly above q, and with margin > 0 only
those can reach the threshold (``score >= threshold`` is NG; with margin 0 the scores
equal to q are NG too). With few images (target_fpr * (n - 1) < 1), q is the max.
Example: scores 1..100, target_fpr 0.05: k = floor(4.95) = 4, q = 96 (5th largest);
4 % of the scores are above it. 95 would let 5 % above, but rank k + 1 is the rule.

Defaults, for a production line where a false alarm stops the line and a missed
defect ships: ``target_fpr=0`` and ``margin=0.1``, i.e. 10 % above the worst good
calibration image / pixel. Every held-aside good image passes and shows no region; a
new good image from the same distribution scores above the max of n calibration
images with probability 1/(n + 1), and the margin covers most of that tail and small
drift (light, fixture). Lower the margin (or check with :func:`f1_optimal_threshold`
on labelled defects) when defects are subtle.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .metrics import f1_max

TARGET_FPR = 0.0
MARGIN = 0.1
RULE = "threshold = (1 + margin) * quantile(good scores, 1 - target_fpr, method='higher')"


def _check_options(target_fpr: float, margin: float) -> None:
    if not 0.0 <= target_fpr < 1.0:
        raise InputError(f"target_fpr must be in [0, 1), got {target_fpr}")
    if not (math.isfinite(margin) and margin >= 0.0):
        raise InputError(f"margin must be a finite number >= 0, got {margin}")


def _check_scores(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise InputError(f"{what} contain NaN or inf; fix or drop those images before calibrating")
    if (values < 0).any():
        raise InputError(f"{what} contain negative values; PatchCore scores are L2 distances >= 0")


def _kth_largest_count(n: int, target_fpr: float) -> int:
    """k + 1: the rank, counted from the top, of the quantile among n calibration values."""
    return int(math.floor(target_fpr * (n - 1))) + 1


def _result(quantile: float, n: int, target_fpr: float, margin: float) -> dict:
    if quantile <= 0.0:
        raise InputError("every good score is 0: calibrate on held-aside good images, "
                         "not on the images in the memory bank")
    return {"threshold": (1.0 + margin) * quantile, "rule": RULE, "target_fpr": target_fpr,
            "margin": margin, "n": n, "quantile": quantile}


def fit_threshold(good_scores, target_fpr: float = TARGET_FPR, margin: float = MARGIN) -> dict:
    """Image threshold from the scores of held-aside good images (rule: module docstring).

    Args:
        good_scores: float (n,) image scores (L2 distances, >= 0), n >= 2.
        target_fpr: highest fraction of the calibration images allowed above the
            quantile, in [0, 1); 0 (default) takes their max.
        margin: relative headroom above the quantile, >= 0 (default 0.1 = 10 %).

    Returns:
        {"threshold": float, "rule": str, "target_fpr": float, "margin": float,
         "n": int (calibration scores), "quantile": float (q)}.

    Raises:
        InputError: fewer than 2 scores, a NaN/inf/negative score, all scores 0, or
            target_fpr / margin out of range.
    """
    _check_options(target_fpr, margin)
    scores = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    if scores.size < 2:
        raise InputError(f"calibration needs at least 2 good image scores, got {scores.size}")
    _check_scores(scores, "good image scores")
    n = scores.size
    top = n - _kth_largest_count(n, target_fpr)
    return _result(float(np.partition(scores, top)[top]), n, target_fpr, margin)


def fit_pixel_threshold(good_maps, target_fpr: float = TARGET_FPR, margin: float = MARGIN) -> dict:
    """Pixel threshold from the anomaly maps of held-aside good images (same rule, every
    pixel of every map is one calibration value).

    Memory: the m = floor(target_fpr * (P - 1)) + 1 largest values of each map are kept
    (one ``np.partition`` of one map at a time), so at most min(P, len(maps) * m) floats
    beside the inputs, P = total pixels; with the default target_fpr 0 that is one value
    per map.

    Args:
        good_maps: float (N, H, W) array or a list of 2-D arrays (shapes may differ).
        target_fpr, margin: as :func:`fit_threshold`; target_fpr is a fraction of pixels.

    Returns:
        As :func:`fit_threshold`, with "n" the number of pixels.

    Raises:
        InputError: no map, fewer than 2 pixels, a NaN/inf/negative value, all values 0,
            or target_fpr / margin out of range.
    """
    _check_options(target_fpr, margin)
    single = isinstance(good_maps, np.ndarray) and good_maps.ndim < 3
    maps = [np.asarray(good_maps)] if single else [np.asarray(m) for m in good_maps]
    n = sum(m.size for m in maps)
    if n < 2:
        raise InputError(f"pixel calibration needs good maps with at least 2 pixels, got {n}")
    rank = _kth_largest_count(n, target_fpr)
    tops = []
    for i, amap in enumerate(maps):
        values = amap.reshape(-1)
        _check_scores(values, f"good map {i}")
        if values.size > rank:
            values = np.partition(values, values.size - rank)[values.size - rank:]
        tops.append(values)
    tops = np.concatenate(tops).astype(np.float64)
    return _result(float(np.partition(tops, tops.size - rank)[tops.size - rank]), n, target_fpr, margin)


def f1_optimal_threshold(good_scores, defect_scores) -> dict:
    """The threshold with the best F1 on labelled images (an oracle, for reports and for
    checking a fitted threshold; ``metrics.f1_max``).

    Args:
        good_scores: float (n_good,) scores of good images.
        defect_scores: float (n_defect,) scores of defective images, n_defect >= 1.

    Returns:
        {"threshold", "f1", "precision", "recall"} (floats; ``score >= threshold`` is NG).

    Raises:
        InputError: no defect score, or a NaN/inf score.
    """
    good = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    defect = np.asarray(defect_scores, dtype=np.float64).reshape(-1)
    labels = np.concatenate([np.zeros(good.size, bool), np.ones(defect.size, bool)])
    best = f1_max(labels, np.concatenate([good, defect]))
    return {key: best[key] for key in ("threshold", "f1", "precision", "recall")}


def _check_threshold(threshold: float) -> None:
    if not (math.isfinite(threshold) and threshold > 0):
        raise InputError(f"threshold must be a finite number > 0, got {threshold}")


def normalized_score(score, threshold: float):
    """score / threshold: 1.0 at the threshold, < 1 OK, >= 1 NG; NaN stays NaN.

    Args:
        score: float or float array (L2 distances).
        threshold: the fitted threshold, > 0.

    Returns:
        float for a scalar score, else a float64 array of the same shape.
    """
    _check_threshold(threshold)
    ratio = np.asarray(score, dtype=np.float64) / threshold
    return float(ratio) if ratio.ndim == 0 else ratio


def decide(scores, threshold: float) -> np.ndarray:
    """The verdict per score: "NG" when score >= threshold, "OK" below it, and "ERROR"
    for NaN, inf or a negative score (an error code, since an L2 distance is >= 0).

    Fail closed: a score that is not a valid distance is never "OK".

    Args:
        scores: float scalar or array (PatchCore image scores, L2 distances).
        threshold: the fitted threshold, > 0.

    Returns:
        str array ("<U5") of the same shape as ``scores``.
    """
    _check_threshold(threshold)
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.isfinite(scores) & (scores >= 0)
    return np.where(~valid, "ERROR", np.where(scores >= threshold, "NG", "OK"))
