"""Sharded FAISS indexes over the memory bank.

The memory bank (M, d) float32 is split into contiguous row ranges, one FAISS index
per shard (``faiss.IndexFlatL2``: exact squared L2). The shards are searched together
through ``faiss.IndexShards`` with ``successive_ids=True``, so the ids it returns are
memory-bank rows, identical to a single index over the whole bank. Where faiss has
GPUs (``faiss.get_num_gpus() > 0``) each shard is copied to a GPU
(``faiss.index_cpu_to_gpu``), round-robin over the devices.

Distances coming out of FAISS are squared L2; callers take the square root.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import IndexFormatError, InputError

INDEX_TYPES = ("flat",)


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


def build_shards(bank: np.ndarray, shards: int = 1, index_type: str = "flat") -> list:
    """One CPU FAISS index per contiguous row range of the memory bank.

    Args:
        bank: float32 (M, d) memory bank.
        shards: number of shards.
        index_type: ``"flat"`` (``faiss.IndexFlatL2``, exact).

    Returns:
        list of faiss indexes; shard i holds rows ``shard_bounds(M, shards)[i]``.
    """
    if index_type not in INDEX_TYPES:
        raise InputError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
    faiss = _faiss()
    out = []
    for start, stop in shard_bounds(len(bank), shards):
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank[start:stop], dtype=np.float32))
        out.append(index)
    return out


class ShardedSearcher:
    """Searches a list of shards as one index (``faiss.IndexShards``, successive ids).

    Args:
        shards: CPU faiss indexes over consecutive memory-bank rows.
        gpu: place shards on GPUs; None = when ``num_gpus() > 0``.
    """

    def __init__(self, shards: list, gpu: bool | None = None):
        faiss = _faiss()
        self.cpu_shards = shards
        ngpu = num_gpus()
        self.on_gpu = bool(ngpu) if gpu is None else bool(gpu and ngpu)
        self._resources = []
        placed = shards
        if self.on_gpu:
            self._resources = [faiss.StandardGpuResources() for _ in range(ngpu)]
            placed = [faiss.index_cpu_to_gpu(self._resources[i % ngpu], i % ngpu, s) for i, s in enumerate(shards)]
        if len(placed) == 1:
            self.index = placed[0]
        else:
            # threaded=True runs GPU shards concurrently; on CPU each shard already
            # uses every core through OpenMP, so shards run one after the other.
            self.index = faiss.IndexShards(shards[0].d, self.on_gpu, True)
            for s in placed:
                self.index.add_shard(s)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest memory-bank rows of each query.

        Args:
            queries: float32 (n, d).
            k: neighbours per query, 1 <= k <= ntotal.

        Returns:
            (squared L2 distances float32 (n, k), memory-bank rows int64 (n, k)), nearest first.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(queries, k)


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
