#!/usr/bin/env python
"""Cross-check ``patchsearch.metrics.aupro`` against anomalib's ``AUPRO`` on the same maps.

Both compute MVTec AD's AUPRO (per-region overlap up to FPR 0.3, normalised by 0.3;
Bergmann et al., IJCV 2021) on random masks and anomaly maps of several kinds, and
the script prints a markdown table: ours, anomalib's, absolute difference. It exits
non-zero when a difference exceeds ``--tol`` (default 0.005).

anomalib is not a dependency of patchsearch: run this with a Python that has both,
e.g. a throwaway venv (``pip install anomalib`` there, or ``--no-deps`` plus what its
metric imports: torch, torchmetrics, kornia, opencv-python-headless, matplotlib, ...)::

    PYTHONPATH=. /path/to/anomalib-venv/bin/python scripts/check_aupro.py
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from scipy import ndimage

from patchsearch.metrics import aupro


def _rect_masks(rng, n, size, regions):
    masks = np.zeros((n, size, size), bool)
    for mask in masks[: n - 2]:                            # the last two images are good
        for _ in range(regions):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, size // 4, 2)
            mask[y:y + h, x:x + w] = True
    return masks


def _ellipse_masks(rng, n, size):
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for mask in masks[: n - 1]:
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(2, size / 6, 2)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def cases(seed):
    """(name, masks bool (N, H, W), maps float32 (N, H, W)) of different character."""
    rng = np.random.default_rng(seed)
    masks = _rect_masks(rng, 8, 64, 3)
    yield "noise, rectangles 64x64", masks, rng.normal(masks * 1.0, 1.0).astype(np.float32)
    masks = _ellipse_masks(rng, 10, 128)
    smooth = np.stack([ndimage.gaussian_filter(m * 2.0 + rng.normal(0, 1.5, m.shape), 3) for m in masks])
    yield "smooth (blurred), ellipses 128x128", masks, smooth.astype(np.float32)
    masks = _rect_masks(rng, 6, 96, 2)
    ties = np.round(rng.normal(masks * 0.8, 1.0) / 0.25) * 0.25
    yield "many ties (0.25 steps) 96x96", masks, ties.astype(np.float32)
    masks = _ellipse_masks(rng, 12, 256)
    weak = np.stack([ndimage.gaussian_filter(m * 0.3 + rng.normal(0, 1.0, m.shape), 2) for m in masks])
    yield "weak signal, ellipses 256x256", masks, weak.astype(np.float32)
    masks = _rect_masks(rng, 5, 64, 4)
    yield "uninformative (uniform noise)", masks, rng.random(masks.shape).astype(np.float32)


def anomalib_aupro(masks, maps, fpr_limit):
    import torch
    from anomalib.metrics.aupro import _AUPRO

    metric = _AUPRO(fpr_limit=fpr_limit)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int64)))
    return float(metric.compute())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    parser.add_argument("--tol", type=float, default=0.005)
    args = parser.parse_args()

    import anomalib

    print(f"AUPRO up to FPR {args.fpr_limit}, anomalib {anomalib.__version__}, seed {args.seed}\n")
    print("| maps | ours | anomalib | abs diff |")
    print("| --- | --- | --- | --- |")
    worst = 0.0
    for name, masks, maps in cases(args.seed):
        ours = aupro(masks, maps, fpr_limit=args.fpr_limit)
        theirs = anomalib_aupro(masks, maps, args.fpr_limit)
        worst = max(worst, abs(ours - theirs))
        print(f"| {name} | {ours:.6f} | {theirs:.6f} | {abs(ours - theirs):.2e} |")
    print(f"\nlargest difference {worst:.2e} (tolerance {args.tol})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
