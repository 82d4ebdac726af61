"""Defect regions: the connected blobs of an anomaly map above the pixel threshold.

Each region is reported with its bounding box, area and peak in the pixels of the
original frame, ready to draw (:func:`patchsearch.render.overlay`) or to log.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .errors import InputError

# 8-connectivity: pixels touching by a corner belong to one region, as for MVTec AD's
# ground-truth regions (metrics.aupro).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def defect_regions(amap, threshold: float, min_area: int = 0,
                   scale: tuple[float, float] = (1.0, 1.0)) -> list[dict]:
    """The 8-connected regions of ``amap >= threshold``, strongest first.

    Args:
        amap: float (H, W) anomaly map (PatchCore: L2 distance per pixel).
        threshold: pixel threshold in map units (``thresholds.fit_pixel_threshold``);
            a pixel belongs to a region when its value is >= threshold.
        min_area: regions with a smaller area (frame pixels, see below) are dropped.
        scale: (sx, sy) frame pixels per map pixel, i.e. (frame_W / map_W,
            frame_H / map_H), when the map has a lower resolution than the frame.

    Returns:
        One dict per region, sorted by peak descending (ties: larger area first)::

            {"bbox": [x0, y0, x1, y1],  # int frame pixels, x1/y1 exclusive; the map
                                        # pixels' extent scaled, floor/ceil outwards
             "area": int,               # map pixels in the region x sx x sy, rounded
             "peak": float,             # max map value in the region
             "peak_xy": [x, y],         # int frame pixel at the centre of the peak's map
                                        # pixel (a flat peak: its first in raster order)
             "mean": float}             # mean map value in the region

        With the default scale every geometry is in map pixels, exactly.

    Raises:
        InputError: amap is not 2-D or holds NaN (the frame is then an error, never
            "no defect": fail closed), threshold is not finite, or scale is not positive.
    """
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise InputError(f"anomaly map must be 2-D (H, W), got shape {amap.shape}")
    if np.isnan(amap).any():
        raise InputError("anomaly map contains NaN; the frame cannot be judged")
    if not math.isfinite(threshold):
        raise InputError(f"pixel threshold must be finite, got {threshold}")
    sx, sy = (float(s) for s in scale)
    if not (sx > 0 and sy > 0):
        raise InputError(f"scale must be two positive numbers (sx, sy), got {scale}")

    labels, n = ndimage.label(amap >= threshold, structure=_EIGHT_CONNECTED)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = np.rint(np.bincount(labels.ravel(), minlength=n + 1)[1:] * (sx * sy)).astype(np.int64)
    peaks = ndimage.maximum(amap, labels, index)
    means = ndimage.mean(amap, labels, index)
    boxes = ndimage.find_objects(labels)
    # Peak pixel: the first in raster order that reaches the region's max (scipy's
    # maximum_position does not say which one it returns for a flat peak).
    flat_labels = labels.ravel()
    at_peak = np.flatnonzero(flat_labels)
    at_peak = at_peak[amap.ravel()[at_peak] == peaks[flat_labels[at_peak] - 1]]
    _, first = np.unique(flat_labels[at_peak], return_index=True)
    peak_rows, peak_cols = np.unravel_index(at_peak[first], amap.shape)

    regions = []
    for area, peak, r, c, mean, (rows, cols) in zip(areas, peaks, peak_rows, peak_cols, means, boxes):
        if area < min_area:
            continue
        regions.append({
            "bbox": [math.floor(cols.start * sx), math.floor(rows.start * sy),
                     math.ceil(cols.stop * sx), math.ceil(rows.stop * sy)],
            "area": int(area),
            "peak": float(peak),
            "peak_xy": [math.floor((c + 0.5) * sx), math.floor((r + 0.5) * sy)],
            "mean": float(mean),
        })
    regions.sort(key=lambda reg: (-reg["peak"], -reg["area"]))
    return regions


def _down(v) -> int:
    """floor, forgiving float noise (3 * (300 / 100) is 9, not 9.000000000000002)."""
    return math.floor(float(v) + 1e-9)


def _up(v) -> int:
    """ceil, forgiving float noise."""
    return math.ceil(float(v) - 1e-9)


def frame_regions(input_map, threshold: float, min_area: int, geometry, frame_size) -> list[dict]:
    """:func:`defect_regions` of a map in backbone-input pixels, reported in frame pixels.

    The regions are labelled on ``input_map`` (the input's resolution: cheap whatever the
    frame's size) and mapped onto the frame by ``geometry``
    (:meth:`~patchsearch.geometry.Geometry.input_to_frame_xy`: resized back, crop offset
    added, a turned frame turned back): boxes rounded outwards (floor / ceil) and clipped
    to the frame, areas in frame pixels (input pixels x frame pixels per input pixel,
    rounded), the peak at the frame pixel under the centre of its input pixel.

    Args:
        input_map: float (H, W) anomaly map in input pixels (crop mode: the crop).
        threshold, min_area: see :func:`defect_regions` (``min_area`` in frame pixels).
        geometry: the index's :class:`~patchsearch.geometry.Geometry`.
        frame_size: (width, height) of the frame, pixels.

    Returns:
        The regions as :func:`defect_regions` returns them, in frame pixels.

    Raises:
        InputError: see :func:`defect_regions`.
    """
    w, h = (int(v) for v in frame_size)
    ux, uy = geometry.input_to_frame_xy([0.0, 1.0], [0.0, 1.0], (w, h))
    pixel_area = abs(ux[1] - ux[0]) * abs(uy[1] - uy[0])  # frame pixels per input pixel
    out = []
    for r in defect_regions(input_map, threshold):
        area = int(round(r["area"] * pixel_area))
        if area < min_area:
            continue
        x0, y0, x1, y1 = r["bbox"]
        xs, ys = geometry.input_to_frame_xy([x0, x1], [y0, y1], (w, h))
        (fx0, fx1), (fy0, fy1) = sorted(xs), sorted(ys)
        px, py = geometry.input_to_frame_xy(r["peak_xy"][0] + 0.5, r["peak_xy"][1] + 0.5, (w, h))
        out.append({**r, "bbox": [max(0, _down(fx0)), max(0, _down(fy0)), min(w, _up(fx1)), min(h, _up(fy1))],
                    "area": area, "peak_xy": [min(w - 1, max(0, _down(px))), min(h - 1, max(0, _down(py)))]})
    return out
