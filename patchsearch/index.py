"""Sharded FAISS indexes over the memory bank, and exact re-ranking.

Index types:

* ``flat``: ``faiss.IndexFlatL2`` (exact squared L2). The bank is split into
  contiguous row ranges, one index per shard, searched together through
  ``faiss.IndexShards(successive_ids=True)``, so returned ids are memory-bank rows.
* ``ivfpq``: ``faiss.IndexIVFPQ`` (inverted lists over a coarse k-means quantizer,
  product-quantized residuals). One index is trained on a sample of the bank; each
  shard is a copy of it (``faiss.clone_index``) holding its rows with their bank-row
  ids (``add_with_ids``), searched through ``IndexShards(successive_ids=False)``.
  Candidates are re-ranked with exact L2 distances against the memory bank
  (:func:`rerank`), so reported distances are exact.

Where faiss has GPUs (``faiss.get_num_gpus() > 0``) each shard is copied to a GPU
(``faiss.index_cpu_to_gpu``), round-robin over the devices.

On CPU, exact (flat) search can run as an int8 candidate pass (``torch._int_mm``,
about 4x the fp32 matmul rate on CPUs with VNNI) followed by exact fp32 re-ranking
of the candidates and a per-query check that falls back to ``faiss.IndexFlatL2``
(:class:`Int8Flat`).

All distances here are squared L2; callers take the square root.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import IndexFormatError, InputError

INDEX_TYPES = ("flat", "ivfpq")
# Sub-quantizer counts (bytes per 8-bit code) and dimensions per sub-quantizer that
# FAISS GPU IVFPQ (GpuIndexIVFPQ) supports.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_DSUB = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)


def _faiss():
    import faiss

    return faiss


def num_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """Split ``rows`` into ``shards`` contiguous, near-equal [start, stop) ranges.

    Raises:
        InputError: shards < 1 or more shards than rows.
    """
    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    if shards > rows:
        raise InputError(f"--shards {shards} is more than the {rows} memory-bank rows")
    edges = np.linspace(0, rows, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def auto_ivfpq_params(rows: int, dim: int, nlist: int | None = None, pq_m: int | None = None,
                      pq_bits: int | None = None, nprobe: int | None = None, rerank: int | None = None) -> dict:
    """IVF-PQ parameters for a bank of ``rows`` x ``dim``; given values are kept (and checked).

    * nlist: the power of two nearest 4 * sqrt(rows), at most rows / 39 (FAISS wants
      >= 39 training points per centroid), at least 1.
    * pq_m: the largest sub-quantizer count that FAISS GPU supports (``GPU_PQ_M`` with
      ``dim / pq_m`` in ``GPU_PQ_DSUB``) with at least 4 dimensions per sub-quantizer
      (1536 -> 96 bytes a vector, 1/64 of flat). Where no such count divides ``dim``
      (152 = 8 x 19), the largest divisor with at least 4 dimensions per sub-quantizer
      (152 -> 38), and ``gpu_compatible`` is False: such shards stay on the CPU.
    * pq_bits: 8.
    * nprobe: nlist / 16 (the build then tunes it for recall, see :func:`tune_nprobe`).
    * rerank: 8 (8k candidates re-ranked exactly).

    Raises:
        InputError: pq_m does not divide dim, nlist outside [1, rows], bad bits/nprobe.
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
    gpu_ok = pq_m in GPU_PQ_M and dim // pq_m in GPU_PQ_DSUB
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
            "rerank": int(rerank), "gpu_compatible": bool(gpu_ok and pq_bits == 8)}


def build_shards(bank: np.ndarray, shards: int = 1, index_type: str = "flat", params: dict | None = None,
                 seed: int = 0, train_size: int | None = None) -> list:
    """CPU FAISS indexes over the memory bank, one per contiguous row range.

    Args:
        bank: float32 (M, d) memory bank.
        shards: number of shards.
        index_type: ``"flat"`` or ``"ivfpq"``.
        params: IVF-PQ parameters (:func:`auto_ivfpq_params`).
        seed: seeds the IVF-PQ training sample and k-means.
        train_size: IVF-PQ training sample size (default min(M, 64 * max(nlist, 2**pq_bits))).

    Returns:
        list of faiss indexes; shard i holds rows ``shard_bounds(M, shards)[i]``
        (flat: as ids 0.. within the shard; ivfpq: with their bank-row ids).
    """
    if index_type not in INDEX_TYPES:
        raise InputError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
    faiss = _faiss()
    bounds = shard_bounds(len(bank), shards)
    d = bank.shape[1]
    if index_type == "flat":
        out = []
        for start, stop in bounds:
            index = faiss.IndexFlatL2(d)
            index.add(np.ascontiguousarray(bank[start:stop], dtype=np.float32))
            out.append(index)
        return out
    p = params or auto_ivfpq_params(len(bank), d)
    trained = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, p["nlist"], p["pq_m"], p["pq_bits"])
    trained.cp.seed = seed
    trained.pq.cp.seed = seed
    n_train = min(len(bank), train_size or 64 * max(p["nlist"], 2 ** p["pq_bits"]))
    sample = np.sort(np.random.default_rng(seed).choice(len(bank), n_train, replace=False))
    trained.train(np.ascontiguousarray(bank[sample], dtype=np.float32))
    out = []
    for start, stop in bounds:
        index = faiss.clone_index(trained)
        for s in range(start, stop, 262144):  # bounded-memory adds
            e = min(stop, s + 262144)
            index.add_with_ids(np.ascontiguousarray(bank[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
        index.nprobe = p["nprobe"]
        out.append(index)
    return out


def index_memory_bytes(index) -> int:
    """Serialized size of a faiss index in bytes (its memory footprint on CPU)."""
    return int(_faiss().serialize_index(index).size)


class ShardedSearcher:
    """Searches a list of shards as one index (``faiss.IndexShards``).

    Args:
        shards: CPU faiss indexes from :func:`build_shards`.
        gpu: place shards on GPUs; None = when ``num_gpus() > 0``.
        float16: IVF-PQ on GPU: float16 lookup tables (needed by FAISS for codes of
            more than 48 bytes); flat on GPU: float16 storage.
    """

    def __init__(self, shards: list, gpu: bool | None = None, float16: bool = False):
        faiss = _faiss()
        self.cpu_shards = shards
        self.is_ivf = faiss.try_extract_index_ivf(shards[0]) is not None
        ngpu = num_gpus()
        self.on_gpu = bool(ngpu) if gpu is None else bool(gpu and ngpu)
        if self.is_ivf and self.on_gpu:
            pq = shards[0].pq
            if pq.M not in GPU_PQ_M or pq.dsub not in GPU_PQ_DSUB or pq.nbits != 8:
                self.on_gpu = False  # FAISS GPU cannot hold this PQ layout: search it on the CPU
        self._resources = []
        placed = shards
        if self.on_gpu:
            co = faiss.GpuClonerOptions()
            co.useFloat16 = float16
            if self.is_ivf:
                co.useFloat16LookupTables = float16 or shards[0].pq.M > 48
            self._resources = [faiss.StandardGpuResources() for _ in range(ngpu)]
            placed = [faiss.index_cpu_to_gpu(self._resources[i % ngpu], i % ngpu, s, co)
                      for i, s in enumerate(shards)]
        self._placed = placed
        if len(placed) == 1:
            self.index = placed[0]
        else:
            # threaded=True runs GPU shards concurrently; on CPU each shard already
            # uses every core through OpenMP, so shards run one after the other.
            self.index = faiss.IndexShards(shards[0].d, self.on_gpu, not self.is_ivf)
            for s in placed:
                self.index.add_shard(s)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_nprobe(self, nprobe: int) -> None:
        """IVF: number of inverted lists visited per query."""
        faiss = _faiss()
        for s in self._placed:
            ivf = faiss.try_extract_index_ivf(s)
            if ivf is not None:
                ivf.nprobe = int(nprobe)
            elif hasattr(s, "nprobe"):
                s.nprobe = int(nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest memory-bank rows of each query.

        Args:
            queries: float32 (n, d).
            k: neighbours per query, 1 <= k <= ntotal.

        Returns:
            (squared L2 distances float32 (n, k), memory-bank rows int64 (n, k)), nearest
            first (IVF-PQ: approximate distances; -1 rows where fewer than k were found).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(queries, k)


def rerank(queries: np.ndarray, bank: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest among candidate bank rows (``faiss.knn_L2sqr_by_idx``).

    Args:
        queries: float32 (n, d).
        bank: float32 (M, d) C-contiguous memory bank (a memory map is fine).
        candidates: int64 (n, c) bank rows per query, -1 only at the end of a row.
        k: neighbours to keep, k <= c.

    Returns:
        (exact squared L2 float32 (n, k), bank rows int64 (n, k)), ascending; -1 rows
        (and float max distances) where a query has fewer than k candidates.
    """
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.int64)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    n, c = candidates.shape
    dist = np.empty((n, k), np.float32)
    rows = np.empty((n, k), np.int64)
    faiss.knn_L2sqr_by_idx(faiss.swig_ptr(queries), faiss.swig_ptr(bank), faiss.swig_ptr(candidates),
                           queries.shape[1], n, len(bank), c, k, faiss.swig_ptr(dist), faiss.swig_ptr(rows), c)
    return dist, rows


def cpu_has_int8_dot() -> bool:
    """True where the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


class Int8Flat:
    """Exact-result k-NN over a bank: an int8 candidate pass, exact fp32 re-ranking, and a check.

    1. Bank and queries are centred on the bank mean and quantized to int8 with one
       scale per row (s = max|x| / 127). ``||b||^2 - 2 q.b`` is computed from one int8
       matmul per query chunk (``torch._int_mm``, int32 accumulation, exact; on CPUs with
       VNNI about 4x the fp32 matmul rate) and the ``candidates`` smallest are kept.
    2. The candidates are re-ranked with exact fp32 L2 computed on the differences
       (:func:`rerank`), which is more accurate than the ``||x||^2 - 2 x.y + ||y||^2``
       expansion that FAISS and torch use.
    3. Check: rounding to nearest leaves each dot product with an error of standard
       deviation ``sigma = sqrt((||b||^2 s_q^2 + ||q||^2 s_b^2) / 12)``. If the exact k-th
       squared distance is below ``||q||^2 +`` the largest candidate value minus
       ``2 * 7 sigma`` (bank-wide maxima of ||b|| and s_b), no row outside the
       candidates is closer unless its rounding error exceeds 7 standard deviations;
       other queries are searched again exactly with ``faiss.IndexFlatL2``.

    Args:
        bank: float32 (M, d) memory bank.
        fallback: a searcher with ``search(queries, k)`` giving exact results.
        candidates: candidate count per query (>= k + 1).
        chunk: queries per int8 matmul (bounds the (chunk, M) score matrix).
    """

    SIGMAS = 7.0

    def __init__(self, bank: np.ndarray, fallback, candidates: int = 32, chunk: int = 1024):
        import torch

        self.bank = bank
        self.fallback = fallback
        self.candidates = candidates
        self.chunk = chunk
        m, d = bank.shape
        self.mean = torch.from_numpy(np.asarray(bank, dtype=np.float64).mean(0).astype(np.float32))
        self.norms = torch.empty(m)
        self.scale = torch.empty(m)
        codes = torch.empty((m, d), dtype=torch.int8)
        for s in range(0, m, 65536):  # chunked: no float copy of the whole bank
            b = torch.from_numpy(np.array(bank[s:s + 65536], dtype=np.float32)) - self.mean
            self.norms[s:s + len(b)] = (b * b).sum(1)
            self.scale[s:s + len(b)] = b.abs().amax(1).clamp_min(1e-30) / 127
            codes[s:s + len(b)] = torch.round(b / self.scale[s:s + len(b), None]).to(torch.int8)
        self.codes_t = codes.T.contiguous()  # (d, M)
        del codes
        self.max_norm_sq = float(self.norms.max())
        self.max_scale = float(self.scale.max())
        self.fallbacks = 0  # queries that failed the check (for benchmarks)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Same contract as :meth:`ShardedSearcher.search`; distances are exact squared L2."""
        import torch

        n = len(queries)
        c = min(max(self.candidates, k + 1), len(self.bank))
        dist = np.empty((n, k), np.float32)
        rows = np.empty((n, k), np.int64)
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        with torch.no_grad():
            for s in range(0, n, self.chunk):
                q = q_all[s:s + self.chunk] - self.mean
                sq = q.abs().amax(1).clamp_min(1e-30) / 127
                codes = torch.round(q / sq[:, None]).to(torch.int8)
                approx = torch._int_mm(codes, self.codes_t).float()
                approx.mul_((-2 * sq)[:, None]).mul_(self.scale[None, :]).add_(self.norms)
                cand_d, cand = approx.topk(c, dim=1, largest=False, sorted=False)
                del approx
                d2, r = rerank(queries[s:s + self.chunk], self.bank, cand.numpy(), k)
                if c < len(self.bank):
                    qn = (q * q).sum(1)
                    sigma = ((self.max_norm_sq * sq * sq + qn * self.max_scale ** 2) / 12).sqrt()
                    bound = (cand_d.max(1).values + qn - 2 * self.SIGMAS * sigma).numpy()
                    bad = np.nonzero(d2[:, -1] > bound)[0]
                    if bad.size:
                        self.fallbacks += int(bad.size)
                        d2[bad], r[bad] = self.fallback.search(queries[s:s + self.chunk][bad], k)
                dist[s:s + len(q)], rows[s:s + len(q)] = d2, r
        return dist, rows


class KnnSearcher:
    """Exact search straight over a bank array (``faiss.knn``, FAISS's blocked brute force),
    without copying it into an index; same contract as :meth:`ShardedSearcher.search`."""

    def __init__(self, bank: np.ndarray):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return _faiss().knn(np.ascontiguousarray(queries, dtype=np.float32), self.bank, k)


def write_shards(shards: list, directory: str | os.PathLike) -> list[str]:
    """Write each shard as ``shard_NNN.faiss`` (``faiss.write_index``); returns the file names."""
    faiss = _faiss()
    names = []
    for i, shard in enumerate(shards):
        name = f"shard_{i:03d}.faiss"
        faiss.write_index(shard, str(Path(directory) / name))
        names.append(name)
    return names


def read_shard(path: str | os.PathLike, dim: int, rows: int):
    """Read one shard file and check its dimension and row count.

    Raises:
        IndexFormatError: missing, unreadable or inconsistent file.
    """
    faiss = _faiss()
    path = Path(path)
    if not path.is_file():
        raise IndexFormatError(f"{path}: index shard file missing")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise IndexFormatError(f"{path}: corrupted FAISS index file ({first})") from None
    if index.d != dim or index.ntotal != rows:
        raise IndexFormatError(f"{path}: holds {index.ntotal} vectors of dimension {index.d}, "
                               f"the manifest says {rows} of dimension {dim}")
    return index
