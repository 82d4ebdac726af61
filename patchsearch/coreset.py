"""Greedy k-center coreset subsampling (PatchCore §3.2, Algorithm 1).

The memory bank is the subset M_C of the patch embeddings M chosen greedily: start
from one seeded random patch, then repeatedly add the patch farthest (L2) from the
patches chosen so far, until ``ratio * len(M)`` are chosen. As in the paper, the
distances are computed on a Gaussian random projection of the embeddings to
``projection_dim`` dimensions (Johnson-Lindenstrauss).

The selection is exact greedy k-center on the projected points, made fast by
pruning with the triangle inequality: the points are grouped into blocks by
k-means (``faiss.Kmeans``), each with centre r_b and radius R_b. When a new centre c
is added, a point x of block b can only get closer to the selection if
||c - x|| < min_dist(x); since ||c - x|| >= ||c - r_b|| - R_b, a block with
||c - r_b|| - R_b >= max_{x in b} min_dist(x) is skipped whole. Late in the
selection most blocks are skipped, so the cost per step falls far below the
O(N d) of the plain algorithm while the chosen points stay the same.

Two refinements keep it fast at millions of patches. Beyond ``FLAT_BLOCKS`` blocks
(~260k patches) the blocks are made by two-level k-means (about sqrt(B) coarse cells,
each split by its own k-means: O(N sqrt(B) d) to make, not O(N B d)). And the blocks
are grouped into cells of about ``BLOCKS_PER_CELL`` by k-means of their centroids: a
new centre is first tested against each cell's ball, and only the centres that can
reach a cell are tested against its blocks. Updates are lazy: only the cell and the
block with the largest bound are brought up to date, until the top block is current;
its farthest point is then the exact greedy choice.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError, check_finite

PROJECTION_DIM = 128


def _check_embeddings(embeddings) -> tuple[int, int]:
    shape = getattr(embeddings, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise InputError(f"embeddings must be a non-empty (N, d) array, got shape {shape}")
    return int(shape[0]), int(shape[1])


def check_ratio(ratio: float) -> float:
    """Raises InputError unless the coreset ratio is in (0, 1]."""
    if not 0.0 < ratio <= 1.0:
        raise InputError(f"--coreset-ratio must be in (0, 1], got {ratio}")
    return ratio


def radius_space(dim: int, projection_dim: int = PROJECTION_DIM) -> str:
    """Where :func:`kcenter_greedy` measures distances for embeddings of dimension ``dim``:
    ``"projected-<projection_dim>"`` (its seeded Gaussian projection) or ``"full"`` (d <= projection_dim)."""
    return f"projected-{projection_dim}" if dim > projection_dim else "full"


def random_projection(embeddings, projection_dim: int = PROJECTION_DIM, seed: int = 0,
                      chunk: int = 65536) -> np.ndarray:
    """Project (N, d) embeddings to float32 (N, projection_dim) with a seeded Gaussian matrix.

    The matrix has N(0, 1/projection_dim) entries, so squared L2 distances are preserved
    in expectation. Reads ``embeddings`` (a numpy array or memory map) chunk by chunk.
    If d <= projection_dim the embeddings are returned as float32 unchanged.

    Raises:
        InputError: not a 2-D array, or NaN/inf values.
    """
    n, d = _check_embeddings(embeddings)
    matrix = None
    if d > projection_dim:
        rng = np.random.default_rng(seed)
        matrix = (rng.standard_normal((d, projection_dim)) / math.sqrt(projection_dim)).astype(np.float32)
    out = np.empty((n, projection_dim if matrix is not None else d), dtype=np.float32)
    for start in range(0, n, chunk):
        block = np.asarray(embeddings[start:start + chunk], dtype=np.float32)
        check_finite(block, "embeddings", first_row=start)
        if matrix is None:
            out[start:start + len(block)] = block
        else:
            np.matmul(block, matrix, out=out[start:start + len(block)])
    return out


FLAT_BLOCKS = 1024  # above this many blocks, they are made by two-level k-means
BLOCKS_PER_CELL = 16  # the lazy loop's cells: k-means groups of about this many blocks


def _kmeans(points: np.ndarray, k: int, seed: int):
    """``faiss.Kmeans`` (8 iterations, <= 64 training points a centroid): the nearest
    centroid of every point, int64 (n,), and the float32 (k, d) centroids."""
    import faiss

    if k <= 1:
        return np.zeros(len(points), dtype=np.int64), points.mean(0, dtype=np.float64)[None].astype(np.float32)
    km = faiss.Kmeans(points.shape[1], k, niter=8, seed=seed, max_points_per_centroid=64, min_points_per_centroid=1,
                      verbose=False)  # cells: ~16 block centroids each, below FAISS's warning level of 39
    km.train(points)
    return km.index.search(points, 1)[1][:, 0], km.centroids


def _block_assignment(points: np.ndarray, num_blocks: int, seed: int):
    """Block of every point, int64 (n,), and the blocks' k-means centroids, float32 (B, d).

    Up to ``FLAT_BLOCKS`` blocks: one k-means. Beyond: two-level k-means (about
    sqrt(num_blocks) coarse cells, each split in proportion to its size), so the cost is
    O(N sqrt(B) d) instead of O(N B d). Any partition keeps the selection exact (the
    bounds use each block's own radius); compact blocks only make the pruning effective.
    """
    n = len(points)
    if num_blocks <= FLAT_BLOCKS:
        return _kmeans(points, num_blocks, seed)
    coarse, _ = _kmeans(points, int(math.ceil(math.sqrt(num_blocks))), seed)
    order = np.argsort(coarse, kind="stable")
    sizes = np.bincount(coarse)
    del coarse
    assign = np.empty(n, dtype=np.int64)
    centroids, at, offset = [], 0, 0
    for size in sizes:
        rows = order[at:at + size]
        at += size
        if size == 0:
            continue
        k = max(1, min(int(round(size * num_blocks / n)), size // 8 or 1))
        local, cents = _kmeans(points[rows], k, seed)
        assign[rows] = offset + local
        offset += len(cents)
        centroids.append(cents)
    return assign, np.concatenate(centroids)


class _Blocks:
    """The points in block order and the pruning geometry of blocks and their cells.

    order: int64 (n,) original row of each point; pts: float32 (n, p) points in block
    order; starts, ends: int64 (B,) row range of each block; centres: float32 (B, p) block
    means; radii: float64 (B,) max L2 distance of a block's points to its centre;
    cell_starts, cell_ends: int64 (G,) block range of each cell (about BLOCKS_PER_CELL
    blocks, grouped by k-means of their centroids); cell_centres,
    cell_radii: the same geometry for the cells (cell radius: an upper bound, the max over
    its blocks of centre distance + block radius).
    """

    def __init__(self, points: np.ndarray, num_blocks: int, seed: int, chunk: int = 16384):
        n = len(points)
        num_blocks = max(1, min(num_blocks, n // 8 or 1))
        assign, centroids = _block_assignment(points, num_blocks, seed)
        # cells: k-means of the block centroids; blocks renumbered so that each cell's are contiguous
        cell_of_block, _ = _kmeans(centroids, len(centroids) // BLOCKS_PER_CELL, seed)
        renumber = np.empty(len(centroids), dtype=np.int64)
        renumber[np.argsort(cell_of_block, kind="stable")] = np.arange(len(centroids))
        cell_of_block = np.sort(cell_of_block)
        assign = renumber[assign]
        self.order = np.argsort(assign, kind="stable")
        sizes = np.bincount(assign, minlength=len(centroids))
        del assign
        keep = sizes > 0
        sizes, cell_of_block = sizes[keep], cell_of_block[keep]
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.ends = self.starts + sizes
        self.pts = pts = points[self.order]
        # float32 block means: any centre gives valid bounds, as the radii are measured from it
        self.centres = (np.add.reduceat(pts, self.starts, axis=0) / sizes[:, None].astype(np.float32)).astype(np.float32)
        block = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        sq = np.empty(n, dtype=np.float32)
        for s in range(0, n, chunk):
            diff = pts[s:s + chunk] - self.centres[block[s:s + chunk]]
            sq[s:s + len(diff)] = np.einsum("ij,ij->i", diff, diff)
        del block
        self.radii = np.sqrt(np.maximum.reduceat(sq, self.starts).astype(np.float64)) * (1 + 1e-6)  # float32 rounding
        cells = np.nonzero(np.diff(cell_of_block, prepend=-1))[0]
        self.cell_starts = cells.astype(np.int64)
        self.cell_ends = np.append(cells[1:], len(sizes)).astype(np.int64)
        weights = sizes.astype(np.float64)
        sums = np.add.reduceat(self.centres.astype(np.float64) * weights[:, None], cells, axis=0)
        self.cell_centres = (sums / np.add.reduceat(weights, cells)[:, None]).astype(np.float32)
        cell_index = np.repeat(np.arange(len(cells)), self.cell_ends - self.cell_starts)
        reach = np.linalg.norm(self.centres.astype(np.float64) - self.cell_centres[cell_index], axis=1) + self.radii
        self.cell_radii = np.maximum.reduceat(reach, cells) * (1 + 1e-6) + 1e-6


def _survivors(sel_pts, sel_norms, rows, centre, centre_norm, radius, upper):
    """Which of the selected centres ``rows`` can bring a point of the ball (centre, radius)
    below ``upper`` (squared L2): the others are at least sqrt(upper) from all of it
    (triangle inequality), i.e. ||c - centre|| >= radius + sqrt(upper). The bound is
    widened by 1e-4 (relative, squared) against float32 rounding of the expansion."""
    reach = (radius + math.sqrt(max(upper, 0.0))) ** 2 * (1 + 1e-4) - centre_norm if upper < math.inf else math.inf
    return np.flatnonzero(sel_norms[rows] - 2.0 * (sel_pts[rows] @ centre) < reach)


def kcenter_greedy(embeddings, ratio: float, seed: int = 0, projection_dim: int = PROJECTION_DIM,
                   num_blocks: int | None = None, progress: bool = False, return_radius: bool = False):
    """Greedy k-center coreset selection (PatchCore Algorithm 1).

    Args:
        embeddings: (N, d) float array (numpy array or memory map) of patch embeddings.
        ratio: fraction of patches to select, in (0, 1]; ``max(1, int(N * ratio))`` are selected.
        seed: seeds the random projection, the block k-means and the first centre.
            The same input and seed always give the same selection.
        projection_dim: dimension of the random projection used for distances
            (no projection when d <= projection_dim).
        num_blocks: number of pruning blocks (default about N / 256; two-level k-means
            above ``FLAT_BLOCKS``).
        progress: show a tqdm progress bar.

        return_radius: also return the covering radius of the selection.

    Returns:
        int64 (n_select,) row indices into ``embeddings`` in selection order; with
        ``return_radius``, (indices, radius): the largest L2 distance (not squared) from
        any row to its nearest selected row, in the space the selection was made in (the
        projection, or the embeddings themselves when d <= projection_dim), float32
        distance expansion as in the loop.

    Raises:
        InputError: ratio outside (0, 1], empty input or NaN/inf values.
    """
    check_ratio(ratio)
    n, _ = _check_embeddings(embeddings)
    n_select = max(1, int(n * ratio))
    points = random_projection(embeddings, projection_dim, seed)
    if n_select >= n:
        everything = np.arange(n, dtype=np.int64)
        return (everything, 0.0) if return_radius else everything

    geo = _Blocks(points, num_blocks or max(1, n // 256), seed)
    del points                                            # geo.pts: the same, block-contiguous
    order, starts, ends, centres, radii, pts = geo.order, geo.starts, geo.ends, geo.centres, geo.radii, geo.pts
    norms = np.einsum("ij,ij->i", pts, pts)
    centre_norms = np.einsum("ij,ij->i", centres, centres)
    cell_norms = np.einsum("ij,ij->i", geo.cell_centres, geo.cell_centres)
    nb, ng = len(starts), len(geo.cell_starts)
    min_sq = np.full(n, np.inf, dtype=np.float32)         # squared distance to the selection
    upper = np.full(nb, np.inf)                           # >= max of min_sq over each block
    cell_upper = np.full(ng, np.inf)                      # = max of upper over each cell's blocks
    cell_applied = np.zeros(ng, dtype=np.int64)           # selected centres already filtered per cell
    passed = [np.empty(16, dtype=np.int32) for _ in range(ng)]  # per cell: centres that may reach it
    passed_n = np.zeros(ng, dtype=np.int64)
    applied = np.zeros(nb, dtype=np.int64)                # per block: passed[cell] entries applied
    sel_pts = np.empty((n_select, pts.shape[1]), dtype=np.float32)
    sel_norms = np.empty(n_select, dtype=np.float32)

    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    current = int(position[np.random.default_rng(seed).integers(n)])  # first centre: a seeded random patch
    selected = np.empty(n_select, dtype=np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_select, desc="coreset", unit="pt", leave=False)
    for step in range(n_select + 1 if return_radius else n_select):
        if step == n_select:  # one more lazy pass: the top block's farthest point gives the radius
            done = n_select
        else:
            selected[step] = current
            sel_pts[step], sel_norms[step] = pts[current], norms[current]
            if step == n_select - 1 and not return_radius:
                break
            done = step + 1
        # Lazy update: only the cell, and in it the block, with the largest upper bound is
        # brought up to date (the cell against the centres chosen since it was last
        # filtered, the block against those of them that can reach the cell), until the
        # top block is current; its farthest point is then the exact greedy choice.
        while True:
            g = int(np.argmax(cell_upper))
            if cell_applied[g] < done:
                first = int(cell_applied[g])
                near = _survivors(sel_pts, sel_norms, slice(first, done), geo.cell_centres[g], cell_norms[g],
                                  geo.cell_radii[g], cell_upper[g]) + first
                k = int(passed_n[g])
                if k + near.size > len(passed[g]):  # full: drop what all its blocks have had, then grow
                    bs, be = geo.cell_starts[g], geo.cell_ends[g]
                    used = int(applied[bs:be].min())
                    kept = passed[g][used:k]
                    applied[bs:be] -= used
                    k -= used
                    passed[g] = np.empty(max(16, 2 * (k + near.size)), dtype=np.int32)
                    passed[g][:k] = kept
                passed[g][k:k + near.size] = near
                passed_n[g] = k + near.size
                cell_applied[g] = done
            bs, be = geo.cell_starts[g], geo.cell_ends[g]
            b = int(bs + np.argmax(upper[bs:be]))
            if applied[b] == passed_n[g]:
                break
            lo, hi = starts[b], ends[b]
            cand = passed[g][applied[b]:passed_n[g]]
            near = _survivors(sel_pts, sel_norms, cand, centres[b], centre_norms[b], radii[b], upper[b])
            if near.size:
                c = cand[near]
                d2 = (norms[lo:hi, None] - 2.0 * (pts[lo:hi] @ sel_pts[c].T) + sel_norms[c][None, :]).min(1)
                np.minimum(min_sq[lo:hi], d2, out=min_sq[lo:hi])
                upper[b] = float(min_sq[lo:hi].max())
                cell_upper[g] = float(upper[bs:be].max())
            applied[b] = passed_n[g]
        if step == n_select:
            radius = float(np.sqrt(max(float(upper[b]), 0.0)))
            break
        current = int(starts[b] + np.argmax(min_sq[starts[b]:ends[b]]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return (order[selected], radius) if return_radius else order[selected]


def covering_radius(embeddings: np.ndarray, selected: np.ndarray) -> float:
    """Coreset covering radius: max over all rows of the L2 distance to the nearest selected row.

    Exact, computed with ``faiss.IndexFlatL2`` on the full (unprojected) embeddings.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x[np.asarray(selected)])
    d2, _ = index.search(x, 1)
    return float(np.sqrt(max(float(d2.max()), 0.0)))
