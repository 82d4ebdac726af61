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


def _blocks(points: np.ndarray, num_blocks: int, seed: int, chunk: int = 16384):
    """k-means blocks: (order, starts, sizes, centres (B, d) float32, radii (B,) float64,
    the points in block order).

    float32 throughout, no N-sized float64 temporary: the block means are float32 (the
    pruning stays exact with any centre, as each radius is measured from its own centre),
    the per-point squared distances to their centre are computed chunk by chunk.
    """
    import faiss

    n, d = points.shape
    num_blocks = max(1, min(num_blocks, n // 8 or 1))
    if num_blocks == 1:
        assign = np.zeros(n, dtype=np.int64)
    else:
        km = faiss.Kmeans(d, num_blocks, niter=8, seed=seed, max_points_per_centroid=64, verbose=False)
        km.train(points)
        _, assign = km.index.search(points, 1)
        assign = assign[:, 0]
    order = np.argsort(assign, kind="stable")
    sizes = np.bincount(assign, minlength=num_blocks)
    del assign
    keep = sizes > 0
    sizes = sizes[keep]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sorted_pts = points[order]
    # float32 block means: any centre gives valid bounds, as the radii are measured from it
    centres = (np.add.reduceat(sorted_pts, starts, axis=0) / sizes[:, None].astype(np.float32)).astype(np.float32)
    block = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    sq = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk):
        diff = sorted_pts[s:s + chunk] - centres[block[s:s + chunk]]
        sq[s:s + len(diff)] = np.einsum("ij,ij->i", diff, diff)
    radii = np.sqrt(np.maximum.reduceat(sq, starts).astype(np.float64)) * (1 + 1e-6)  # float32 rounding
    return order, starts, sizes, centres, radii, sorted_pts


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
        num_blocks: number of pruning blocks (default about N / 256).
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

    order, starts, sizes, centres, radii, pts = _blocks(points, num_blocks or max(1, n // 256), seed)
    del points                                            # pts: the same, block-contiguous
    norms = np.einsum("ij,ij->i", pts, pts)
    centre_norms = np.einsum("ij,ij->i", centres, centres)
    nb = len(sizes)
    ends = starts + sizes
    min_sq = np.full(n, np.inf, dtype=np.float32)         # squared distance to the selection
    upper = np.full(nb, np.inf)                           # >= max of min_sq over each block
    applied = np.zeros(nb, dtype=np.int64)                # selected centres already applied per block
    sel_pts = np.empty((n_select, pts.shape[1]), dtype=np.float32)
    sel_norms = np.empty(n_select, dtype=np.float32)
    margin = 1e-4

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
        # Lazy update: only the block with the largest upper bound is brought up to date
        # (against the centres chosen since its last update that can reach it), until the
        # top block is current; its farthest point is then the exact greedy choice.
        while True:
            b = int(np.argmax(upper))
            if applied[b] == done:
                break
            lo, hi = starts[b], ends[b]
            cand = slice(int(applied[b]), done)
            dc = np.sqrt(np.maximum(sel_norms[cand] - 2.0 * (sel_pts[cand] @ centres[b]) + centre_norms[b], 0.0))
            gap = dc - radii[b]
            near = np.nonzero((gap <= 0) | (gap * gap * (1 - margin) < upper[b]))[0]
            if near.size:
                c = sel_pts[cand][near]
                d2 = (norms[lo:hi, None] - 2.0 * (pts[lo:hi] @ c.T) + sel_norms[cand][near][None, :]).min(1)
                np.minimum(min_sq[lo:hi], d2, out=min_sq[lo:hi])
                upper[b] = float(min_sq[lo:hi].max())
            applied[b] = done
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
