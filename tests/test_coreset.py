import numpy as np
import pytest

from patchsearch import covering_radius, kcenter_greedy
from patchsearch.coreset import random_projection
from patchsearch.errors import InputError


def _clustered(n=3000, d=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d)) * 5
    return (centres[rng.integers(0, 30, n)] + rng.standard_normal((n, d))).astype(np.float32)


def _plain_greedy(points, k, start):
    """Textbook greedy k-center (PatchCore Algorithm 1) on the given points."""
    min_d = np.full(len(points), np.inf)
    sel = [start]
    for _ in range(k - 1):
        min_d = np.minimum(min_d, ((points - points[sel[-1]]) ** 2).sum(1))
        sel.append(int(np.argmax(min_d)))
    return np.array(sel)


@pytest.mark.parametrize("d,proj", [(24, 128), (200, 32)])
def test_equals_plain_greedy_on_projection(d, proj):
    x = _clustered(d=d)
    sel = kcenter_greedy(x, 0.05, seed=3, projection_dim=proj)
    assert len(sel) == 150 and len(set(sel.tolist())) == 150
    p = random_projection(x, proj, seed=3).astype(np.float64)
    np.testing.assert_array_equal(sel, _plain_greedy(p, 150, sel[0]))


def test_covering_radius_beats_random():
    x = _clustered(d=64, seed=1)
    sel = kcenter_greedy(x, 0.02, seed=0)
    rng = np.random.default_rng(0)
    random_radii = [covering_radius(x, rng.choice(len(x), len(sel), replace=False)) for _ in range(5)]
    assert covering_radius(x, sel) < 0.8 * min(random_radii)


def test_covering_radius_is_exact():
    x = np.array([[0, 0], [3, 4], [1, 0], [10, 0]], np.float32)
    assert covering_radius(x, [0, 3]) == pytest.approx(5.0)


def test_deterministic_and_seeded():
    x = _clustered(seed=2)
    a, b = kcenter_greedy(x, 0.03, seed=7), kcenter_greedy(x, 0.03, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, kcenter_greedy(x, 0.03, seed=8))


def test_ratio_edges_and_errors():
    x = _clustered(n=100)
    assert kcenter_greedy(x, 1.0).tolist() == list(range(100))
    assert len(kcenter_greedy(x, 0.001)) == 1
    for bad in (0, -0.1, 1.5):
        with pytest.raises(InputError, match="ratio"):
            kcenter_greedy(x, bad)
    x[5, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        kcenter_greedy(x, 0.1)
    with pytest.raises(InputError, match="non-empty"):
        kcenter_greedy(np.zeros((0, 4), np.float32), 0.1)
