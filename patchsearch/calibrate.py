"""Calibration: thresholds fitted on good frames only, at build and later.

At build (:func:`split_calibration`), a part of the good training frames is held
aside: kept out of the patch store and the memory bank, and scored with the built
index; :func:`fit_calibration` fits the image and pixel thresholds from those good
scores alone by the rule of :mod:`patchsearch.thresholds`. :func:`calibrate`
re-fits them later from new good frames (frames from the line, a validation set),
installing a new version that shares every other file with the one it read (and refusing,
``VersionConflict``, where another writer installed a version meanwhile). Re-fits after the
bank changed (add, remove, rebuild): :mod:`patchsearch.refit`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InputError
from .files import link_or_copy
from .index import PatchIndex
from .store import relative_path
from .versions import new_version, tidy

CALIBRATION_FRACTION = 0.1  # of train/good held aside when the category has no validation/good
MIN_CALIBRATION = 5  # frames held aside at least (at most half of the training frames)


def images_root(root: str | os.PathLike) -> str:
    """The ``"images_root"`` entry of a calibration record: ``root`` as an absolute POSIX path."""
    return Path(os.path.abspath(root)).as_posix()


def split_calibration(image_paths: list[Path], calibration_images, fraction: float, seed: int):
    """(training frames, held-aside calibration frames).

    Given ``calibration_images``, all ``image_paths`` train. Else a seeded
    ``fraction`` of them (at least 5, at most half; none below 4 frames) is held aside.
    """
    if calibration_images:
        return image_paths, [Path(p) for p in calibration_images]
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--calibration-fraction must be in [0, 1), got {fraction}")
    n = len(image_paths)
    count = 0 if fraction == 0 or n < 4 else min(n // 2, max(MIN_CALIBRATION, round(fraction * n)))
    held = set(np.random.default_rng(seed).choice(n, count, replace=False).tolist()) if count else set()
    return [p for i, p in enumerate(image_paths) if i not in held], [p for i, p in enumerate(image_paths) if i in held]


def frame_bounds(res) -> dict:
    """Per frame of a query result: "patch_max", its largest patch nearest-neighbour L2
    distance s* (an upper bound of its Eq. 7 score), and "pixel_max", the largest value of
    its anomaly map. Neither can grow when memory-bank rows are added, so ``patchsearch add``
    re-scores only the frames whose bounds reach the thresholds (:mod:`patchsearch.update`)."""
    return {"patch_max": [float(d) for d in np.asarray(res.distances)[..., 0].max(axis=1)],
            "pixel_max": [float(np.max(m)) for m in res.anomaly_maps]}


def fit_calibration(index: PatchIndex, good: Sequence[Path], root: Path, source: str,
                    target_fpr: float | None = None, margin: float | None = None, min_region_area: int = 0,
                    batch_size: int = 16, defects: Sequence[Path] | None = None, pick: str = "fpr") -> dict:
    """Score good frames (and optionally defect frames) and fit the thresholds.

    Args:
        good: good frames, none of them in the memory bank.
        defects: defect frames: their scores give the F1-optimal image threshold
            (reported; used when ``pick="f1"``).

    Returns:
        the manifest's ``calibration`` record: {"image", "pixel" (each
        :func:`~patchsearch.calibrate.fit_threshold`'s dict), "min_region_area",
        "source", "images" (POSIX paths relative to ``root``, absolute for a frame not below
        it), "images_root" (``root``, absolute POSIX: where
        :func:`patchsearch.refit.calibration_frames` finds them again), "scores", "patch_max",
        "pixel_max" (see :func:`frame_bounds`), "f1_optimal"}.

    Raises:
        InputError: an unreadable frame, too few frames, ``pick="f1"`` without defects.
    """
    from .thresholds import MARGIN, TARGET_FPR, f1_optimal_threshold, fit_pixel_threshold, fit_threshold
    from .query import query

    if pick not in ("fpr", "f1") or (pick == "f1" and not defects):
        raise InputError("--pick f1 needs --defect frames" if pick == "f1" else f"--pick must be fpr or f1, got {pick}")
    target_fpr = TARGET_FPR if target_fpr is None else target_fpr
    margin = MARGIN if margin is None else margin
    res = query(index, good, batch_size=batch_size, regions=False)
    if res.errors:
        raise InputError(f"calibration image {next(iter(res.errors.values()))}")
    out = {"image": fit_threshold(res.image_scores, target_fpr, margin),
           "pixel": fit_pixel_threshold(res.anomaly_maps, target_fpr, margin),
           "min_region_area": int(min_region_area), "source": source,
           "images": [relative_path(p, root) for p in good], "images_root": images_root(root),
           "scores": [round(float(s), 6) for s in res.image_scores],
           **frame_bounds(res)}
    if defects:
        bad = query(index, defects, batch_size=batch_size, maps=False)
        if bad.errors:
            raise InputError(f"defect image {next(iter(bad.errors.values()))}")
        out["f1_optimal"] = f1_optimal_threshold(res.image_scores, bad.image_scores)
        if pick == "f1":
            out["image"] = {**out["image"], "threshold": out["f1_optimal"]["threshold"],
                            "rule": "F1-optimal on labelled good and defect frames"}
    return out


def calibrate(index_dir: str | os.PathLike, good: Sequence[Path], *, defects: Sequence[Path] | None = None,
              target_fpr: float | None = None, margin: float | None = None, min_region_area: int | None = None,
              pick: str = "fpr", batch_size: int = 16, data_root: str | os.PathLike | None = None,
              log: Callable[[str], None] = lambda msg: None, device: str | None = None) -> PatchIndex:
    """Re-fit an index's thresholds from new good frames (and optionally defect frames),
    installing a new version that shares every other file with the version it read.

    Args:
        good: good frames (not in the memory bank: frames from the line, a validation set).
        defects: defect frames, for the F1-optimal threshold (reported; used with ``pick="f1"``).
        target_fpr, margin: the rule of :func:`patchsearch.calibrate.fit_threshold`.
        min_region_area: smallest reported defect region (frame pixels) [as before].
        data_root: the good frames are recorded relative to it where they lie below it, else
            as absolute paths (default: relative to their common folder); either way the
            folder is recorded, so ``add``, ``remove`` and ``rebuild`` find them again.
        device: where the frames are embedded and searched (:mod:`patchsearch.device`;
            None: :meth:`PatchIndex.load`'s default).

    Returns:
        the current version after the install, loaded for inspection on the CPU (load it
        with ``device=`` to search on a GPU: nothing is copied to one for this return value).

    Raises:
        InputError: unreadable frames, too few good frames, bad options, a bad ``device``.
        IndexFormatError: no index.
        VersionConflict: another writer installed a version after this one read its own
            (nothing installed: the thresholds were fitted on a bank that is no longer current).
    """
    from .format import write_manifest

    index_dir = Path(index_dir)
    index = PatchIndex.load(index_dir, device=device)
    try:
        old = (index.manifest.calibration or {}).get("min_region_area", 0)
        root = Path(data_root) if data_root is not None else \
            Path(os.path.commonpath([Path(os.path.abspath(p)).parent for p in good]))
        cal = fit_calibration(index, [Path(p) for p in good], root, f"patchsearch calibrate ({len(good)} good frames)",
                              target_fpr, margin, old if min_region_area is None else min_region_area, batch_size,
                              defects, pick)
        with new_version(index_dir, expect_current=index.version) as tmp:
            for name in index.manifest.files:
                link_or_copy(index.directory / name, tmp / name)
            index.manifest.calibration = cal
            write_manifest(tmp, index.manifest)
    finally:
        index.close()
    tidy(index_dir)
    log(f"image threshold {cal['image']['threshold']:.4f}, pixel threshold {cal['pixel']['threshold']:.4f} (L2)")
    return PatchIndex.load(index_dir, device="cpu")
