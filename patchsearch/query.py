"""Images in, results out: frames -> patch embeddings -> :class:`PatchIndex` -> anomaly maps.

The embedder is the one the index was built with (backbone, layers, weights checked
by SHA-256), loaded once per index and cached on it. Frames are decoded and embedded
in batches (bounded memory); an unreadable frame does not stop its batch: its result
rows hold NaN scores, -1 locations and an entry in ``errors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import IndexFormatError, InputError
from .index import K, PatchIndex
from .bank import B
from .result import SearchResult
from .score import SIGMA, anomaly_maps


def embedder_for(index: PatchIndex, weights: str | None = None):
    """The :class:`~patchsearch.features.PatchEmbedder` ``index`` was built with (cached).

    Args:
        weights: the state-dict file, for an index built with ``--weights`` (the
            manifest records its name and SHA-256, not a path on the build machine).

    Raises:
        IndexFormatError: the index records no backbone, its weights file is needed and
            not given, or the weights differ from those it was built with.
    """
    cached = getattr(index, "_embedder", None)
    if cached is not None:
        return cached
    from .features import PatchEmbedder

    bb = index.manifest.backbone
    if not bb:
        raise IndexFormatError("this index was built from raw embeddings and records no backbone: "
                               "use search() with patch embeddings")
    recorded = bb.get("weights") or {}
    if str(recorded.get("source", "")).startswith("file:") and weights is None:
        raise IndexFormatError(f"the index was built with the weights file {recorded['source'][5:]} "
                               f"(SHA-256 {recorded.get('sha256')}): pass --weights PATH to that file")
    emb = PatchEmbedder(bb["name"], bb["layers"], weights, bb["embed_dim"] if bb.get("reduced") else None)
    if emb.dim != index.dim:
        raise IndexFormatError(f"backbone {bb['name']} gives {emb.dim}-d embeddings, index holds {index.dim}-d")
    if recorded.get("sha256") and emb.weights_id.get("sha256") and recorded["sha256"] != emb.weights_id["sha256"]:
        raise IndexFormatError(f"the weights of {bb['name']} ({emb.weights_id['source']}) differ from "
                               f"those the index was built with ({recorded.get('source')})")
    index._embedder = emb
    return emb


def geometry_of(index: PatchIndex):
    """The :class:`~patchsearch.data.Geometry` the index was built with."""
    from .data import Geometry

    g = index.manifest.geometry or {}
    return Geometry(**g) if g else Geometry()


def grid_of(index: PatchIndex) -> tuple[int, int]:
    """Patch grid (h, w) of one frame (from the manifest, else by a probe through the backbone)."""
    if index.manifest.grid:
        return tuple(index.manifest.grid)
    import torch

    crop = geometry_of(index).crop
    with torch.no_grad():
        emb = embedder_for(index)(torch.zeros(1, 3, crop, crop))
    index.manifest.grid = [int(emb.shape[1]), int(emb.shape[2])]
    return tuple(index.manifest.grid)


def iter_query(index: PatchIndex, images, k: int = K, b: int = B, batch_size: int = 16, maps: bool = True,
               sigma: float = SIGMA, weights: str | None = None) -> Iterator[SearchResult]:
    """Like :func:`query`, one :class:`SearchResult` per batch of images (bounded memory)."""
    import torch

    from .data import iter_batches

    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"image tensor must be (N, 3, H, W), got {tuple(images.shape)}")
        for start in range(0, len(images), batch_size):
            yield _score_batch(index, images[start:start + batch_size].float(), k, b, maps, sigma, weights)
        return
    paths = [Path(p) for p in images]
    geometry = geometry_of(index)
    for batch, good, errors in iter_batches(paths, geometry, batch_size):
        first = min(list(good) + list(errors))
        n = len(good) + len(errors)
        part = _score_batch(index, batch, k, b, maps, sigma, weights) if batch is not None else None
        h, w = grid_of(index) if part is None else part.grid
        yield _expand(part, [i - first for i in good], n, {i - first: e for i, e in errors.items()},
                      [str(p) for p in paths[first:first + n]], k, h * w, geometry.crop if maps else None)


def query(index: PatchIndex, images, k: int = K, b: int = B, batch_size: int = 16, maps: bool = True,
          sigma: float = SIGMA, weights: str | None = None) -> SearchResult:
    """Embed and search images with the backbone the index was built with.

    Args:
        index: the :class:`PatchIndex` (built by ``patchsearch build``: it records its backbone).
        images: image paths (str or Path), or a float32 tensor (N, 3, H, W) already
            preprocessed like :meth:`patchsearch.data.Geometry.image_tensor`.
        k, b: see :meth:`PatchIndex.search`.
        batch_size: images embedded at a time.
        maps: compute anomaly maps float32 (N, H, W) (crop size for paths, H x W for tensors).
        sigma: Gaussian blur of the anomaly maps, pixels.
        weights: see :func:`embedder_for`.

    Returns:
        :class:`SearchResult` with ``paths`` (for path input), ``anomaly_maps`` and
        ``errors`` for unreadable images.

    Raises:
        InputError: no image, a bad tensor shape.
        IndexFormatError: see :func:`embedder_for`.
    """
    parts = list(iter_query(index, images, k, b, batch_size, maps, sigma, weights))
    if not parts:
        raise InputError("no image to query")
    out = SearchResult(
        np.concatenate([p.distances for p in parts]), np.concatenate([p.locations for p in parts]),
        np.concatenate([p.image_scores for p in parts]), np.concatenate([p.top_patches for p in parts]),
        grid=parts[0].grid,
        anomaly_maps=np.concatenate([p.anomaly_maps for p in parts]) if maps else None,
        paths=sum((p.paths for p in parts), []) if parts[0].paths is not None else None)
    offset = 0
    for p in parts:
        out.errors.update({offset + i: e for i, e in p.errors.items()})
        offset += len(p.image_scores)
    return out


def _score_batch(index: PatchIndex, batch, k: int, b: int, maps: bool, sigma: float, weights) -> SearchResult:
    emb = embedder_for(index, weights)(batch).numpy()  # (B, h, w, d)
    n, h, w, d = emb.shape
    result = index.search(emb.reshape(n, h * w, d), k, b)
    result.grid = (h, w)
    if maps:
        result.anomaly_maps = anomaly_maps(result.patch_scores.reshape(n, h, w), tuple(batch.shape[-2:]), sigma)
    return result


def _expand(part: SearchResult | None, good: list[int], n: int, errors: dict, paths: list[str], k: int,
            p: int, crop: int | None) -> SearchResult:
    """Place the results of the readable images of a batch among its unreadable ones."""
    if part is not None and len(good) == n:
        part.paths, part.errors = paths, errors
        return part
    dist = np.full((n, p, k), np.nan, np.float32)
    loc = np.full((n, p, k), -1, np.int64)
    scores = np.full(n, np.nan, np.float32)
    top = np.full(n, -1, np.int64)
    amaps = np.full((n, crop, crop), np.nan, np.float32) if crop else None
    grid = None
    if part is not None:
        dist[good], loc[good], scores[good], top[good] = part.distances, part.locations, part.image_scores, \
            part.top_patches
        if amaps is not None:
            amaps[good] = part.anomaly_maps
        grid = part.grid
    return SearchResult(dist, loc, scores, top, grid=grid, anomaly_maps=amaps, paths=paths, errors=errors)
