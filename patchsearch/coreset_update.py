"""Continuing greedy k-center over a grown bank (``patchsearch add``, ``remove``).

:func:`cover` extends a coreset (:func:`patchsearch.coreset.kcenter_greedy`) so that new
candidates end up within its covering radius, picking as the greedy rule picks.
"""

from __future__ import annotations

import numpy as np

from .searchers import faiss

REL_TOL = 1e-4  # relative slack on the covering radius for float32 rounding of distances


def cover(bank: np.ndarray, candidates: np.ndarray, radius: float) -> tuple[np.ndarray, float]:
    """Continue greedy k-center until every candidate is within ``radius`` of the bank.

    Args:
        bank: float32 (M, p) points already selected (M may be 0), in the coreset's space.
        candidates: float32 (n, p) points that must end up covered.
        radius: covering radius r (L2, not squared).

    Returns:
        (int64 indices into ``candidates`` that join the bank, in selection order: each was
        the farthest candidate from the bank and the candidates picked before it, at
        distance > r * (1 + REL_TOL); the largest distance of a candidate to the extended
        bank afterwards, L2).
    """
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)
    n = len(candidates)
    if n == 0:
        return np.empty(0, np.int64), 0.0
    if len(bank):
        min_sq = faiss().knn(candidates, np.ascontiguousarray(bank, dtype=np.float32), 1)[0][:, 0]
        min_sq = np.maximum(min_sq.astype(np.float64), 0.0)
    else:
        min_sq = np.full(n, np.inf)
    limit = (radius * (1 + REL_TOL)) ** 2
    active = np.nonzero(min_sq > limit)[0]  # only uncovered candidates can be picked
    pts = candidates[active].astype(np.float64)  # the uncovered ones, compacted as they get covered
    norms = np.einsum("ij,ij->i", pts, pts)
    dist = min_sq[active]
    picked = []
    while active.size:
        j = int(np.argmax(dist))
        if dist[j] <= limit:
            break
        picked.append(int(active[j]))
        c = pts[j].copy()
        np.minimum(dist, np.maximum(norms - 2.0 * (pts @ c) + c @ c, 0.0), out=dist)
        dist[j] = 0.0
        keep = dist > limit
        if 2 * np.count_nonzero(keep) < len(keep):  # compact once half are covered
            active, pts, norms, dist = active[keep], pts[keep], norms[keep], dist[keep]
    if picked:  # the largest remaining distance: to the bank before, or to a picked candidate
        rest = faiss().knn(candidates, candidates[np.asarray(picked, dtype=np.int64)], 1)[0][:, 0]
        min_sq = np.minimum(min_sq, np.maximum(rest.astype(np.float64), 0.0))
    return np.asarray(picked, dtype=np.int64), float(np.sqrt(min_sq.max()))
