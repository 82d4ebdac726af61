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

    Keys: ``path``; ``decision`` ("OK", "NG", "ERROR"; None when the index is not
    calibrated), ``image_score`` (Eq. 7, L2), ``normalized_score`` (score / threshold,
    1.0 at the threshold) and ``threshold``; ``top_patch`` (tile, row, col) with its k
    nearest memory-bank L2 ``distances``, ``locations`` (bank rows) and ``neighbours``
    (the training image and patch of each); ``regions`` (bbox, area, peak in
    original-frame pixels). An unreadable frame gets ``decision: "ERROR"`` and ``error``.
    """
    decisions = part.decisions
    out = {"path": part.paths[i] if part.paths else None,
           "decision": "ERROR" if i in part.errors else (None if decisions is None else str(decisions[i])),
           "threshold": part.threshold}
    if i in part.errors:
        return {**out, "error": part.errors[i]}
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


def write_maps(index: PatchIndex, part: SearchResult, i: int, png: Path, raw: Path | None = None) -> None:
    """Write image ``i``'s heatmap over its frame (``png``) and its raw map (``raw``: .npy or
    16-bit .png, :func:`patchsearch.render.write_raw_map`).

    The colour scale is fixed by the calibrated pixel threshold (red at and above it, the
    frame unchanged below half of it); region outlines are drawn. Uncalibrated indexes
    scale by the largest value of the map instead (said in the file name: ``_relative``).
    """
    from .data import load_image
    from .query import geometry_of
    from .render import overlay, save_png, write_raw_map

    frame = np.asarray(load_image(part.paths[i]))
    amap = part.anomaly_maps[i]
    if raw is not None:
        write_raw_map(raw, amap)
    geometry = geometry_of(index)
    h, w = frame.shape[:2]
    left, top, right, bottom = (int(round(v)) for v in geometry.crop_box(w, h))
    if amap.shape != (bottom - top, right - left):  # crop mode: the map covers the crop box only
        from PIL import Image

        amap = np.asarray(Image.fromarray(amap).resize((right - left, bottom - top), Image.BILINEAR))
    full = np.zeros((h, w), np.float32)
    full[top:bottom, left:right] = amap
    threshold = part.pixel_threshold or max(float(np.nanmax(amap)), 1e-12)
    save_png(png, overlay(frame, full, threshold, part.regions[i] if part.regions is not None else None))
