"""IVF: compressed, approximate candidates re-ranked exactly against the memory bank.

An inverted-file index (a coarse k-means quantizer, ``nlist`` lists) holds each bank row
as a compressed code in one of these layouts (``layout``, :data:`LAYOUTS`):

========== ================================================ ==============================
layout     FAISS class                                      code
========== ================================================ ==============================
rabitqfs   ``IndexIVFRaBitQFastScan`` (default)              1 bit a dimension (RaBitQ),
                                                            scanned 32 codes at a time
rabitq     ``IndexIVFRaBitQ``                               1 bit a dimension (RaBitQ)
pqfs       ``IndexIVFPQFastScan``                           pq_m 4-bit PQ codes, SIMD
                                                            lookup tables in registers
opq-pqfs   ``IndexPreTransform(OPQMatrix)`` + the above     the same after an OPQ rotation
pq         ``IndexIVFPQ`` (indexes before fast scan)        pq_m codes of pq_bits bits
========== ================================================ ==============================

From ``nlist`` >= :data:`HNSW_NLIST` on the coarse quantizer is ``IndexHNSWFlat`` (32
links) instead of ``IndexFlatL2``. The index is trained once on a sample of the bank; each
shard is a copy of it (``faiss.clone_index``) holding its rows with their bank-row ids
(``add_with_ids``). :class:`IVFPQSearcher` takes ``rerank * k`` candidates and re-ranks
them with exact L2 (:func:`patchsearch.searchers.rerank`), so reported distances are
exact; nprobe is tuned at build to the smallest value whose recall@9 on held-aside
patches reaches a target (:func:`tune_nprobe`), from 1 up.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .gpu_placement import GPU_MAX_K, GPU_MAX_NPROBE, check_gpu_limit
from .searchers import KnnSearcher, ShardedSearcher, faiss, rerank, shard_bounds

# Sub-quantizer counts (bytes per 8-bit code) and dimensions per sub-quantizer that
# FAISS GPU IVFPQ (GpuIndexIVFPQ) supports.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_DSUB = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
RECALL_K = 9
LAYOUTS = ("rabitqfs", "rabitq", "pqfs", "opq-pqfs", "pq")
PQ_LAYOUTS = ("pqfs", "opq-pqfs", "pq")
DEFAULT_LAYOUT = "rabitqfs"  # fastest at recall@9 >= 0.95 where measured (160k, 1.6M x 152; 1.6M x 1536): README
HNSW_NLIST = 16384  # from this nlist on, the coarse quantizer is HNSW
# nprobe is tuned to this recall@9 on held-aside training patches. Not 0.95: those are
# good patches, and test patches (defects among them) are harder to find: on bottle
# (160k x 152, rabitqfs) 0.958 on held-aside patches gave 0.946 on test patches, 0.980
# gave 0.971 (README, "Approximate search").
TARGET_RECALL = 0.97


def choose_layout(rows: int, dim: int) -> str:
    """The default layout for a bank of ``rows`` x ``dim``.

    Measured (README, "Approximate search, int8 and support sets on the Intel Xeon"):
    at 160k x 152 (real bottle patches) IVF-RaBitQ fast scan reached recall@9 0.966 at
    45x flat and was faster than 8-bit IVF-PQ in an interleaved A/B (65k vs 46k
    queries/s, same recall); at 1.6M x 152 71x flat (recall 0.961) against 56x for
    8-bit IVF-PQ; at 1.6M x 1536 124x flat (recall 0.956); 4-bit PQ fast scan (with or without OPQ) did not reach 0.95 at any
    nprobe on these patches. So every size gets ``rabitqfs``; this function is the one
    place to change when other measurements say otherwise.
    """
    return DEFAULT_LAYOUT


def auto_params(rows: int, dim: int, nlist: int | None = None, pq_m: int | None = None,
                pq_bits: int | None = None, nprobe: int | None = None, rerank: int | None = None,
                layout: str | None = None) -> dict:
    """IVF parameters for a bank of ``rows`` x ``dim``; given values are kept (and checked).

    * layout: :func:`choose_layout` (one of :data:`LAYOUTS`); ``pq`` where pq_m or pq_bits
      is given without a layout (the options of IVF-PQ indexes before layouts existed).
    * nlist: the power of two nearest 4 * sqrt(rows), at most rows / 39 (FAISS wants
      >= 39 training points per centroid), at least 1.
    * pq_m (PQ layouts only): ``pq``: the largest sub-quantizer count that FAISS GPU
      supports (``GPU_PQ_M`` with ``dim / pq_m`` in ``GPU_PQ_DSUB``) with at least 4
      dimensions per sub-quantizer (1536 -> 96 bytes a vector); where no such count
      divides ``dim`` (152 = 8 x 19), the largest divisor with at least 4 dimensions per
      sub-quantizer (152 -> 38). ``pqfs``/``opq-pqfs``: the largest even divisor with at
      least 2 dimensions per sub-quantizer (152 -> 76).
    * pq_bits (PQ layouts only): ``pq``: 8 (fewer where the bank has fewer rows than 2**8
      centroids); fast scan: 4 (the only width it has).
    * nprobe: nlist / 16 (the build then tunes it for recall from 1 up, :func:`tune_nprobe`).
    * rerank: 8 (8k candidates re-ranked exactly).

    Returns:
        {"layout", "nlist", "nprobe", "rerank"} and, for PQ layouts, "pq_m", "pq_bits".

    Raises:
        InputError: unknown layout, pq_m does not divide dim, PQ options for a RaBitQ
            layout, nlist outside [1, rows], bad bits/nprobe/rerank.
    """
    if layout is None:  # PQ options name the layout they belong to (``--index ivfpq --pq-m M`` as before layouts)
        layout = "pq" if pq_m is not None or pq_bits is not None else choose_layout(rows, dim)
    if layout not in LAYOUTS:
        raise InputError(f"--ivf-layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if nlist is None:
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows))))
        nlist = max(1, min(nlist, rows // 39 or 1))
    if not 1 <= nlist <= rows:
        raise InputError(f"--nlist {nlist} must be between 1 and the {rows} memory-bank rows")
    out = {"layout": layout, "nlist": int(nlist)}
    if layout in PQ_LAYOUTS:
        if pq_m is None and layout == "pq":
            fits = [m for m in GPU_PQ_M if dim % m == 0 and dim // m in GPU_PQ_DSUB and dim // m >= 4]
            pq_m = max(fits) if fits else max(m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= min(4, dim))
        elif pq_m is None:
            even = [m for m in range(2, dim + 1, 2) if dim % m == 0 and dim // m >= 2]
            pq_m = max(even) if even else dim
        if pq_m < 1 or dim % pq_m:
            raise InputError(f"--pq-m {pq_m} must divide the embedding dimension {dim}")
        if layout == "pq":
            pq_bits = 8 if pq_bits is None else pq_bits
            if not 1 <= pq_bits <= 16:
                raise InputError(f"--pq-bits {pq_bits} must be between 1 and 16")
            if rows < 2 ** pq_bits:
                pq_bits = max(1, int(math.log2(rows)))
        elif pq_bits not in (None, 4):
            raise InputError(f"--pq-bits {pq_bits}: the fast-scan layout {layout} has 4-bit codes only")
        out.update(pq_m=int(pq_m), pq_bits=int(pq_bits or 4))
    elif pq_m is not None or pq_bits is not None:
        raise InputError(f"--pq-m/--pq-bits apply to the PQ layouts ({', '.join(PQ_LAYOUTS)}), not {layout}")
    nprobe = max(1, nlist // 16) if nprobe is None else nprobe
    if not 1 <= nprobe <= nlist:
        raise InputError(f"--nprobe {nprobe} must be between 1 and nlist {nlist}")
    rerank = 8 if rerank is None else rerank
    if rerank < 0:
        raise InputError(f"--rerank {rerank} must be >= 0")
    out.update(nprobe=int(nprobe), rerank=int(rerank))
    return out


def factory_string(params: dict) -> str:
    """The ``faiss.index_factory`` description of a layout (e.g. ``IVF2048,RaBitQfs``)."""
    quantizer = f"IVF{params['nlist']}" + ("_HNSW32" if params["nlist"] >= HNSW_NLIST else "")
    layout = params.get("layout", "pq")
    codes = {"rabitqfs": "RaBitQfs", "rabitq": "RaBitQ", "pq": f"PQ{params.get('pq_m')}x{params.get('pq_bits')}",
             "pqfs": f"PQ{params.get('pq_m')}x4fs", "opq-pqfs": f"PQ{params.get('pq_m')}x4fs"}[layout]
    return (f"OPQ{params['pq_m']}," if layout == "opq-pqfs" else "") + f"{quantizer},{codes}"


def gpu_layout_ok(shard) -> bool:
    """True where FAISS GPU can hold this IVF shard's code layout (8-bit ``IndexIVFPQ``
    with a GPU sub-quantizer layout; fast-scan and RaBitQ layouts stay on the CPU)."""
    if type(shard).__name__ != "IndexIVFPQ":
        return False
    pq = shard.pq
    return pq.M in GPU_PQ_M and pq.dsub in GPU_PQ_DSUB and pq.nbits == 8


def gpu_options(shard) -> dict | None:
    """``GpuClonerOptions`` fields ({name: value}) an IVF shard is copied to a GPU with,
    or None where FAISS GPU cannot hold its layout (:func:`gpu_layout_ok`): IVF-PQ
    codes above 48 bytes use float16 lookup tables (``useFloat16``; FAISS GPU holds
    float32 tables for at most 48 sub-quantizers in shared memory)."""
    if not gpu_layout_ok(shard):
        return None
    return {"useFloat16": True} if shard.pq.M > 48 else {}


def sharded_searcher(shards: list, gpu: bool | None = None, gpu_ids: list[int] | None = None) -> ShardedSearcher:
    """A :class:`~patchsearch.searchers.ShardedSearcher` over IVF ``shards``, placed on
    GPUs (``gpu``, ``gpu_ids`` as there) with their layout's :func:`gpu_options`;
    layouts FAISS GPU cannot hold stay on the CPU."""
    return ShardedSearcher(shards, gpu=gpu, gpu_ids=gpu_ids, gpu_options=gpu_options(shards[0]))


def build_shards(bank: np.ndarray, shards: int, params: dict, seed: int = 0) -> list:
    """Train one IVF index of ``params["layout"]`` (:func:`factory_string`; ``pq``:
    ``faiss.IndexIVFPQ``, as before fast scan) on a seeded sample of the bank (at most
    64 x max(nlist, 256) rows) and clone it per contiguous row range, each clone holding
    its rows with their bank-row ids."""
    f = faiss()
    d = bank.shape[1]
    bounds = shard_bounds(len(bank), shards)
    layout = params.get("layout", "pq")
    if layout == "pq" and params["nlist"] < HNSW_NLIST:
        trained = f.IndexIVFPQ(f.IndexFlatL2(d), d, params["nlist"], params["pq_m"], params["pq_bits"])
        n_train = min(len(bank), 64 * max(params["nlist"], 2 ** params["pq_bits"]))
    else:
        trained = f.index_factory(d, factory_string(params))
        n_train = min(len(bank), 64 * max(params["nlist"], 256))
    ivf = f.extract_index_ivf(trained)
    ivf.cp.seed = seed
    if hasattr(ivf, "pq"):
        ivf.pq.cp.seed = seed
    sample = np.sort(np.random.default_rng(seed).choice(len(bank), n_train, replace=False))
    trained.train(np.ascontiguousarray(bank[sample], dtype=np.float32))
    out = []
    for start, stop in bounds:
        index = f.clone_index(trained)
        for s in range(start, stop, 262144):  # bounded-memory adds
            e = min(stop, s + 262144)
            index.add_with_ids(np.ascontiguousarray(bank[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
        f.extract_index_ivf(index).nprobe = params["nprobe"]
        out.append(index)
    return out


class IVFPQSearcher:
    """IVF candidates (any :data:`LAYOUTS`) re-ranked with exact L2
    (:class:`~patchsearch.searchers.Searcher`).

    Args:
        sharded: a :class:`ShardedSearcher` over IVF shards.
        bank: float32 (M, d) memory bank (for re-ranking).
        params: the IVF parameters (:func:`auto_params`); ``nprobe`` is applied. Without
            ``layout`` (indexes built before layouts): ``pq``.
    """

    def __init__(self, sharded: ShardedSearcher, bank: np.ndarray, params: dict):
        self.sharded = sharded
        self.bank = bank
        self.params = dict(params)
        self.params.setdefault("layout", "pq")
        self.set_nprobe(self.params["nprobe"])

    def set_nprobe(self, nprobe: int) -> None:
        """Inverted lists visited per query.

        Raises:
            InputError: nprobe outside [1, nlist]; on GPUs above
                :data:`patchsearch.gpu_placement.GPU_MAX_NPROBE`.
        """
        if not 1 <= nprobe <= self.params["nlist"]:
            raise InputError(f"--nprobe {nprobe} must be between 1 and nlist {self.params['nlist']}")
        if self.sharded.on_gpu:
            check_gpu_limit("nprobe", nprobe, GPU_MAX_NPROBE)
        self.params["nprobe"] = int(nprobe)
        for s in self.sharded.placed:
            ivf = faiss().try_extract_index_ivf(s)
            (ivf if ivf is not None else s).nprobe = int(nprobe)

    @property
    def max_nprobe(self) -> int:
        """The largest nprobe this searcher takes: nlist, at most
        :data:`~patchsearch.gpu_placement.GPU_MAX_NPROBE` on GPUs."""
        return min(self.params["nlist"], GPU_MAX_NPROBE) if self.sharded.on_gpu else self.params["nlist"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared L2 of the best k among ``rerank * k`` candidates (code distances with rerank 0).

        Raises:
            InputError: on GPUs, more than :data:`~patchsearch.gpu_placement.GPU_MAX_K`
                candidates (``rerank * k``) or neighbours (``k``).
        """
        r = self.params.get("rerank", 0)
        if r <= 0:
            return self.sharded.search(queries, k)
        c = min(len(self.bank), k * r)
        if self.sharded.on_gpu:
            check_gpu_limit("k", k)
            check_gpu_limit("rerank * k", c, GPU_MAX_K, f"use rerank <= {max(1, GPU_MAX_K // k)} for k = {k}")
        _, cand = self.sharded.search(queries, c)
        return rerank(queries, self.bank, cand, k)


def exact_neighbours(bank: np.ndarray, queries: np.ndarray, self_excluded: bool) -> np.ndarray:
    """int64 (n, k) rows of the exact k = 9 nearest bank rows of each query (``faiss.knn``,
    squared L2); with ``self_excluded`` the queries are bank rows and their own row
    (distance 0) is left out."""
    k = min(RECALL_K, len(bank) - int(self_excluded))
    extra = int(self_excluded)
    return KnnSearcher(bank).search(queries, k + extra)[1][:, extra:]


def recall_at_k(searcher, bank: np.ndarray, queries: np.ndarray, self_excluded: bool,
                truth: np.ndarray | None = None) -> float:
    """Fraction of the exact k = 9 nearest bank rows (``faiss.knn``) that ``searcher`` finds.

    With ``self_excluded`` the queries are bank rows and their own row (distance 0) is
    left out on both sides. ``truth``: :func:`exact_neighbours` of the same queries, when
    already computed (tuning measures many nprobe values against one exact search).
    """
    if truth is None:
        truth = exact_neighbours(bank, queries, self_excluded)
    k, extra = truth.shape[1], int(self_excluded)
    got = searcher.search(queries, k + extra)[1][:, extra:]
    hits = sum(len(np.intersect1d(t, g)) for t, g in zip(truth, got))
    return hits / (len(queries) * k)


def held_aside(rows: int, seed: int = 0) -> np.ndarray:
    """int64 sorted seeded bank rows held aside for tuning when no held-aside patches are
    given: min(1000, rows / 10), at least 1."""
    n = min(1000, max(1, rows // 10))
    return np.sort(np.random.default_rng(seed).choice(rows, n, replace=False)).astype(np.int64)


def _without(found: np.ndarray, held: np.ndarray, k: int) -> np.ndarray:
    """The first k entries of each row of ``found`` (int64 (n, w)) that are not in ``held``."""
    keep = ~np.isin(found, held)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in their order
    return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(found, order, 1), -1)


def held_aside_recall(searcher: IVFPQSearcher, bank: np.ndarray, held: np.ndarray) -> tuple:
    """recall@9 of bank rows ``held`` as if they were not in the bank: they are left out of
    the exact neighbours and of the IVF candidates (before re-ranking, so each query keeps
    its ``rerank * k`` candidates).

    Returns:
        (recall function of the searcher's current nprobe, the exact int64 (n, k) neighbours).
    """
    queries = np.ascontiguousarray(bank[held], dtype=np.float32)
    k = min(RECALL_K, len(bank) - len(held))
    extra = min(len(bank), k + 16)
    while True:
        truth = _without(KnnSearcher(bank).search(queries, extra)[1], held, k)
        if (truth >= 0).all() or extra == len(bank):
            break
        extra = min(len(bank), extra * 2)

    def recall() -> float:
        want = k * searcher.params["rerank"] if searcher.params.get("rerank", 0) > 0 else k
        cand = _without(searcher.sharded.search(queries, min(len(bank), want + 16))[1], held, want)
        got = rerank(queries, bank, cand, k)[1] if want > k else cand  # -1 (held rows left out) only at row ends
        return sum(len(np.intersect1d(t, g[g >= 0])) for t, g in zip(truth, got)) / truth.size

    return recall, truth


def tune_nprobe(searcher: IVFPQSearcher, queries: np.ndarray | None, target: float, tune: bool,
                seed: int = 0) -> dict:
    """Measure recall@9 and, with ``tune``, set nprobe to the smallest value reaching ``target``.

    Tuning starts from nprobe 1 and doubles it until recall@9 reaches ``target`` (or
    nprobe = nlist), then bisects between the last two values (recall grows with nprobe).

    Args:
        queries: float32 (n, d) held-aside patches (not in the bank), or None: bank rows
            held aside (:func:`held_aside`), left out of both the exact and the IVF
            neighbours while measuring (:func:`held_aside_recall`).

    Returns:
        the searcher's parameters with ``recall_at_9``, ``recall_queries`` and
        ``recall_queries_kind`` added.
    """
    bank = searcher.bank
    if queries is None:
        held = held_aside(len(bank), seed)
        measure, truth = held_aside_recall(searcher, bank, held)
        kind = "bank rows held aside"
    else:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        truth = exact_neighbours(bank, queries, False)  # once, not once per nprobe tried
        kind = "held-aside"

        def measure() -> float:
            return recall_at_k(searcher, bank, queries, False, truth)

    def recall_at(nprobe: int) -> float:
        searcher.set_nprobe(nprobe)
        return measure()

    if tune:
        top = searcher.max_nprobe  # nlist; on GPUs at most GPU_MAX_NPROBE
        lo, hi = 0, 1  # recall(lo) < target (or lo = 0); recall(hi) >= target or hi = top
        while hi < top and recall_at(hi) < target:
            lo, hi = hi, min(top, hi * 2)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if recall_at(mid) >= target else (mid, hi)
        searcher.set_nprobe(hi)
    r = measure()
    searcher.params.update({"recall_at_9": round(r, 5), "recall_queries": len(truth), "recall_queries_kind": kind})
    return dict(searcher.params)
