import numpy as np
import pytest

from patchsearch.thresholds import (decide, f1_optimal_threshold, fit_pixel_threshold, fit_threshold,
                                   normalized_score)
from patchsearch.errors import InputError


def test_rule_on_hand_made_scores():
    # 100 scores 1..100, target 5 %: k = floor(0.05 * 99) = 4 scores may lie above the quantile,
    # so q is the 5th largest, 96 (numpy's "higher" quantile; 95 would leave 5 above).
    fit = fit_threshold(np.arange(100, 0, -1), target_fpr=0.05, margin=0.0)
    assert fit["quantile"] == 96 and fit["threshold"] == 96 and fit["n"] == 100
    assert fit["quantile"] == np.quantile(np.arange(1, 101), 0.95, method="higher")
    assert "1 - target_fpr" in fit["rule"] and fit["target_fpr"] == 0.05 and fit["margin"] == 0.0
    assert fit_threshold(np.arange(1, 101), target_fpr=0.05, margin=0.5)["threshold"] == 144.0
    # few images: target_fpr * (n - 1) < 1 -> the max
    assert fit_threshold([3.0, 1.0, 2.0, 2.5, 1.5], target_fpr=0.2)["quantile"] == 3.0
    assert fit_threshold([3.0, 1.0, 2.0, 2.5, 1.5], target_fpr=0.25)["quantile"] == 2.5


def test_defaults_pass_every_calibration_image():
    scores = np.random.default_rng(0).gamma(9.0, 0.2, 40)
    fit = fit_threshold(scores)
    assert fit["target_fpr"] == 0.0 and fit["margin"] == 0.1
    assert fit["threshold"] == pytest.approx(1.1 * scores.max())
    assert (decide(scores, fit["threshold"]) == "OK").all()


@pytest.mark.parametrize("seed", range(30))
def test_at_most_target_fpr_above_the_threshold(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 600))
    scores = rng.lognormal(0.0, 0.5, n)
    if seed % 3 == 0:
        scores = np.round(scores, 1)                      # ties
    target = float(rng.choice([0.0, 0.001, 0.01, 0.05, 0.1, 0.3]))
    fit = fit_threshold(scores, target_fpr=target, margin=0.0)
    k = int(np.floor(target * (n - 1)))
    assert (scores > fit["quantile"]).sum() <= k <= target * n
    assert (scores >= fit["quantile"]).sum() >= k + 1    # and no lower: q is a calibration score of rank k + 1
    assert fit["quantile"] in scores
    margin = fit_threshold(scores, target_fpr=target, margin=0.05)
    assert margin["threshold"] == pytest.approx(1.05 * fit["quantile"])
    assert (decide(scores, margin["threshold"]) == "NG").mean() <= target


def test_fit_threshold_errors():
    with pytest.raises(InputError, match="at least 2"):
        fit_threshold([1.0])
    with pytest.raises(InputError, match="NaN or inf"):
        fit_threshold([1.0, np.nan, 2.0])
    with pytest.raises(InputError, match="NaN or inf"):
        fit_threshold([1.0, np.inf])
    with pytest.raises(InputError, match="negative"):
        fit_threshold([1.0, -1.0])
    with pytest.raises(InputError, match="held-aside"):
        fit_threshold([0.0, 0.0, 0.0])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(InputError, match="target_fpr"):
            fit_threshold([1.0, 2.0], target_fpr=bad)
    with pytest.raises(InputError, match="margin"):
        fit_threshold([1.0, 2.0], margin=-0.1)


@pytest.mark.parametrize("target", [0.0, 1e-4, 0.01, 0.2])
def test_pixel_threshold_equals_the_rule_on_all_pixels(target):
    rng = np.random.default_rng(1)
    maps = [rng.gamma(4.0, 0.3, shape).astype(np.float32) for shape in [(30, 40), (25, 25), (1, 7), (50, 20)]]
    pixels = np.concatenate([m.ravel() for m in maps])
    fit = fit_pixel_threshold(maps, target_fpr=target, margin=0.2)
    assert fit == fit_threshold(pixels, target_fpr=target, margin=0.2)
    assert fit["n"] == pixels.size
    same = [m[:20, :20] for m in (maps[0], maps[3])]
    assert fit_pixel_threshold(np.stack(same), target) == fit_threshold(np.concatenate(same).ravel(), target)


def test_pixel_threshold_errors():
    with pytest.raises(InputError, match="at least 2"):
        fit_pixel_threshold([])
    bad = np.ones((4, 4))
    bad[2, 2] = np.nan
    with pytest.raises(InputError, match="good map 1"):
        fit_pixel_threshold([np.ones((3, 3)), bad])


def test_f1_optimal_threshold():
    # thresholds 5: F1 1/2, 4: 4/5, 3: 2/3, 2.5: 6/7 (tp 3, fp 1), 2: 3/4
    best = f1_optimal_threshold([1.0, 2.0, 3.0], [2.5, 4.0, 5.0])
    assert best == pytest.approx({"threshold": 2.5, "f1": 6 / 7, "precision": 0.75, "recall": 1.0})
    with pytest.raises(InputError):
        f1_optimal_threshold([1.0, 2.0], [])


def test_normalized_score():
    assert normalized_score(2.0, 2.0) == 1.0 and isinstance(normalized_score(2.0, 2.0), float)
    out = normalized_score(np.array([[1.0, np.nan], [3.0, 0.0]]), 2.0)
    assert out.shape == (2, 2) and np.isnan(out[0, 1])
    assert np.allclose(out[[0, 1, 1], [0, 0, 1]], [0.5, 1.5, 0.0])
    with pytest.raises(InputError, match="threshold"):
        normalized_score(1.0, 0.0)


def test_decide_fails_closed():
    scores = np.array([0.5, 1.0, 1.5, np.nan, np.inf, -np.inf, -1.0, 0.0, 0.999999])
    assert decide(scores, 1.0).tolist() == ["OK", "NG", "NG", "ERROR", "ERROR", "ERROR", "ERROR", "OK", "OK"]
    assert decide(np.full((2, 3), 7.0), 1.0).shape == (2, 3)
    assert decide(float("nan"), 1.0) == "ERROR" and decide(0.2, 1.0) == "OK"
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="threshold"):
            decide([1.0], bad)
