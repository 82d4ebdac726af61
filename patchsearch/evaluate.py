"""Evaluation on a labelled test split: what the field reports, and what a line would get.

* image AUROC (detection) and pixel AUROC (segmentation), as in the PatchCore paper;
* AUPRO up to 30 % false-positive rate (MVTec AD's per-region overlap);
* precision, recall and F1 of the decisions at the calibrated threshold (what a line
  running this index would get), and F1-max (the oracle threshold, for comparison);
* per defect type: image AUROC against the good images and the share judged NG.

Maps and masks are compared in the coordinates of :meth:`Geometry.frame_map`: the whole
original frame in whole-frame mode, the centre crop in crop mode (the paper's protocol).
"""

from __future__ import annotations

import os
import time

import numpy as np

from .errors import InputError
from .index import PatchIndex


def evaluate(index: PatchIndex, data_root: str | os.PathLike, category: str, batch_size: int = 16,
             progress: bool = False) -> dict:
    """Score the test split of an MVTec AD layout category.

    Returns:
        {"category", "image_auroc", "pixel_auroc", "aupro" (FPR <= 0.3), "threshold" (image,
        L2, or None), "at_threshold": {"precision", "recall", "f1", "tp", "fp", "fn", "tn"} or None,
        "f1_max": {"f1", "threshold", "precision", "recall"}, "per_defect": {defect: {"images",
        "image_auroc", "ng"}}, "good_ng" (good images judged NG), "geometry", "counts",
        "seconds", "seconds_per_image"}.

    Raises:
        InputError: missing data, unreadable test image or mask.
    """
    from .data import load_image, test_samples
    from .metrics import aupro, auroc, f1_max, precision_recall_f1
    from .progress import progress as progress_bar
    from .query import iter_query

    samples = test_samples(data_root, category)
    geometry = index.manifest.frame_geometry()
    t0 = time.perf_counter()
    scores, maps = [], []
    nbatches = (len(samples) + batch_size - 1) // batch_size
    for part in progress_bar(iter_query(index, [s.path for s in samples], batch_size=batch_size, regions=False),
                              nbatches, "query", progress):
        if part.errors:
            raise InputError(f"test image {next(iter(part.errors.values()))}")
        scores.append(part.image_scores)
        maps.extend(part.anomaly_maps)
        threshold = part.threshold
    seconds = time.perf_counter() - t0
    scores = np.concatenate(scores)
    masks = []
    for s, amap in zip(samples, maps):
        if s.mask_path is None:
            masks.append(np.zeros(amap.shape, bool))
        else:
            mask = load_image(s.mask_path).convert("L")
            masks.append(geometry.eval_mask(mask, mask.size))
    labels = np.array([s.label for s in samples])
    defects = np.array([s.defect for s in samples])
    ng = scores >= threshold if threshold is not None else None
    per_defect = {}
    for d in sorted(set(defects[labels == 1])):
        pick = (defects == d) | (labels == 0)
        per_defect[d] = {"images": int((defects == d).sum()), "image_auroc": auroc(labels[pick], scores[pick]),
                         "ng": None if ng is None else int(ng[defects == d].sum())}
    flat_masks = np.concatenate([m.reshape(-1) for m in masks])
    flat_maps = np.concatenate([m.reshape(-1) for m in maps])
    return {
        "category": category,
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": auroc(flat_masks, flat_maps),
        "aupro": aupro(masks, maps, fpr_limit=0.3),
        "threshold": threshold,
        "at_threshold": None if threshold is None else precision_recall_f1(labels, scores, threshold),
        "f1_max": f1_max(labels, scores),
        "per_defect": per_defect,
        "good_ng": None if ng is None else int(ng[labels == 0].sum()),
        "geometry": geometry.to_dict(),
        "counts": {"images": len(samples), "good": int((labels == 0).sum()), "anomalous": int(labels.sum()),
                   "pixels": int(flat_masks.size), "anomalous_pixels": int(flat_masks.sum())},
        "seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / len(samples), 4),
    }
