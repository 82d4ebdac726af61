"""The memory bank: its embeddings, where each row came from, and its support sets.

``memory_bank.arrow`` is one Arrow record batch (memory-mapped, zero-copy on read):

=========== =============================== ===================================================
column      type                            meaning
=========== =============================== ===================================================
embedding   fixed_size_list<float32>[d]     memory-bank vector
support     fixed_size_list<int64>[b]       N_b(m) of Eq. 7: the row itself, then its b-1
                                            nearest other rows by L2 (optional)
store_row   int64                           row of the Arrow patch store it was selected from
image_id    int32                           training image (store image table)
tile, row,  int32                           tile and patch position on the feature grid
col                                         (int16 in files written before: read too)
=========== =============================== ===================================================

Files of format version 1 hold the image path as a string column ``image`` instead
of ``image_id`` and ``tile``; they are read too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import IndexFormatError, InputError, check_finite

BANK_FILE = "memory_bank.arrow"
B = 9  # support-set size |N_b(m*)| of Eq. 7


@dataclass
class MemoryBank:
    """A memory bank M_C and what is known about its rows.

    Attributes:
        embeddings: float32 (M, d), C-contiguous (a read-only memory map when loaded).
        sources: None, or {"store_row": int64 (M,), "image_id": int32 (M,), "tile", "row",
            "col": int32 (M,)}: the training patch behind each row.
        images: None, or training image paths indexed by image_id.
        support: None, or int64 (M, b) precomputed support sets N_b(m).
    """

    embeddings: np.ndarray
    sources: dict | None = None
    images: list[str] | None = None
    support: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def describe(self, rows) -> list[dict]:
        """Training patch behind each bank row: [{"bank_row", "image", "tile", "row", "col"}]
        (just "bank_row" where sources are unknown or the row is -1)."""
        out = []
        for r in (int(x) for x in rows):
            item = {"bank_row": r}
            if self.sources is not None and r >= 0:
                image_id = int(self.sources["image_id"][r])
                item.update(image=self.images[image_id] if self.images else image_id,
                            tile=int(self.sources["tile"][r]), row=int(self.sources["row"][r]),
                            col=int(self.sources["col"][r]))
            out.append(item)
        return out


def check_embeddings(bank) -> np.ndarray:
    """A float (M, d) array as C-contiguous float32, checked.

    Raises:
        InputError: not a non-empty 2-D floating array, or NaN/inf values.
    """
    if not isinstance(bank, np.ndarray) or bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise InputError(f"memory bank must be a non-empty (M, d) numpy array, got "
                         f"{getattr(bank, 'shape', type(bank).__name__)}")
    if not np.issubdtype(bank.dtype, np.floating):
        raise InputError(f"memory bank must be floating point, got {bank.dtype}")
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    check_finite(bank, "memory bank")
    return bank


def support_from_neighbours(rows: np.ndarray, nn: np.ndarray, b: int) -> np.ndarray:
    """Support sets from neighbour lists: int64 (n, b), each row itself first, then its
    first b-1 other neighbours (padded with the row itself where fewer were found)."""
    out = np.empty((len(rows), b), dtype=np.int64)
    for i, (m, cand) in enumerate(zip(rows, nn)):
        other = cand[(cand != m) & (cand >= 0)][:b - 1]
        out[i, 0] = m
        out[i, 1:1 + len(other)] = other
        out[i, 1 + len(other):] = m
    return out


def exact_support_sets(embeddings: np.ndarray, searcher, b: int = B, chunk: int = 4096) -> np.ndarray:
    """N_b(m) of every bank row by exact search (the bank's kNN graph): int64 (M, min(b, M)).

    Args:
        embeddings: float32 (M, d) memory bank.
        searcher: an exact :class:`~patchsearch.searchers.Searcher` over it.
    """
    m = len(embeddings)
    b = min(b, m)
    out = np.empty((m, b), dtype=np.int64)
    for s in range(0, m, chunk):
        rows = np.arange(s, min(m, s + chunk))
        _, nn = searcher.search(embeddings[rows], min(b + 1, m))
        out[rows] = support_from_neighbours(rows, nn, b)
    return out


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _numpy(column, width: int) -> np.ndarray:
    """A fixed_size_list column as a zero-copy (n, width) numpy view."""
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=True).reshape(-1, width)


def write_bank(path: str | os.PathLike, bank: MemoryBank) -> None:
    """Write ``memory_bank.arrow`` (one record batch) and fsync it."""
    emb = np.ascontiguousarray(bank.embeddings, dtype=np.float32)
    cols = {"embedding": _fixed_list(emb)}
    if bank.support is not None:
        cols["support"] = _fixed_list(np.ascontiguousarray(bank.support, dtype=np.int64))
    if bank.sources is not None:
        cols["store_row"] = pa.array(np.asarray(bank.sources["store_row"], dtype=np.int64))
        cols["image_id"] = pa.array(np.asarray(bank.sources["image_id"], dtype=np.int32))
        for name in ("tile", "row", "col"):
            cols[name] = pa.array(np.asarray(bank.sources[name], dtype=np.int32))
    table = pa.table(cols).replace_schema_metadata({"format": "patchsearch-bank", "dim": str(emb.shape[1])})
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(len(emb), 1))
        sink.flush()
        os.fsync(sink.fileno())


def read_bank(path: str | os.PathLike, images: list[str] | None = None) -> MemoryBank:
    """Memory-map a memory-bank file (format 1 or 2).

    Args:
        images: training image paths by image_id (from the patch store), if known.

    Raises:
        IndexFormatError: missing, truncated or corrupted file.
    """
    path = Path(path)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: memory bank file missing") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise IndexFormatError(f"{path}: corrupted Arrow memory bank ({exc})") from None
    meta = table.schema.metadata or {}
    if meta.get(b"format") != b"patchsearch-bank":
        raise IndexFormatError(f"{path}: not a patchsearch memory bank")
    emb = _numpy(table.column("embedding"), int(meta[b"dim"]))
    names = table.column_names
    support = _numpy(table.column("support"), table.schema.field("support").type.list_size) \
        if "support" in names else None
    sources = None
    if "store_row" in names:
        sources = {"store_row": table.column("store_row").to_numpy(),
                   "row": table.column("row").to_numpy().astype(np.int32, copy=False),
                   "col": table.column("col").to_numpy().astype(np.int32, copy=False)}
        if "image_id" in names:
            sources["image_id"] = table.column("image_id").to_numpy()
            sources["tile"] = table.column("tile").to_numpy().astype(np.int32, copy=False)
        else:  # format 1: one path string per row
            paths = table.column("image").to_pylist()
            images = list(dict.fromkeys(paths))
            ids = {p: i for i, p in enumerate(images)}
            sources["image_id"] = np.array([ids[p] for p in paths], dtype=np.int32)
            sources["tile"] = np.zeros(len(paths), dtype=np.int32)
    return MemoryBank(emb, sources, images, support)
