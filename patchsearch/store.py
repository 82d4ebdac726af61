r"""The Arrow patch store: every raw patch embedding of the training images, kept before any
subsampling so that a memory bank of any coreset ratio, and any index, can be rebuilt
without re-running the backbone.

A store (version 2) is a directory of *partitions*, each written once by one
:class:`PatchStoreWriter` and never rewritten, so a store grows by adding partitions
(incremental appends, one partition per worker of a distributed build). Partition ``N`` is
two Arrow IPC files, ``images-NNNNN.arrow`` and ``patches-NNNNN.arrow`` (N zero-padded to 5
digits; ``*.partial`` while being written); their schema metadata holds ``format``
("patchsearch-images", "patchsearch-patches"), ``store_version`` ("2") and ``dim`` (d).

=================== ========= =========================== =====================================
file                column    type                        meaning
=================== ========= =========================== =====================================
images-NNNNN.arrow  image_id  int32                       global image id (see below)
(a row per frame)   path      string                      relative to the data root, POSIX
\                   size      int64                       bytes of the source file
\                   sha256    string                      hex SHA-256 of the source file
\                   height    int32                       height of the original frame, pixels
\                   width     int32                       width of the original frame, pixels
patches-NNNNN.arrow image_id  int32                       frame the patch comes from
(a row per patch)   tile      int32                       tile of the frame (0 without tiling)
\                   row       int32                       patch row on the tile's feature grid
\                   col       int32                       patch column on that grid
\                   embedding fixed_size_list<float32>[d] raw patch embedding
=================== ========= =========================== =====================================

Image ids go on from partition to partition (a writer's ``first_image_id`` is the number of
images before its partition), so a whole store has ids 0..num_images-1 and an image's id is
its position in :meth:`PatchStore.images`. Store rows are numbered partition by partition in
write order (frame, tile, row, column). ``pyarrow.dataset.dataset(files, format="ipc")``
reads the patch (or image) files of a store as one table. Reading is memory-mapped and
zero-copy per record batch. A version-1 store (one ``patches.arrow``: an ``image`` path
column, as given, on every patch row, no tile) reads through the same API with tile 0,
size/height/width -1 and sha256 null. Patches files written before tile, row and col were
int32 (int16, which wraps past 32,767 rows or columns on a grid) still read: their location
columns are widened to int32 on open.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from .errors import IndexFormatError, InputError
from .files import fsync_dir, sha256
from .frameinfo import ALLOWED_FORMATS

STORE_VERSION = "2"
V1_FILE = "patches.arrow"
_PARTITION = re.compile(r"patches-(\d+)\.arrow")
_LOCATION = {"image_id": np.int32, "tile": np.int32, "row": np.int32, "col": np.int32}
_LEGACY = {"image_id": np.int32, "tile": np.int16, "row": np.int16, "col": np.int16}  # before int32


def partition_files(partition: int) -> tuple[str, str]:
    """(images file, patches file) names of partition number ``partition``."""
    return f"images-{partition:05d}.arrow", f"patches-{partition:05d}.arrow"


def _schema(fields: list, kind: str, dim: int, version: str = STORE_VERSION) -> pa.Schema:
    return pa.schema(fields, metadata={"format": f"patchsearch-{kind}", "store_version": version, "dim": str(dim)})


def patch_schema(dim: int, v1: bool = False, legacy: bool = False) -> pa.Schema:
    """Schema of a patches file of embedding dimension ``dim`` (of a version-1 store if ``v1``;
    with int16 tile/row/col, as written before int32, if ``legacy`` or ``v1``)."""
    types = {"image": pa.string(), **{k: pa.from_numpy_dtype(t) for k, t in (_LEGACY if v1 or legacy else _LOCATION).items()}}
    names = ["image", "image_id", "row", "col"] if v1 else list(_LOCATION)
    fields = [(k, types[k]) for k in names] + [("embedding", pa.list_(pa.float32(), dim))]
    return _schema(fields, "patches", dim, "1" if v1 else STORE_VERSION)


def image_schema(dim: int) -> pa.Schema:
    """Schema of an images file of a store of embedding dimension ``dim``."""
    return _schema([("image_id", pa.int32()), ("path", pa.string()), ("size", pa.int64()),
                    ("sha256", pa.string()), ("height", pa.int32()), ("width", pa.int32())], "images", dim)


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """A source frame: ``path`` (relative to the data root, POSIX), file ``size`` in bytes,
    hex ``sha256`` of the file, ``height`` and ``width`` of the frame in pixels."""

    path: str
    size: int
    sha256: str
    height: int
    width: int

    @classmethod
    def from_file(cls, path: str | os.PathLike, root: str | os.PathLike) -> "ImageRecord":
        """Record of the image file ``path``: size and SHA-256 (read in 1 MiB blocks), frame size
        from the image header (pixels are not decoded), path relative to ``root`` (absolute if
        not below it) in POSIX form.

        Raises:
            InputError: the file cannot be read or is not an image (the message names it).
        """
        path = Path(os.path.abspath(path))
        try:
            digest, size = sha256(path), path.stat().st_size
            with Image.open(path, formats=sorted(ALLOWED_FORMATS)) as img:  # never another format's decoder
                width, height = img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"{path}: cannot read image ({exc})") from None
        return cls(relative_path(path, root), size, digest, height, width)


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` in POSIX form (its absolute POSIX form if not below ``root``)."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return (path.relative_to(root) if path.is_relative_to(root) else path).as_posix()


class PatchStoreWriter:
    """Writes partition ``partition`` of the store in ``directory``: one record batch of patches
    per :meth:`write`, image ids from ``first_image_id`` on. The files are written as
    ``<name>.partial`` and renamed by :meth:`close`, the patches file last, so readers never see
    an incomplete partition. As a context manager: :meth:`close` on success, else :meth:`abort`.

    Attributes:
        files: (images file, patches file) names inside ``directory``.
        num_images, num_patches; next_image_id: the next partition's ``first_image_id``.

    Raises:
        InputError: the partition already exists, or its ``.partial`` file cannot be created
            (e.g. left by a writer that crashed: remove it).
    """

    def __init__(self, directory: str | os.PathLike, dim: int, partition: int = 0, first_image_id: int = 0):
        self.directory, self.dim, self.first_image_id = Path(directory), int(dim), int(first_image_id)
        self.files, self._records, self.num_images, self.num_patches = partition_files(int(partition)), [], 0, 0
        self.next_image_id = self.first_image_id
        for name in self.files:
            if (self.directory / name).exists():
                raise InputError(f"{self.directory / name}: partition {partition} already exists")
        self._sink = self._create(self.files[1])
        self._writer = pa.ipc.new_file(self._sink, patch_schema(self.dim))

    def _create(self, name: str) -> pa.OSFile:
        path = self.directory / f"{name}.partial"
        try:  # exclusive creation: one writer per partition
            return pa.OSFile(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "wb")
        except OSError as exc:
            raise InputError(f"{path}: cannot create partition file ({exc})") from None

    def write(self, images: Sequence[ImageRecord], embeddings: np.ndarray, tiles: int | None = None) -> None:
        """Append the patches of B frames as one record batch.

        Args:
            images: the B frames' :class:`ImageRecord`, in batch order.
            embeddings: float32 (B, h, w, d), or with ``tiles=T`` (B, T, h, w, d): each frame
                then gives T*h*w patch rows, tile by tile.

        Raises:
            InputError: the shape does not match, or an image is not an ImageRecord.
        """
        emb, (b, t) = np.ascontiguousarray(embeddings, dtype=np.float32), (len(images), tiles or 1)
        lead = (b,) if tiles is None else (b, t)
        if emb.shape[:-3] != lead or emb.shape[-1] != self.dim or 0 in emb.shape[len(lead):-1]:
            want = f"({b}, " + ("" if tiles is None else f"{t}, ") + f"h, w, {self.dim})"
            raise InputError(f"expected embeddings of shape {want} with h, w >= 1, got {emb.shape}")
        if not all(isinstance(r, ImageRecord) for r in images):
            raise InputError("images must be ImageRecord objects")
        h, w = emb.shape[-3:-1]
        row, col = (a.astype(np.int32) for a in np.divmod(np.arange(h * w), w))
        columns = [np.arange(self.next_image_id, self.next_image_id + b, dtype=np.int32).repeat(t * h * w),
                   np.tile(np.arange(t, dtype=np.int32).repeat(h * w), b), np.tile(row, b * t), np.tile(col, b * t),
                   pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim)]
        self._writer.write_batch(pa.record_batch(columns, schema=patch_schema(self.dim)))
        self._records.extend(images)
        self.num_images, self.num_patches = self.num_images + b, self.num_patches + b * t * h * w
        self.next_image_id += b

    def close(self) -> tuple[str, str]:
        """Finish the patches file, write the images file (one record batch), fsync both, rename
        them to their final names and fsync the directory; returns :attr:`files`."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            _fsync_close(self._sink)
            rows = [{"image_id": self.first_image_id + i, **dataclasses.asdict(r)} for i, r in enumerate(self._records)]
            sink = self._create(self.files[0])
            with pa.ipc.new_file(sink, image_schema(self.dim)) as writer:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=image_schema(self.dim)))
            _fsync_close(sink)
            for name in self.files:  # patches last: a reader finds a partition by its patches file
                os.replace(self.directory / f"{name}.partial", self.directory / name)
            fsync_dir(self.directory)  # the new entries (POSIX; a no-op on Windows)
        return self.files

    def abort(self) -> None:
        """Discard the partition: close and remove its ``.partial`` files."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._sink.close()
        for name in self.files:
            (self.directory / f"{name}.partial").unlink(missing_ok=True)

    def __enter__(self) -> "PatchStoreWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close() if exc_type is None else self.abort()


def _fsync_close(sink: pa.NativeFile) -> None:
    """Flush (if open for writing), fsync and close ``sink``."""
    if sink.writable():
        sink.flush()
    os.fsync(sink.fileno())
    sink.close()


def _open_ipc(path: Path, schema_of: Callable[[int], pa.Schema],
              legacy_of: Callable[[int], pa.Schema] | None = None) -> tuple[list[pa.RecordBatch], int]:
    """Memory-mapped record batches and dim of an IPC file whose schema must be ``schema_of(dim)``
    (or ``legacy_of(dim)``: its batches are then cast to ``schema_of(dim)``, the embedding
    column staying zero-copy)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        for batch in batches:
            batch.validate()
        meta = {b"store_version": b"1", **(reader.schema.metadata or {})}
        want = schema_of(int(meta.get(b"dim", -1)))
        if legacy_of is not None and reader.schema.equals(legacy_of(int(meta.get(b"dim", -1)))):
            batches = [_widen(b, want) for b in batches]
            return batches, int(meta[b"dim"])
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: patch store file missing") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: corrupted Arrow patch store file ({exc})") from None
    if not reader.schema.equals(want) or any(meta.get(k) != v for k, v in want.metadata.items()):
        found = {k.decode(): meta.get(k, b"?").decode() for k in (b"format", b"store_version")}
        raise IndexFormatError(f"{path}: not a {want.metadata[b'format'].decode()} file of store version "
                               f"{want.metadata[b'store_version'].decode()} (found {found})")
    return batches, int(meta[b"dim"])


def _widen(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with each column cast to ``schema``'s type (int16 locations -> int32)."""
    return pa.record_batch([c if c.type == f.type else c.cast(f.type) for c, f in zip(batch.columns, schema)],
                           schema=schema)


class PatchStore:
    """Memory-mapped reader of a patch store: the partitions in ``directory`` (all, by number,
    or the listed ``partitions``), or a version-1 ``patches.arrow`` (given as the path, or in
    ``directory`` when it holds no partition).

    Attributes:
        dim, num_patches, num_images, directory; files: the store's file names in ``directory``
        (per partition: images, patches); first_image_id: 0, or the first listed partition's
        first image id. Image ``i`` is at position ``i - first_image_id`` of :meth:`images`.

    Raises:
        IndexFormatError: a missing, truncated or corrupted file, one of another format or
            version, partitions of different dims, or image ids that do not go on from
            partition to partition (from 0 when reading all); the message names the file.
    """

    def __init__(self, directory: str | os.PathLike, partitions: Sequence[int] | None = None):
        path, every = Path(directory), partitions is None
        if every and path.is_dir():
            partitions = sorted(int(m.group(1)) for m in map(_PARTITION.fullmatch, os.listdir(path)) if m)
            path = path / V1_FILE if not partitions and (path / V1_FILE).is_file() else path
        if path.is_file():
            self.directory, self.files = path.parent, [path.name]
            self._open_v1(path)
        elif not partitions:
            raise IndexFormatError(f"{path}: patch store missing (no patches-NNNNN.arrow, no {V1_FILE})")
        else:
            self.directory, self.files = path, [f for p in partitions for f in partition_files(int(p))]
            self._open_v2(0 if every else None)
        self._offsets = np.cumsum([0] + [b.num_rows for b in self._batches], dtype=np.int64)
        self.num_patches, self.num_images = int(self._offsets[-1]), self._images.num_rows
        self.first_image_id = self._images["image_id"][0].as_py() if self.num_images else 0

    def _open_v2(self, start: int | None) -> None:
        """Open the partitions of :attr:`files`; image ids go on from ``start`` (None: from the
        first partition's first id)."""
        self._batches, tables, self.dim = [], [], None
        for names in zip(self.files[::2], self.files[1::2]):
            (images, idim), (patches, pdim) = (_open_ipc(self.directory / names[0], image_schema),
                                               _open_ipc(self.directory / names[1], patch_schema,
                                                         lambda dim: patch_schema(dim, legacy=True)))
            self.dim = idim if self.dim is None else self.dim
            for name, dim in zip(names, (idim, pdim)):
                if dim != self.dim:
                    raise IndexFormatError(f"{self.directory / name}: dim {dim}, but {self.files[0]} has {self.dim}")
            tables.append(pa.Table.from_batches(images, image_schema(self.dim)))
            ids = tables[-1]["image_id"].to_numpy()
            lo = (int(ids[0]) if len(ids) else 0) if start is None else start
            start = lo + len(ids)
            patch_ids = [b["image_id"].to_numpy() for b in patches if b.num_rows]
            if not np.array_equal(ids, np.arange(lo, start)) or any(p.min() < lo or p.max() >= start
                                                                   for p in patch_ids):
                raise IndexFormatError(f"{self.directory / names[0]}: image ids of the partition "
                                       f"are not {lo}..{start - 1}")
            self._batches += patches
        self._images = pa.concat_tables(tables)

    def _open_v1(self, path: Path) -> None:
        """Open a version-1 file: image table from its ``image`` column, tile 0."""
        batches, self.dim = _open_ipc(path, lambda dim: patch_schema(dim, v1=True))
        paths = {}
        for b in batches:  # the path on each image's first patch row
            ids = b["image_id"].to_numpy()
            first = np.nonzero(np.diff(ids, prepend=-1))[0]
            paths.update(zip(ids[first].tolist(), b["image"].take(first).to_pylist()))
        n = len(paths)
        if sorted(paths) != list(range(n)):
            raise IndexFormatError(f"{path}: image ids are not 0..{n - 1}")
        unknown = np.full(n, -1, np.int32)
        self._images = pa.table([np.arange(n, dtype=np.int32), [paths[i] for i in range(n)], unknown.astype(np.int64),
                                 pa.nulls(n, pa.string()), unknown, unknown], schema=image_schema(self.dim))
        self._batches = [pa.record_batch([b["image_id"], np.zeros(len(b), np.int32), b["row"].cast(pa.int32()),
                                          b["col"].cast(pa.int32()), b["embedding"]], schema=patch_schema(self.dim))
                         for b in batches]

    def _view(self, batch: int) -> np.ndarray:
        """Read-only float32 (n, d) zero-copy view of record batch ``batch``'s embeddings: the one
        fixed_size_list -> numpy conversion of the module."""
        return self._batches[batch]["embedding"].flatten().to_numpy(zero_copy_only=True).reshape(-1, self.dim)

    def _gather(self, rows, get: Callable[[int], np.ndarray], dtype, shape: tuple = ()) -> np.ndarray:
        """New array of ``get(batch)[row - first row of batch]`` for every store row of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_patches):
            raise IndexError(f"store rows must be in [0, {self.num_patches})")
        out = np.empty((rows.size, *shape), dtype=dtype)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for b in np.unique(which):
            sel = np.nonzero(which == b)[0]
            out[sel] = get(int(b))[rows[sel] - self._offsets[b]]
        return out

    def embeddings(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 (len(rows), d) copy of the given store rows (all if None); IndexError if out of range."""
        return self._gather(np.arange(self.num_patches) if rows is None else rows, self._view, np.float32, (self.dim,))

    def locations(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """{"image_id", "tile", "row", "col"} int32 arrays of the given store rows."""
        return {k: self._gather(rows, lambda b: self._batches[b][k].to_numpy(), t) for k, t in _LOCATION.items()}

    def images(self) -> pa.Table:
        """The image table (image_id, path, size, sha256, height, width) in image id order."""
        return self._images

    def image_paths(self) -> list[str]:
        """Image paths in image id order: image ``i`` is at ``i - first_image_id``."""
        return self._images["path"].to_pylist()


def read_image_paths(directory: str | os.PathLike, partitions: Sequence[int] | None = None) -> list[str]:
    """Training image paths by image id, read from the image files alone (a version-1 store:
    from its patch file), without opening the patch files.

    Raises:
        IndexFormatError: as :class:`PatchStore`.
    """
    directory = Path(directory)
    if partitions is None:
        partitions = sorted(int(m.group(1)) for m in map(_PARTITION.fullmatch, os.listdir(directory)) if m)
    if not partitions:
        return PatchStore(directory).image_paths()
    paths = []
    for p in partitions:
        batches, dim = _open_ipc(directory / partition_files(int(p))[0], image_schema)
        paths += pa.Table.from_batches(batches, image_schema(dim))["path"].to_pylist()
    return paths


class StoreArray:
    """Read-only (N, d) array-like over a :class:`PatchStore` (slices and row arrays gather rows),
    so array code (the coreset) streams a store larger than memory chunk by chunk."""

    def __init__(self, store: PatchStore):
        self.store, self.shape, self.dtype, self.ndim = store, (store.num_patches, store.dim), np.dtype(np.float32), 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.shape[0]))
        return self.store.embeddings(np.asarray(key))
