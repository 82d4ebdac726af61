"""Searchers: k nearest memory-bank rows of query patch embeddings.

Every searcher follows :class:`Searcher`: ``search(queries, k)`` takes float32 (n, d)
and returns (squared L2 distances float32 (n, k), memory-bank rows int64 (n, k)),
nearest first. Callers (:class:`patchsearch.index.PatchIndex`) take the square root.

* :class:`ShardedSearcher`: FAISS shards over contiguous row ranges of the bank,
  searched as one through ``faiss.IndexShards``; ``faiss.IndexFlatL2`` shards (exact)
  built by :func:`build_flat_shards`, or IVF-PQ shards (:mod:`patchsearch.ivf`).
  Where faiss sees GPUs, each shard is copied to one (``faiss.index_cpu_to_gpu``).
* :class:`KnnSearcher`: exact search straight over a bank array (``faiss.knn``).
* :class:`patchsearch.ivf.IVFPQSearcher` and :class:`patchsearch.lowp.LowpSearcher`
  wrap a ShardedSearcher with exact re-ranking (:func:`rerank`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import IndexFormatError, InputError
from .gpu_placement import check_gpu_limit, gpu_plan, place_on_gpus

INDEX_TYPES = ("flat", "ivf", "ivfpq")
IVF_TYPES = ("ivf", "ivfpq")  # "ivfpq": the older name of "ivf" (same index, any layout)


def faiss():
    """The faiss module (imported on first use: ``import patchsearch`` stays light)."""
    import faiss as _faiss

    return _faiss


class Searcher(Protocol):
    """What :class:`~patchsearch.index.PatchIndex` needs from a searcher."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 float32 (n, k), bank rows int64 (n, k)) of float32 (n, d) queries."""


def check_index_type(index_type: str) -> str:
    """Raises InputError unless ``index_type`` is one of :data:`INDEX_TYPES`."""
    if index_type not in INDEX_TYPES:
        raise InputError(f"--index must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    return index_type


def reranked(index_type: str | None, shard=None, where: str = "the index") -> bool:
    """Whether an index type's FAISS shards give approximate candidates (compressed-code
    distances) that must be re-ranked with exact L2 against the memory bank: True for
    :data:`IVF_TYPES`, False for ``"flat"`` (exact). The one place that decides it, for
    the local :class:`~patchsearch.index.PatchIndex` and the Ray shard actors alike.

    Args:
        index_type: the manifest's index type; None (not recorded): read off ``shard``.
        shard: a FAISS shard of the index, if at hand: it must be of that kind (IVF for
            the IVF types, not IVF for flat).
        where: the index or shard file, for messages.

    Raises:
        IndexFormatError: an index type this patchsearch does not know, or a shard of the
            other kind (the manifest and the shard files disagree).
    """
    is_ivf = None if shard is None else faiss().try_extract_index_ivf(shard) is not None
    if index_type is None:
        if is_ivf is None:
            raise IndexFormatError(f"{where}: the manifest records no index type")
        return is_ivf
    if index_type not in INDEX_TYPES:
        raise IndexFormatError(f"{where}: unknown index type {index_type!r} (this patchsearch knows "
                               f"{', '.join(INDEX_TYPES)})")
    approximate = index_type in IVF_TYPES
    if is_ivf is not None and is_ivf != approximate:
        raise IndexFormatError(f"{where}: the manifest says index type {index_type!r}, but the shard files hold "
                               f"{'IVF' if is_ivf else 'flat'} indexes; rebuild the index")
    return approximate


def num_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    f = faiss()
    return f.get_num_gpus() if hasattr(f, "get_num_gpus") else 0


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


def build_flat_shards(bank: np.ndarray, shards: int = 1) -> list:
    """``faiss.IndexFlatL2`` per contiguous row range of a float32 (M, d) bank (ids 0.. per shard)."""
    out = []
    for start, stop in shard_bounds(len(bank), shards):
        index = faiss().IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank[start:stop], dtype=np.float32))
        out.append(index)
    return out


class ShardedSearcher:
    """FAISS shards searched as one index (``faiss.IndexShards``).

    Flat shards hold consecutive bank rows (``successive_ids=True`` turns their local
    ids into bank rows); IVF shards carry their bank rows as ids.

    Args:
        shards: CPU faiss indexes, shard i holding ``shard_bounds(M, len(shards))[i]``.
        gpu: place shards on GPUs; None = when :func:`num_gpus` > 0.
        gpu_ids: the GPUs the shards go to (round robin); None = every GPU faiss sees.
        gpu_options: ``GpuClonerOptions`` fields ({name: value}) the shards are copied to
            the GPUs with, from whoever built them (:func:`patchsearch.ivf.sharded_searcher`
            for IVF shards); shards that carry their own ids (not consecutive rows) go to
            GPUs only with options given here, else they stay on the CPU.
    """

    def __init__(self, shards: list, gpu: bool | None = None, gpu_ids: list[int] | None = None,
                 gpu_options: dict | None = None):
        f = faiss()
        self.cpu_shards = shards
        self.is_ivf = f.try_extract_index_ivf(shards[0]) is not None
        ngpu = num_gpus()
        self.on_gpu = bool(ngpu) if gpu is None else bool(gpu and ngpu)
        if self.is_ivf and gpu_options is None:
            self.on_gpu = False
        self._resources = []
        placed = shards
        if self.on_gpu:
            plan = gpu_plan(len(shards), len(gpu_ids) if gpu_ids else ngpu)
            for p in plan:
                p["options"].update(gpu_options or {})
                if gpu_ids:
                    p["device"] = gpu_ids[p["device"]]
            placed, self._resources = place_on_gpus(shards, plan, f)
        self.placed = placed
        # FAISS GPU indexes (their resources) take one calling thread at a time.
        self._gpu_lock = threading.Lock() if self.on_gpu else None
        if len(placed) == 1:
            self.index = placed[0]
        else:
            # threaded=True runs GPU shards concurrently (each with its own resources,
            # gpu_plan); on CPU each shard already uses every core through OpenMP, so
            # shards run one after the other.
            self.index = f.IndexShards(shards[0].d, self.on_gpu, not self.is_ivf)
            for s in placed:
                self.index.add_shard(s)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 float32 (n, k) and bank rows int64 (n, k) (IVF: PQ-approximate
        distances, -1 rows where fewer than k candidates were found).

        Raises:
            InputError: on GPUs, k above :data:`patchsearch.gpu_placement.GPU_MAX_K`.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.on_gpu:
            return self.index.search(queries, k)
        check_gpu_limit("k", k)
        with self._gpu_lock:
            return self.index.search(queries, k)


class KnnSearcher:
    """Exact search straight over a float32 (M, d) bank array (``faiss.knn``, FAISS's
    blocked brute force), without copying it into an index."""

    def __init__(self, bank: np.ndarray):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss().knn(np.ascontiguousarray(queries, dtype=np.float32), self.bank, k)


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
    f = faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.int64)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    n, c = candidates.shape
    dist = np.empty((n, k), np.float32)
    rows = np.empty((n, k), np.int64)
    f.knn_L2sqr_by_idx(f.swig_ptr(queries), f.swig_ptr(bank), f.swig_ptr(candidates), queries.shape[1], n,
                       len(bank), c, k, f.swig_ptr(dist), f.swig_ptr(rows), c)
    return dist, rows


def write_shards(shards: list, directory: str | os.PathLike) -> list[str]:
    """Write each CPU shard as ``shard_NNN.faiss`` (``faiss.write_index``); returns the file names."""
    names = []
    for i, shard in enumerate(shards):
        name = f"shard_{i:03d}.faiss"
        faiss().write_index(shard, str(Path(directory) / name))
        names.append(name)
    return names


def read_shard(path: str | os.PathLike, dim: int, rows: int):
    """Read one shard file and check its dimension and row count.

    Raises:
        IndexFormatError: missing, unreadable or inconsistent file.
    """
    path = Path(path)
    if not path.is_file():
        raise IndexFormatError(f"{path}: index shard file missing")
    try:
        index = faiss().read_index(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise IndexFormatError(f"{path}: corrupted FAISS index file ({first})") from None
    if index.d != dim or index.ntotal != rows:
        raise IndexFormatError(f"{path}: holds {index.ntotal} vectors of dimension {index.d}, "
                               f"the manifest says {rows} of dimension {dim}")
    return index
