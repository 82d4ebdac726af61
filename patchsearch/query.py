"""Images in, results out: frames -> patch embeddings -> :class:`PatchIndex` -> anomaly maps.

The embedder is the one the index was built with (backbone, layers, weights checked
by SHA-256), loaded once per index and cached on it. Frames are decoded and embedded
in batches (bounded memory); an unreadable frame does not stop its batch: its result
rows hold NaN scores, -1 locations and an entry in ``errors``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Iterator

import numpy as np

from .device import is_tensor
from .device_search import embed
from .embedders import embedder_for, embedder_key, input_norm_of  # noqa: F401 (API)
from .errors import InputError
from .index import K, PatchIndex
from .bank import B
from .result import SearchResult
from .score import SIGMA, anomaly_maps


def geometry_of(index: PatchIndex):
    """The :class:`~patchsearch.geometry.Geometry` the index was built with
    (:meth:`~patchsearch.format.Manifest.frame_geometry`)."""
    return index.manifest.frame_geometry()


def thresholds_of(index: PatchIndex, threshold: float | None = None) -> tuple[float | None, float | None, int]:
    """(image threshold, pixel threshold, minimum region area in frame pixels) of the index
    (:meth:`~patchsearch.format.Manifest.thresholds`); ``threshold`` overrides the image one."""
    return index.manifest.thresholds(threshold)


def iter_query(index: PatchIndex, images, k: int = K, b: int = B, batch_size: int = 16, maps: bool = True,
               sigma: float = SIGMA, threshold: float | None = None, regions: bool = True,
               weights: str | None = None, max_pixels: int | None = None) -> Iterator[SearchResult]:
    """Like :func:`query`, one :class:`SearchResult` per batch of images (bounded memory)."""
    import torch

    from .data import DEFAULT_MAX_PIXELS, iter_batches

    image_t, pixel_t, _ = thresholds_of(index, threshold)
    embedder_for(index, weights)  # fail before reading any frame if the index cannot embed
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"image tensor must be (N, 3, H, W), got {tuple(images.shape)}")
        for start in range(0, len(images), batch_size):
            part = _search_tensor(index, images[start:start + batch_size].float(), k, b, weights)
            if maps:
                h, w = part.grid
                part.anomaly_maps = list(anomaly_maps(part.patch_scores.reshape(-1, h, w), images.shape[-2:], sigma,
                                                      device=index.device))
            part.threshold = image_t
            yield part
        return
    paths = [Path(p) for p in images]
    geometry = geometry_of(index)
    bit_depth = (index.manifest.extra.get("decode") or {}).get("bit_depth")
    budget = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    for batch in iter_batches(paths, geometry, batch_size, bit_depth=bit_depth, max_pixels=budget):
        first = min(batch.good + list(batch.errors))
        n = len(batch.good) + len(batch.errors)
        part = None
        if batch.tensor is not None:
            emb = embed(embedder_for(index, weights), batch.tensor)  # stays on the embedder's device
            part = judge(index, emb, batch.frame_sizes, k, b, False, sigma, threshold, regions)
            if maps or (regions and part.pixel_threshold is not None):  # regions need no frame-size map
                add_maps(index, part, batch.frame_sizes, sigma, regions, maps)
        result = _expand(part, [i - first for i in batch.good], n, {i - first: e for i, e in batch.errors.items()},
                         [str(p) for p in paths[first:first + n]], k, maps)
        result.reasons = {i - first: r for i, r in batch.reasons.items()}
        result.threshold, result.pixel_threshold = image_t, pixel_t
        yield result


def judge(index: PatchIndex, embeddings: np.ndarray, frame_sizes, k: int = K, b: int = B, maps: bool = True,
          sigma: float = SIGMA, threshold: float | None = None, regions: bool = True) -> SearchResult:
    """Search and judge N frames already embedded (what :func:`iter_query` does after the backbone).

    Args:
        embeddings: float32 (N * T, h, w, d) patch embeddings of the frames' T tiles each
            (frame-major; numpy, or a torch tensor, searched on the index's device), as the
            index's embedder returns them for
            ``geometry_of(index).frame_tensor(frame)`` stacked.
        frame_sizes: (width, height) of each of the N original frames, pixels.
        k, b, maps, sigma, threshold, regions: see :func:`query`.

    Returns:
        :class:`SearchResult` of the N frames with ``threshold``/``pixel_threshold`` set
        (hence decisions), and with ``maps`` their anomaly maps and regions.

    Raises:
        InputError: wrong shapes or dimension, NaN/inf embeddings, k beyond the memory bank.
    """
    image_t, pixel_t, min_area = thresholds_of(index, threshold)
    n = len(frame_sizes)
    if n == 0 or len(embeddings) % n:
        raise InputError(f"{len(embeddings)} tile embeddings do not divide into {n} frames")
    emb = embeddings if is_tensor(embeddings) else np.asarray(embeddings)
    part = _search_embeddings(index, emb, k, b, tiles=len(embeddings) // n)
    part.threshold, part.pixel_threshold = image_t, pixel_t
    if maps:
        add_maps(index, part, frame_sizes, sigma, regions)
    return part


def add_maps(index: PatchIndex, part: SearchResult, frame_sizes, sigma: float = SIGMA,
             regions: bool = True, maps: bool = True) -> SearchResult:
    """Anomaly maps (and, with a pixel threshold, defect regions) of frames already searched.

    :func:`judge` with ``maps=False, regions=False`` followed by this equals :func:`judge`:
    the service searches a batch in one call and draws each frame's map in its own request
    thread. The map is made at the backbone input's resolution (Gaussian of ``sigma`` input
    pixels) and the regions are found there and scaled to frame pixels
    (:func:`patchsearch.regions.frame_regions`); only ``maps=True`` resizes it to the frame.

    Args:
        part: :class:`SearchResult` of N frames from :func:`judge` (``grid`` and ``tiles``
            set; ``pixel_threshold`` as it left it). Filled in place.
        frame_sizes: (width, height) of each of the N original frames, pixels.
        sigma, regions: see :func:`query`.
        maps: also set ``anomaly_maps`` (at frame resolution, see :class:`SearchResult`).

    Returns:
        ``part``, with ``anomaly_maps`` (with ``maps``) and ``regions`` (when it has a
        pixel threshold; a frame with a NaN or infinite score has none: it is ERROR).
    """
    _, _, min_area = thresholds_of(index)
    pixel_t = part.pixel_threshold if regions else None
    _frame_maps(part, geometry_of(index), list(frame_sizes), sigma, pixel_t, min_area, maps, index.device)
    return part


def query(index: PatchIndex, images, k: int = K, b: int = B, batch_size: int = 16, maps: bool = True,
          sigma: float = SIGMA, threshold: float | None = None, regions: bool = True,
          weights: str | None = None, max_pixels: int | None = None) -> SearchResult:
    """Embed and search images with the backbone the index was built with.

    Args:
        index: the :class:`PatchIndex` (built by ``patchsearch build``: it records its backbone).
        images: image paths (str or Path), or a float32 tensor (N, 3, H, W) already
            preprocessed (ImageNet-normalised backbone input).
        k, b: see :meth:`PatchIndex.search`.
        batch_size: images embedded at a time.
        maps: keep the anomaly maps (one float32 (h, w) per frame at frame resolution,
            resized once from the input-resolution map: see :class:`SearchResult`).
        sigma: Gaussian blur of the anomaly maps, input pixels (PatchCore: 4).
        threshold: image threshold overriding the calibrated one (L2).
        regions: find defect regions (needs a calibrated pixel threshold; found on the
            input-resolution map, reported in frame pixels, also without ``maps``).
        weights: see :func:`embedder_for`.
        max_pixels: the pixel budget per frame (default
            :data:`patchsearch.data.DEFAULT_MAX_PIXELS`): larger frames are ERROR
            ``too_large``, refused from their header.

    Returns:
        :class:`SearchResult` with ``paths`` (for path input), ``anomaly_maps``,
        ``regions``, ``threshold`` (hence ``decisions``, always OK, NG or ERROR) and
        ``errors`` / ``reasons`` for frames that could not be read.

    Raises:
        InputError: no image, a bad tensor shape.
        IndexFormatError: see :func:`embedder_for`.
    """
    parts = list(iter_query(index, images, k, b, batch_size, maps, sigma, threshold, regions, weights, max_pixels))
    if not parts:
        raise InputError("no image to query")
    out = SearchResult(
        np.concatenate([p.distances for p in parts]), np.concatenate([p.locations for p in parts]),
        np.concatenate([p.image_scores for p in parts]), np.concatenate([p.top_patches for p in parts]),
        grid=parts[0].grid, tiles=parts[0].tiles,
        anomaly_maps=sum((p.anomaly_maps for p in parts), []) if maps else None,
        paths=sum((p.paths for p in parts), []) if parts[0].paths is not None else None,
        threshold=parts[0].threshold, pixel_threshold=parts[0].pixel_threshold,
        regions=sum((p.regions for p in parts), []) if parts[0].regions is not None else None)
    offset = 0
    for p in parts:
        out.errors.update({offset + i: e for i, e in p.errors.items()})
        out.reasons.update({offset + i: r for i, r in p.reasons.items()})
        offset += len(p.image_scores)
    return out


def _search_tensor(index: PatchIndex, batch, k: int, b: int, weights, tiles: int = 1) -> SearchResult:
    """Embed (B * tiles, 3, th, tw) and search each frame's tiles together as one image."""
    return _search_embeddings(index, embed(embedder_for(index, weights), batch), k, b, tiles)


def _search_embeddings(index: PatchIndex, emb, k: int, b: int, tiles: int = 1) -> SearchResult:
    """Search (B * tiles, h, w, d) embeddings (numpy or torch), each frame's tiles together as one image."""
    n, h, w, d = emb.shape
    result = index.search(emb.reshape(n // tiles, tiles * h * w, d), k, b)
    result.grid, result.tiles = (h, w), tiles
    return result


def _frame_maps(part: SearchResult, geometry, frame_sizes, sigma: float, pixel_t: float | None,
                min_area: int, maps: bool = True, device: str | None = None) -> None:
    """Anomaly maps of each frame (tiles stitched) at input resolution (upsampled and blurred
    on ``device``), regions found there (with a pixel threshold) in frame pixels, and with
    ``maps`` the maps resized to the frames."""
    from .regions import frame_regions

    h, w = part.grid
    scores = part.patch_scores.reshape(len(frame_sizes), part.tiles, h, w)
    part.anomaly_maps = [] if maps else None
    part.regions = [] if pixel_t is not None else None
    for grid, size in zip(scores, frame_sizes):
        grid = geometry.stitch(grid) if part.tiles > 1 else grid[0]
        imap = anomaly_maps(grid[None], geometry.input_size, sigma, device=device)
        if maps:
            part.anomaly_maps.append(geometry.map_to_frame(imap, size)[0])
        if pixel_t is not None:  # a NaN map (a frame that cannot be judged) has no region: it is ERROR
            ok = bool(np.isfinite(imap).all())
            part.regions.append(frame_regions(imap[0], pixel_t, min_area, geometry, size) if ok else [])


def _expand(part: SearchResult | None, good: list[int], n: int, errors: dict, paths: list[str], k: int,
            maps: bool) -> SearchResult:
    """Place the results of the readable images of a batch among its unreadable ones
    (NaN scores, -1 locations, NaN maps, no regions: never judged good)."""
    if part is not None and len(good) == n:
        part.paths, part.errors = paths, errors
        return part
    p = part.distances.shape[1] if part is not None else 1
    dist = np.full((n, p, k), np.nan, np.float32)
    loc = np.full((n, p, k), -1, np.int64)
    scores = np.full(n, np.nan, np.float32)
    top = np.full(n, -1, np.int64)
    amaps = [np.full((1, 1), np.nan, np.float32) for _ in range(n)] if maps else None
    regions = [[] for _ in range(n)] if part is not None and part.regions is not None else None
    out = SearchResult(dist, loc, scores, top, paths=paths, errors=errors, anomaly_maps=amaps, regions=regions)
    if part is not None:
        dist[good], loc[good], scores[good], top[good] = part.distances, part.locations, part.image_scores, \
            part.top_patches
        out.grid, out.tiles = part.grid, part.tiles
        for j, i in enumerate(good):
            if maps:
                amaps[i] = part.anomaly_maps[j]
            if regions is not None:
                regions[i] = part.regions[j]
    return out


class _CallableModule(types.ModuleType):
    """``patchsearch.query`` names both this module and the function :func:`query`
    (``patchsearch.query(index, frames)``); importing the submodule sets the package's
    attribute to the module, so the module calls :func:`query`."""

    def __call__(self, index, images, **kwargs) -> SearchResult:
        return query(index, images, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
