"""Results as a person or a line controller reads them: one JSON record per frame, heatmaps.

Shared by the CLI (``patchsearch query``) and any service over the library, so that
both say the same thing about a frame.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .index import PatchIndex
from .result import SearchResult


def record(index: PatchIndex, part: SearchResult, i: int) -> dict:
    """The JSON-able verdict on image ``i`` of ``part``.

    Keys: ``path``; ``decision``, always one of "OK", "NG", "ERROR", and for ERROR a
    ``reason`` (:meth:`SearchResult.reason`: ``unreadable``, ``too_large``,
    ``unsupported_format``, ``non_finite_pixels``, ``out_of_range_pixels``,
    ``uncalibrated``, ``non_finite_score``) and an ``error`` message; ``image_score``
    (Eq. 7, L2), ``normalized_score`` (score / threshold, 1.0 at the threshold) and
    ``threshold``; ``top_patch`` (tile, row, col) with its k nearest memory-bank L2
    ``distances``, ``locations`` (bank rows) and ``neighbours`` (the training image and
    patch of each); ``regions`` (bbox, area, peak in original-frame pixels). A frame that
    could not be read has only ``path``, ``decision``, ``reason``, ``threshold``, ``error``.
    """
    decision = str(part.decisions[i])
    out = {"path": part.paths[i] if part.paths else None, "decision": decision, "threshold": part.threshold}
    if decision == "ERROR":
        out["reason"] = part.reason(i)
    if i in part.errors:
        return {**out, "error": part.errors[i]}
    if out.get("reason") == "uncalibrated":
        out["error"] = "the index has no image threshold (not calibrated): run patchsearch calibrate, or pass one"
    elif out.get("reason") == "non_finite_score":
        out["error"] = "the image score is not a finite distance; the frame cannot be judged"
    top = int(part.top_patches[i])
    score = float(part.image_scores[i])
    out.update({"image_score": score if math.isfinite(score) else None,
                "normalized_score": None if part.threshold is None else score / part.threshold,
                "top_patch": part.top_patch(i),
                "distances": [float(x) for x in part.distances[i, top]],
                "locations": [int(x) for x in part.locations[i, top]],
                "neighbours": index.describe_locations(part.locations[i, top])})
    if part.regions is not None:
        out["regions"] = part.regions[i]
    return out


def write_maps(index: PatchIndex, part: SearchResult, i: int, png: Path, raw: Path | None = None,
               max_pixels: int | None = None) -> None:
    """Write image ``i``'s heatmap over its frame (``png``) and its raw map (``raw``: .npy or
    16-bit .png, :func:`patchsearch.render.write_raw_map`).

    The colour scale is fixed by the calibrated pixel threshold (red at and above it, the
    frame unchanged below half of it); region outlines are drawn. Uncalibrated indexes
    scale by the largest value of the map instead (said in the file name: ``_relative``).
    The frame is decoded again with the index's bit depth, within ``max_pixels``
    (default :data:`patchsearch.data.DEFAULT_MAX_PIXELS`).
    """
    from .data import DEFAULT_MAX_PIXELS, load_image
    from .render import save_png, write_raw_map

    if raw is not None:
        write_raw_map(raw, part.anomaly_maps[i])
    bit_depth = (index.manifest.extra.get("decode") or {}).get("bit_depth")  # as the frame was judged
    frame = load_image(part.paths[i], bit_depth, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    save_png(png, heatmap(index, part, i, np.asarray(frame)))


def heatmap(index: PatchIndex, part: SearchResult, i: int, frame) -> np.ndarray:
    """Image ``i``'s heatmap over its frame: uint8 (H, W, 3) RGB, the frame's size.

    Args:
        frame: uint8 (H, W, 3) RGB of the frame as decoded (:func:`patchsearch.data.load_image`
            or :func:`~patchsearch.data.decode_image`).

    The colour scale is fixed by the calibrated pixel threshold (see :mod:`patchsearch.render`);
    uncalibrated indexes scale by the largest value of the map instead.

    Raises:
        InputError: the map holds NaN (an unreadable frame has no heatmap).
    """
    from .render import overlay

    frame = np.asarray(frame)
    amap = part.anomaly_maps[i]
    geometry = index.manifest.frame_geometry()
    h, w = frame.shape[:2]
    left, top, right, bottom = (int(round(v)) for v in geometry.crop_box(w, h))
    if amap.shape != (bottom - top, right - left):  # crop mode: the map covers the crop box only
        from PIL import Image

        amap = np.asarray(Image.fromarray(amap).resize((right - left, bottom - top), Image.BILINEAR))
    full = np.zeros((h, w), np.float32)
    full[top:bottom, left:right] = amap
    threshold = part.pixel_threshold or max(float(np.nanmax(amap)), 1e-12)
    return overlay(frame, full, threshold, part.regions[i] if part.regions is not None else None)


def patch_box(geometry, grid, frame_size, tile: int, row: int, col: int, context: int = 1) -> tuple[int, int, int, int]:
    """Where a patch of the patch grid lies on its frame: (left, top, right, bottom) frame
    pixels, right/bottom exclusive, clipped to the frame.

    Args:
        geometry: the category's :class:`~patchsearch.geometry.Geometry`.
        grid: (gh, gw) patch grid of one tile (the manifest's ``grid``).
        frame_size: (width, height) of the frame, pixels.
        tile, row, col: the patch (as in a memory-bank location or ``top_patch``).
        context: cells added on each side; 1 (default) gives the 3 x 3 neighbourhood whose
            features the patch embedding averages (PatchCore's local aggregation).

    Raises:
        InputError: tile, row or col outside the grid.
    """
    from .errors import InputError

    boxes = geometry.tile_boxes()
    gh, gw = (int(v) for v in grid)
    if not (0 <= tile < len(boxes) and 0 <= row < gh and 0 <= col < gw):
        raise InputError(f"patch (tile {tile}, row {row}, col {col}) is outside the {len(boxes)} tiles of {gh}x{gw}")
    top, left, bottom, right = boxes[tile]
    fy, fx = (bottom - top) / gh, (right - left) / gw
    H, W = geometry.input_size
    y0, y1 = max(0.0, top + (row - context) * fy), min(float(H), top + (row + 1 + context) * fy)
    x0, x1 = max(0.0, left + (col - context) * fx), min(float(W), left + (col + 1 + context) * fx)
    w, h = frame_size
    xs, ys = geometry.input_to_frame_xy([x0, x1], [y0, y1], (w, h))  # a turned frame swaps the axes
    (fx0, fx1), (fy0, fy1) = sorted(xs), sorted(ys)
    return (max(0, int(math.floor(fx0))), max(0, int(math.floor(fy0))),
            min(int(w), int(math.ceil(fx1))), min(int(h), int(math.ceil(fy1))))
