import numpy as np
import pytest

from patchsearch.errors import InputError
from patchsearch.metrics import auroc
from patchsearch.score import anomaly_maps


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
