"""The Arrow patch store: every raw patch embedding of the training images.

``build`` streams one record batch per image batch into an Arrow IPC file
(``patches.arrow``) before any subsampling, so that a memory bank of any coreset
ratio, and any index, can be rebuilt without re-running the backbone. Schema:

========== ============================== ==========================================
column     type                           meaning
========== ============================== ==========================================
image      string                         source image path
image_id   int32                          index of the image in build order
row        int16                          patch row on the feature grid
col        int16                          patch column on the feature grid
embedding  fixed_size_list<float32>[d]    raw patch embedding
========== ============================== ==========================================

Store rows are numbered in write order (image-major, then row, then column).
Reading is memory-mapped and zero-copy per record batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from .errors import IndexFormatError

STORE_FILE = "patches.arrow"


def patch_schema(dim: int) -> pa.Schema:
    """Arrow schema of the patch store for embedding dimension ``dim``."""
    return pa.schema([
        ("image", pa.string()),
        ("image_id", pa.int32()),
        ("row", pa.int16()),
        ("col", pa.int16()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ], metadata={"format": "patchsearch-patches", "dim": str(dim)})


class PatchStoreWriter:
    """Streams patch embeddings to an Arrow IPC file, one record batch per call.

    Use as a context manager; the file is fsynced on close.
    """

    def __init__(self, path: str | os.PathLike, dim: int):
        self.path = Path(path)
        self.dim = int(dim)
        self.schema = patch_schema(self.dim)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self.num_images = 0
        self.num_patches = 0

    def write(self, images: Sequence[str], embeddings: np.ndarray) -> None:
        """Append the patches of a batch of images.

        Args:
            images: B image paths (stored as given).
            embeddings: float32 (B, h, w, d) patch embeddings.

        Raises:
            ValueError: shape or dtype does not match.
        """
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 4 or embeddings.shape[0] != len(images) or embeddings.shape[3] != self.dim:
            raise ValueError(f"expected ({len(images)}, h, w, {self.dim}) embeddings, got {embeddings.shape}")
        b, h, w, d = embeddings.shape
        per = h * w
        rows, cols = np.divmod(np.arange(per, dtype=np.int16), np.int16(w))
        columns = [
            pa.array(np.repeat(np.asarray([str(p) for p in images], dtype=object), per), type=pa.string()),
            pa.array(np.repeat(np.arange(self.num_images, self.num_images + b, dtype=np.int32), per)),
            pa.array(np.tile(rows, b)),
            pa.array(np.tile(cols, b)),
            pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), d),
        ]
        self._writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.num_images += b
        self.num_patches += b * per

    def close(self) -> None:
        """Finish the IPC file and flush it to disk."""
        if self._writer is None:
            return
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        self._writer = None

    def __enter__(self) -> "PatchStoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PatchStore:
    """Memory-mapped reader of a patch store file.

    Raises:
        IndexFormatError: missing, truncated or corrupted file, or not a patch store.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._map = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._map)
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            schema = reader.schema
        except FileNotFoundError:
            raise IndexFormatError(f"{self.path}: patch store missing") from None
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise IndexFormatError(f"{self.path}: corrupted Arrow patch store ({exc})") from None
        meta = schema.metadata or {}
        if meta.get(b"format") != b"patchsearch-patches":
            raise IndexFormatError(f"{self.path}: not a patchsearch patch store")
        self.dim = int(meta[b"dim"])
        sizes = [b.num_rows for b in self._batches]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_patches = int(self._offsets[-1])

    def _batch_embeddings(self, i: int) -> np.ndarray:
        col = self._batches[i].column("embedding")
        return col.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.dim)

    def iter_embeddings(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first store row, float32 (n, d) zero-copy view) per record batch."""
        for i in range(len(self._batches)):
            yield int(self._offsets[i]), self._batch_embeddings(i)

    def embeddings(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 (len(rows), d) copy of the given store rows (all rows if None).

        Raises:
            IndexError: a row is out of range.
        """
        if rows is None:
            rows = np.arange(self.num_patches)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_patches):
            raise IndexError(f"store rows must be in [0, {self.num_patches})")
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for b in np.unique(which):
            sel = np.nonzero(which == b)[0]
            out[sel] = self._batch_embeddings(int(b))[rows[sel] - self._offsets[b]]
        return out

    def _column(self, name: str) -> np.ndarray:
        return np.concatenate([b.column(name).to_numpy() for b in self._batches]) if self._batches \
            else np.empty(0)

    def locations(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """{"image_id", "row", "col"} int arrays for the given store rows."""
        rows = np.asarray(rows, dtype=np.int64)
        return {name: self._column(name)[rows] for name in ("image_id", "row", "col")}

    def image_paths(self) -> list[str]:
        """Source image paths in build order (index = image_id)."""
        names: list[str] = []
        for b in self._batches:
            ids = b.column("image_id").to_numpy()
            first = np.nonzero(np.diff(ids, prepend=-1))[0]
            names.extend(b.column("image").take(pa.array(first)).to_pylist())
        return names


BANK_FILE = "memory_bank.arrow"


def write_bank(path: str | os.PathLike, bank: np.ndarray, sources: dict | None = None,
               support: np.ndarray | None = None) -> None:
    """Write the memory bank as one Arrow record batch (memory-mappable, zero-copy).

    Args:
        bank: float32 (M, d) memory bank.
        sources: optional {"store_row": int64 (M,), "image": list[str] (M,), "row": (M,), "col": (M,)}
            telling which training patch each bank row came from.
        support: optional int64 (M, b) support sets N_b(m) of every bank row (Eq. 7).
    """
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    m, d = bank.shape
    cols = {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(bank.reshape(-1)), d)}
    if support is not None:
        support = np.ascontiguousarray(support, dtype=np.int64)
        cols["support"] = pa.FixedSizeListArray.from_arrays(pa.array(support.reshape(-1)), support.shape[1])
    if sources is not None:
        cols["store_row"] = pa.array(np.asarray(sources["store_row"], dtype=np.int64))
        cols["image"] = pa.array(list(sources["image"]), type=pa.string())
        cols["row"] = pa.array(np.asarray(sources["row"], dtype=np.int16))
        cols["col"] = pa.array(np.asarray(sources["col"], dtype=np.int16))
    table = pa.table(cols).replace_schema_metadata({"format": "patchsearch-bank", "dim": str(d)})
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(m, 1))
        sink.flush()
        os.fsync(sink.fileno())


def read_bank(path: str | os.PathLike) -> tuple[np.ndarray, dict | None, np.ndarray | None]:
    """Memory-map a memory-bank file: (float32 (M, d) read-only view, sources dict or None,
    int64 (M, b) support sets or None).

    Raises:
        IndexFormatError: missing, truncated or corrupted file.
    """
    path = Path(path)
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        table = reader.read_all()
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: memory bank file missing") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise IndexFormatError(f"{path}: corrupted Arrow memory bank ({exc})") from None
    meta = table.schema.metadata or {}
    if meta.get(b"format") != b"patchsearch-bank":
        raise IndexFormatError(f"{path}: not a patchsearch memory bank")
    d = int(meta[b"dim"])
    emb = table.column("embedding").combine_chunks()
    bank = emb.flatten().to_numpy(zero_copy_only=True).reshape(-1, d)
    sources = None
    if "store_row" in table.column_names:
        sources = {"store_row": table.column("store_row").to_numpy(),
                   "image": table.column("image").to_pylist(),
                   "row": table.column("row").to_numpy(),
                   "col": table.column("col").to_numpy()}
    support = None
    if "support" in table.column_names:
        col = table.column("support").combine_chunks()
        support = col.flatten().to_numpy(zero_copy_only=True).reshape(len(bank), -1)
    return bank, sources, support


class StoreArray:
    """Read-only (N, d) array-like over a :class:`PatchStore` (slices and row arrays gather rows).

    Lets array code (the coreset) stream a store larger than memory chunk by chunk.
    """

    def __init__(self, store: PatchStore):
        self.store = store
        self.shape = (store.num_patches, store.dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.shape[0]))
        return self.store.embeddings(np.asarray(key))
