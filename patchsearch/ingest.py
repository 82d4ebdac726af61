"""Ingestion: frames decoded, embedded by the backbone and written into a patch-store partition.

Used by a build (:func:`patchsearch.pipeline.build`), by ``patchsearch add``
(:func:`patchsearch.update.add_images`) and by Ray embedding workers
(:mod:`patchsearch.distributed.embed`); it builds no index and writes no version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import InputError
from .progress import progress as progress_bar
from .store import ImageRecord, PatchStoreWriter


def embed_frames(writer: PatchStoreWriter, paths: Sequence[Path], embedder, geometry, root: Path,
                 batch_size: int = 16, workers: int = 0, bit_depth: int | None = None, progress: bool = False,
                 what: str = "training image") -> list[int]:
    """Decode, embed and write frames into a patch-store partition (build, and ``patchsearch add``).

    Args:
        writer: the open :class:`~patchsearch.store.PatchStoreWriter` of the partition.
        paths: the frames, written in this order (image ids from ``writer.next_image_id`` on).
        embedder: the :class:`~patchsearch.features.PatchEmbedder`.
        geometry: the :class:`~patchsearch.geometry.Geometry` (frames of another size are resized).
        root: frame paths are recorded relative to it.
        bit_depth: camera bit depth (:func:`~patchsearch.data.load_image`).
        what: how an unreadable frame is named in the error.

    Returns:
        the patch grid [h, w] of one tile.

    Raises:
        InputError: an unreadable frame (the message names it).
    """
    from .data import iter_batches

    tiles = len(geometry.tile_boxes())
    grid = None
    nbatches = (len(paths) + batch_size - 1) // batch_size
    for batch in progress_bar(iter_batches(paths, geometry, batch_size, workers, bit_depth), nbatches,
                              "embed", progress):
        if batch.errors:
            raise InputError(f"{what} {next(iter(batch.errors.values()))}")
        emb = embedder(batch.tensor.to(next(embedder.parameters()).device)).cpu().numpy()
        grid = [int(emb.shape[1]), int(emb.shape[2])]
        emb = emb.reshape(len(batch.good), tiles, *emb.shape[1:]) if tiles > 1 else emb
        writer.write([ImageRecord.from_file(paths[i], root) for i in batch.good], emb,
                     tiles=tiles if tiles > 1 else None)
    return grid
