"""Support sets N_b(m) of a memory bank kept exact after an update (``patchsearch add``,
``remove``): only the rows whose support can have changed are recomputed."""

from __future__ import annotations

import numpy as np

from .bank import B, exact_support_sets, support_from_neighbours
from .coreset_update import REL_TOL
from .searchers import KnnSearcher, faiss


def support_rows(bank: np.ndarray, rows: np.ndarray, b: int) -> np.ndarray:
    """Exact N_b(m) of the given bank rows, computed as :func:`~patchsearch.bank.exact_support_sets`
    computes them (faiss.knn; at least 20 queries per call, FAISS's BLAS path)."""
    searcher = KnnSearcher(bank)
    m = len(bank)
    out = np.empty((len(rows), b), dtype=np.int64)
    for s in range(0, len(rows), 4096):
        part = rows[s:s + 4096]
        q = part if len(part) >= 20 else np.concatenate([part, np.repeat(part[:1], 20 - len(part))])
        _, nn = searcher.search(bank[q], min(b + 1, m))
        out[s:s + len(part)] = support_from_neighbours(part, nn[:len(part)], b)
    return out


def support_width(old: np.ndarray, rows: int) -> int:
    """b of the support sets to keep: B where the old ones were B wide or clipped to a bank
    smaller than B, else their own width."""
    return B if old.shape[1] == min(B, rows) else int(old.shape[1])


def support_after_add(old: np.ndarray | None, bank: np.ndarray, start: int) -> tuple[np.ndarray | None, int]:
    """Support sets of the bank after rows ``start..`` were appended, exact: the old rows whose
    b-th support member is no nearer than their nearest new row (with float32 slack) and the
    new rows are recomputed; the others cannot have changed. Returns (support sets or None,
    old rows recomputed)."""
    if old is None:
        return None, 0
    m = len(bank)
    b = min(support_width(old, start), m)
    if old.shape[1] != b or start == 0:
        return exact_support_sets(bank, KnnSearcher(bank), b), start
    if m == start:
        return np.asarray(old), 0
    prev = bank[:start]
    last = prev[np.asarray(old[:, -1])]
    kth = np.einsum("ij,ij->i", prev - last, prev - last)
    near = faiss().knn(prev, np.ascontiguousarray(bank[start:]), 1)[0][:, 0]
    redo = np.nonzero(near <= kth * (1 + 4 * REL_TOL) + 1e-6)[0]
    out = np.empty((m, b), dtype=np.int64)
    out[:start] = old
    rows = np.concatenate([redo, np.arange(start, m)]).astype(np.int64)
    out[rows] = support_rows(bank, rows, b)
    return out, len(redo)
