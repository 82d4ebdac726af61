"""What a search returns: :class:`SearchResult`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SearchResult:
    """Search results for N images of P patches each.

    Attributes:
        distances: float32 (N, P, k) L2 distances (not squared) to the k nearest
            memory-bank rows, ascending.
        locations: int64 (N, P, k) memory-bank rows of those neighbours.
        image_scores: float32 (N,) reweighted image scores (paper Eq. 7), L2 units.
        top_patches: int64 (N,) index into P of the patch with the largest
            nearest-neighbour distance (P runs tile by tile, then row-major).
        grid: (h, w) patch grid of one tile, or None for :meth:`PatchIndex.search`.
        tiles: tiles per frame T (P = T * h * w).
        anomaly_maps: None, or one float32 map per image: (h, w) of the original frame in
            whole-frame mode, (crop, crop) in crop mode; NaN-filled for unreadable images.
        paths: image paths, or None.
        errors: {image position: message} for images that could not be read (their
            rows hold NaN scores and -1 locations).
        reasons: {image position: reason} for the entries of ``errors`` (``unreadable``,
            ``too_large``, ``unsupported_format``, ``non_finite_pixels``,
            ``out_of_range_pixels``); an entry missing here is ``unreadable``.
        threshold: the image threshold the decisions use (L2), or None (uncalibrated:
            every decision is then ERROR, reason ``uncalibrated``).
        pixel_threshold: the pixel threshold of the regions (L2), or None.
        regions: None, or per image a list of defect regions
            (:func:`patchsearch.regions.defect_regions`, in original-frame pixels).
    """

    distances: np.ndarray
    locations: np.ndarray
    image_scores: np.ndarray
    top_patches: np.ndarray
    grid: tuple[int, int] | None = None
    tiles: int = 1
    anomaly_maps: list | None = None
    paths: list[str] | None = None
    errors: dict[int, str] = field(default_factory=dict)
    threshold: float | None = None
    pixel_threshold: float | None = None
    regions: list | None = None
    reasons: dict[int, str] = field(default_factory=dict)

    @property
    def patch_scores(self) -> np.ndarray:
        """float32 (N, P): nearest-neighbour L2 distance of every patch."""
        return self.distances[..., 0]

    @property
    def decisions(self) -> np.ndarray:
        """str (N,): "NG" (score >= threshold), "OK", or "ERROR" for an image that could not
        be judged: unreadable (``errors``), NaN, infinite or negative score, or no threshold
        (uncalibrated). Never "OK" then, never missing: :meth:`reason` says why."""
        n = len(self.image_scores)
        if self.threshold is None:
            return np.full(n, "ERROR", dtype="<U5")
        from .thresholds import decide

        out = np.asarray(decide(self.image_scores, self.threshold), dtype="<U5").reshape(n)
        out[list(self.errors)] = "ERROR"
        return out

    def reason(self, i: int) -> str | None:
        """Why image ``i`` is "ERROR" (None when it is OK or NG): its ``reasons`` entry for
        an unreadable frame (``unreadable`` by default), ``uncalibrated`` without a
        threshold, ``non_finite_score`` for a NaN, infinite or negative image score."""
        if i in self.errors:
            return self.reasons.get(i, "unreadable")
        if self.threshold is None:
            return "uncalibrated"
        score = float(self.image_scores[i])
        return None if math.isfinite(score) and score >= 0 else "non_finite_score"

    @property
    def normalized_scores(self) -> np.ndarray | None:
        """float64 (N,): image score / threshold (1.0 at the threshold), or None when uncalibrated."""
        return None if self.threshold is None else np.asarray(self.image_scores, np.float64) / self.threshold

    def frame(self, i: int) -> "SearchResult":
        """Image ``i`` alone, as a result of one image (arrays sliced, not copied; maps and
        regions only if already computed)."""
        return SearchResult(
            self.distances[i:i + 1], self.locations[i:i + 1], self.image_scores[i:i + 1],
            self.top_patches[i:i + 1], grid=self.grid, tiles=self.tiles,
            anomaly_maps=None if self.anomaly_maps is None else self.anomaly_maps[i:i + 1],
            paths=None if self.paths is None else self.paths[i:i + 1],
            errors={0: self.errors[i]} if i in self.errors else {}, threshold=self.threshold,
            pixel_threshold=self.pixel_threshold, regions=None if self.regions is None else self.regions[i:i + 1],
            reasons={0: self.reasons[i]} if i in self.reasons else {})

    def top_patch(self, i: int) -> dict:
        """{"tile", "row", "col"} of image i's top patch (on its tile's patch grid)."""
        h, w = self.grid or (1, len(self.distances[i]))
        tile, rest = divmod(int(self.top_patches[i]), h * w)
        return {"tile": tile, "row": rest // w, "col": rest % w}
