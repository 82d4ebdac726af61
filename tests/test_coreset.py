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


@pytest.mark.parametrize("num_blocks", [1, 40, 375])
def test_two_level_blocks_keep_the_exact_selection(monkeypatch, num_blocks):
    """Beyond FLAT_BLOCKS the blocks come from two-level k-means; new centres are filtered
    by cell (k-means groups of blocks) first: the selection and its covering radius stay
    those of textbook greedy."""
    from patchsearch import coreset

    monkeypatch.setattr(coreset, "FLAT_BLOCKS", 4)
    x = _clustered(d=24, seed=4)
    geo = coreset._Blocks(x, num_blocks, seed=0)
    cells = len(geo.cell_starts)
    assert (cells > 1) == (num_blocks >= 2 * coreset.BLOCKS_PER_CELL)
    np.testing.assert_array_equal(np.sort(geo.order), np.arange(len(x)))
    assert geo.cell_starts[0] == 0 and geo.cell_ends[-1] == len(geo.starts)
    block = np.repeat(np.arange(len(geo.starts)), geo.ends - geo.starts)
    assert (np.linalg.norm(geo.pts - geo.centres[block], axis=1) <= geo.radii[block]).all()
    for g in range(cells):  # every cell's ball holds all of its points
        lo, hi = geo.starts[geo.cell_starts[g]], geo.ends[geo.cell_ends[g] - 1]
        far = np.linalg.norm(geo.pts[lo:hi] - geo.cell_centres[g], axis=1).max()
        assert far <= geo.cell_radii[g]
    sel, radius = kcenter_greedy(x, 0.05, seed=5, num_blocks=num_blocks, return_radius=True)
    np.testing.assert_array_equal(sel, _plain_greedy(x.astype(np.float64), 150, sel[0]))
    assert radius == pytest.approx(covering_radius(x, sel), rel=1e-4)


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
