"""What a search returns: :class:`SearchResult`."""

from __future__ import annotations

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
        top_patches: int64 (N,) flat index of the patch with the largest nearest-neighbour distance.
        grid: (h, w) patch grid, P = h * w (None for :meth:`PatchIndex.search` on flat patch lists).
        anomaly_maps: float32 (N, H, W) anomaly maps, or None.
        paths: image paths, or None.
        errors: {image position: message} for images that could not be read (their
            rows hold NaN scores and -1 locations).
    """

    distances: np.ndarray
    locations: np.ndarray
    image_scores: np.ndarray
    top_patches: np.ndarray
    grid: tuple[int, int] | None = None
    anomaly_maps: np.ndarray | None = None
    paths: list[str] | None = None
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def patch_scores(self) -> np.ndarray:
        """float32 (N, P): nearest-neighbour L2 distance of every patch."""
        return self.distances[..., 0]
