"""IVF-PQ: compressed, approximate candidates re-ranked exactly against the memory bank.

``faiss.IndexIVFPQ`` (inverted lists over a coarse k-means quantizer, product-quantized
residuals) is trained once on a sample of the bank; each shard is a copy of it
(``faiss.clone_index``) holding its rows with their bank-row ids (``add_with_ids``).
:class:`IVFPQSearcher` takes ``rerank * k`` candidates and re-ranks them with exact L2
(:func:`patchsearch.searchers.rerank`), so reported distances are exact; nprobe is
raised at build until recall@9 on held-aside patches reaches a target (:func:`tune_nprobe`).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .searchers import KnnSearcher, ShardedSearcher, faiss, rerank, shard_bounds

# Sub-quantizer counts (bytes per 8-bit code) and dimensions per sub-quantizer that
# FAISS GPU IVFPQ (GpuIndexIVFPQ) supports.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_DSUB = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
RECALL_K = 9


def auto_params(rows: int, dim: int, nlist: int | None = None, pq_m: int | None = None,
                pq_bits: int | None = None, nprobe: int | None = None, rerank: int | None = None) -> dict:
    """IVF-PQ parameters for a bank of ``rows`` x ``dim``; given values are kept (and checked).

    * nlist: the power of two nearest 4 * sqrt(rows), at most rows / 39 (FAISS wants
      >= 39 training points per centroid), at least 1.
    * pq_m: the largest sub-quantizer count that FAISS GPU supports (``GPU_PQ_M`` with
      ``dim / pq_m`` in ``GPU_PQ_DSUB``) with at least 4 dimensions per sub-quantizer
      (1536 -> 96 bytes a vector). Where no such count divides ``dim`` (152 = 8 x 19),
      the largest divisor with at least 4 dimensions per sub-quantizer (152 -> 38).
    * pq_bits: 8 (fewer where the bank has fewer rows than 2**8 centroids).
    * nprobe: nlist / 16 (the build then raises it for recall, :func:`tune_nprobe`).
    * rerank: 8 (8k candidates re-ranked exactly).

    Raises:
        InputError: pq_m does not divide dim, nlist outside [1, rows], bad bits/nprobe/rerank.
    """
    if nlist is None:
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows))))
        nlist = max(1, min(nlist, rows // 39 or 1))
    if not 1 <= nlist <= rows:
        raise InputError(f"--nlist {nlist} must be between 1 and the {rows} memory-bank rows")
    if pq_m is None:
        fits = [m for m in GPU_PQ_M if dim % m == 0 and dim // m in GPU_PQ_DSUB and dim // m >= 4]
        pq_m = max(fits) if fits else max(m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= min(4, dim))
    if pq_m < 1 or dim % pq_m:
        raise InputError(f"--pq-m {pq_m} must divide the embedding dimension {dim}")
    pq_bits = 8 if pq_bits is None else pq_bits
    if not 1 <= pq_bits <= 16:
        raise InputError(f"--pq-bits {pq_bits} must be between 1 and 16")
    if rows < 2 ** pq_bits:
        pq_bits = max(1, int(math.log2(rows)))
    nprobe = max(1, nlist // 16) if nprobe is None else nprobe
    if not 1 <= nprobe <= nlist:
        raise InputError(f"--nprobe {nprobe} must be between 1 and nlist {nlist}")
    rerank = 8 if rerank is None else rerank
    if rerank < 0:
        raise InputError(f"--rerank {rerank} must be >= 0")
    return {"nlist": int(nlist), "pq_m": int(pq_m), "pq_bits": int(pq_bits), "nprobe": int(nprobe),
            "rerank": int(rerank)}


def gpu_layout_ok(shard) -> bool:
    """True where FAISS GPU can hold this IVF-PQ shard's code layout."""
    pq = shard.pq
    return pq.M in GPU_PQ_M and pq.dsub in GPU_PQ_DSUB and pq.nbits == 8


def build_shards(bank: np.ndarray, shards: int, params: dict, seed: int = 0) -> list:
    """Train one ``faiss.IndexIVFPQ`` on a seeded sample of the bank (at most
    64 x max(nlist, 2**pq_bits) rows) and clone it per contiguous row range, each
    clone holding its rows with their bank-row ids."""
    f = faiss()
    d = bank.shape[1]
    bounds = shard_bounds(len(bank), shards)
    trained = f.IndexIVFPQ(f.IndexFlatL2(d), d, params["nlist"], params["pq_m"], params["pq_bits"])
    trained.cp.seed = seed
    trained.pq.cp.seed = seed
    n_train = min(len(bank), 64 * max(params["nlist"], 2 ** params["pq_bits"]))
    sample = np.sort(np.random.default_rng(seed).choice(len(bank), n_train, replace=False))
    trained.train(np.ascontiguousarray(bank[sample], dtype=np.float32))
    out = []
    for start, stop in bounds:
        index = f.clone_index(trained)
        for s in range(start, stop, 262144):  # bounded-memory adds
            e = min(stop, s + 262144)
            index.add_with_ids(np.ascontiguousarray(bank[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
        index.nprobe = params["nprobe"]
        out.append(index)
    return out


class IVFPQSearcher:
    """IVF-PQ candidates re-ranked with exact L2 (:class:`~patchsearch.searchers.Searcher`).

    Args:
        sharded: a :class:`ShardedSearcher` over IVF-PQ shards.
        bank: float32 (M, d) memory bank (for re-ranking).
        params: the IVF-PQ parameters (:func:`auto_params`); ``nprobe`` is applied.
    """

    def __init__(self, sharded: ShardedSearcher, bank: np.ndarray, params: dict):
        self.sharded = sharded
        self.bank = bank
        self.params = dict(params)
        self.set_nprobe(self.params["nprobe"])

    def set_nprobe(self, nprobe: int) -> None:
        """Inverted lists visited per query.

        Raises:
            InputError: nprobe outside [1, nlist].
        """
        if not 1 <= nprobe <= self.params["nlist"]:
            raise InputError(f"--nprobe {nprobe} must be between 1 and nlist {self.params['nlist']}")
        self.params["nprobe"] = int(nprobe)
        for s in self.sharded.placed:
            ivf = faiss().try_extract_index_ivf(s)
            (ivf if ivf is not None else s).nprobe = int(nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared L2 of the best k among ``rerank * k`` candidates (PQ distances with rerank 0)."""
        if self.params.get("rerank", 0) <= 0:
            return self.sharded.search(queries, k)
        _, cand = self.sharded.search(queries, min(len(self.bank), k * self.params["rerank"]))
        return rerank(queries, self.bank, cand, k)


def recall_at_k(searcher, bank: np.ndarray, queries: np.ndarray, self_excluded: bool) -> float:
    """Fraction of the exact k = 9 nearest bank rows (``faiss.knn``) that ``searcher`` finds.

    With ``self_excluded`` the queries are bank rows and their own row (distance 0) is
    left out on both sides.
    """
    k = min(RECALL_K, len(bank) - int(self_excluded))
    extra = int(self_excluded)
    truth = KnnSearcher(bank).search(queries, k + extra)[1][:, extra:]
    got = searcher.search(queries, k + extra)[1][:, extra:]
    hits = sum(len(np.intersect1d(t, g)) for t, g in zip(truth, got))
    return hits / (len(queries) * k)


def tune_nprobe(searcher: IVFPQSearcher, queries: np.ndarray | None, target: float, tune: bool,
                seed: int = 0) -> dict:
    """Measure recall@9 and, with ``tune``, double nprobe until it reaches ``target``.

    Args:
        queries: float32 (n, d) held-aside patches (not in the bank), or None: 1000
            seeded bank rows, themselves excluded.

    Returns:
        the searcher's parameters with ``recall_at_9``, ``recall_queries`` and
        ``recall_queries_kind`` added.
    """
    bank = searcher.bank
    self_excluded = queries is None
    if self_excluded:
        pick = np.random.default_rng(seed).choice(len(bank), min(1000, len(bank)), replace=False)
        queries = bank[np.sort(pick)]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    r = recall_at_k(searcher, bank, queries, self_excluded)
    while tune and r < target and searcher.params["nprobe"] < searcher.params["nlist"]:
        searcher.set_nprobe(min(searcher.params["nlist"], searcher.params["nprobe"] * 2))
        r = recall_at_k(searcher, bank, queries, self_excluded)
    searcher.params.update({"recall_at_9": round(r, 5), "recall_queries": len(queries),
                            "recall_queries_kind": "bank rows (self excluded)" if self_excluded else "held-aside"})
    return dict(searcher.params)
