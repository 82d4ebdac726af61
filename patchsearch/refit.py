"""Carrying a calibration forward when the memory bank changes (add, remove, rebuild).

A calibration record (:func:`patchsearch.calibrate.fit_calibration`) names its good frames
in ``"images"``: POSIX paths relative to the folder recorded as ``"images_root"`` (an
absolute POSIX path), or absolute where a frame was not below it. :func:`calibration_frames`
finds them again: an absolute path as it is; a relative one under the data root the caller
gives, else under ``images_root``. Records written before ``images_root`` was recorded
resolve under the data root only, as they always did.

When the bank changes the thresholds are re-fitted on those frames with the recorded rule
(target FPR, margin, minimum region area): after ``add`` (:func:`refit` with ``grown``)
re-scoring only the frames that can decide them (:func:`refit_bounded`); after ``remove``
and ``rebuild`` re-scoring every frame. ``add`` and ``remove`` keep the old thresholds where
they cannot re-fit, and say so in the history; ``rebuild`` (:func:`refit_rebuilt`) refuses,
because a new coreset makes the old thresholds meaningless.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .calibrate import images_root  # noqa: F401 (part of this module's record format)
from .errors import InputError

F1_RULE = "F1-optimal"


def calibration_frames(cal: dict, data_root: str | os.PathLike | None) -> tuple[list[Path], list[str]]:
    """Find the recorded good frames of a calibration record again.

    Args:
        cal: the manifest's ``calibration`` record.
        data_root: where relative paths are looked up first (None: only under the recorded
            ``images_root``).

    Returns:
        (the frames found, in recorded order; the recorded paths not found, in recorded order).
    """
    recorded = [str(p) for p in cal.get("images") or []]
    roots = [Path(r) for r in (data_root, cal.get("images_root")) if r is not None]
    found, missing = [], []
    for name in recorded:
        if Path(name).is_absolute():
            candidates = [Path(name)]
        else:
            candidates = [r / name for r in roots]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found.append(hit)
    return found, missing


def where_looked(cal: dict, data_root) -> str:
    """Words naming the folders :func:`calibration_frames` searched (for messages)."""
    roots = [os.fspath(r) for r in (data_root, cal.get("images_root")) if r is not None]
    return " or ".join(dict.fromkeys(roots)) or "no folder (no data root given)"


def _carry_paths(cal: dict, old_cal: dict) -> dict:
    """A re-fitted record names the frames as the old record did (the same frames)."""
    cal["images"] = list(old_cal.get("images") or [])
    if old_cal.get("images_root") is not None:
        cal["images_root"] = old_cal["images_root"]
    else:
        cal.pop("images_root", None)
    return cal


def refit_bounded(built, old_cal: dict, frames: Sequence[Path], batch_size: int) -> dict | None:
    """The re-fit after rows were ADDED to the bank, re-scoring only the frames that can decide it.

    With the default rule (target FPR 0) the image threshold is (1 + margin) x the largest
    held-aside score and the pixel threshold (1 + margin) x the largest held-aside map value.
    When the bank only grows, no nearest-neighbour distance grows, so a frame's s* (its largest
    patch distance, >= its Eq. 7 score) and its map maximum are upper bounds recorded from its
    last scoring (:func:`patchsearch.calibrate.frame_bounds`). Frames are re-scored, highest
    bound first, until every frame not re-scored has both bounds (times 1 + 1e-5 for float32
    rounding) below the new maxima: the thresholds then equal those of re-scoring every frame.

    Returns:
        the calibration record (with "rescored": frames re-scored), or None where this does
        not apply (another target FPR, bounds not recorded: indexes built before them).
    """
    from .calibrate import frame_bounds
    from .query import query
    from .thresholds import fit_pixel_threshold, fit_threshold

    image, pixel = old_cal.get("image") or {}, old_cal.get("pixel") or {}
    n = len(frames)
    if image.get("target_fpr") != 0 or pixel.get("target_fpr") != 0 or n < 2 or \
            any(len(old_cal.get(k) or []) != n for k in ("scores", "patch_max", "pixel_max")):
        return None
    scores = np.array(old_cal["scores"], np.float64)
    bound, pbound = np.array(old_cal["patch_max"], np.float64), np.array(old_cal["pixel_max"], np.float64)
    best, best_pixel, done, maps = -np.inf, -np.inf, np.zeros(n, bool), []
    slack = 1 + 1e-5
    while True:
        need = ~done & ((bound * slack >= best) | (pbound * slack >= best_pixel))
        if not need.any():
            break
        ids = np.nonzero(need)[0]
        pick = sorted({int(ids[np.argmax(bound[ids])]), int(ids[np.argmax(pbound[ids])])})
        res = query(built, [frames[i] for i in pick], batch_size=batch_size, regions=False)
        if res.errors:
            raise InputError(f"calibration image {next(iter(res.errors.values()))}")
        fresh = frame_bounds(res)
        for j, i in enumerate(pick):
            scores[i], bound[i], pbound[i] = res.image_scores[j], fresh["patch_max"][j], fresh["pixel_max"][j]
            maps.append(res.anomaly_maps[j])
        done[pick] = True
        best, best_pixel = float(scores[done].max()), float(pbound[done].max())
    cal = {**old_cal, "image": fit_threshold(scores, 0.0, image["margin"]),
           "pixel": {**fit_pixel_threshold(maps, 0.0, pixel["margin"]), "n": pixel.get("n")},
           "scores": [round(float(x), 6) for x in scores], "patch_max": bound.tolist(),
           "pixel_max": pbound.tolist(), "rescored": int(done.sum())}
    return cal


def _fit_all(built, old_cal: dict, frames: Sequence[Path], batch_size: int) -> dict:
    """Every frame re-scored, the recorded rule applied (paths: :func:`_carry_paths`)."""
    from .calibrate import fit_calibration

    image = old_cal.get("image") or {}
    return fit_calibration(built, frames, Path.cwd(), "", image.get("target_fpr"), image.get("margin"),
                           int(old_cal.get("min_region_area", 0)), batch_size)


def _source(old_cal: dict, what: str) -> str:
    return f"{str(old_cal.get('source', 'held-aside good frames')).split(' | re-fitted')[0]} | re-fitted after {what}"


def _note(old_cal: dict, cal: dict, n: int, how: str = "") -> str:
    return (f"re-fitted on {n} held-aside good frames{how}: image threshold "
            f"{(old_cal.get('image') or {}).get('threshold', float('nan')):.4f} -> {cal['image']['threshold']:.4f}, "
            f"pixel threshold {(old_cal.get('pixel') or {}).get('threshold', float('nan')):.4f} -> "
            f"{cal['pixel']['threshold']:.4f} (L2)")


def refit(built, old_cal: dict | None, data_root: Path | None, batch_size: int, what: str,
          weights: str | None = None, grown: bool = False) -> tuple[dict | None, str]:
    """Re-fit the calibration of ``built`` (after ``add`` / ``remove``) on the recorded good frames.

    Args:
        built: the new version's :class:`~patchsearch.index.PatchIndex` (its embedder is loaded
            here, with ``weights`` for an index built with ``--weights``).
        old_cal: the calibration record of the version it was made from.
        data_root: where relative frame paths are looked up first (:func:`calibration_frames`).
        what: the action, for the record's ``source`` ("patchsearch add").
        grown: rows were only added: :func:`refit_bounded` re-scores only the deciding frames.

    Returns:
        (the new calibration record, or the old one where it cannot be re-fitted: an F1-optimal
        pick, frames not found; a sentence for the history and the log).
    """
    from .embedders import embedder_for

    if not old_cal:
        return None, "not calibrated"
    if str((old_cal.get("image") or {}).get("rule", "")).startswith(F1_RULE):
        return old_cal, ("thresholds kept: the image threshold was picked F1-optimal on labelled frames, "
                         "which are not recorded; run 'patchsearch calibrate'")
    frames, missing = calibration_frames(old_cal, data_root)
    if not frames or missing:
        total = len(frames) + len(missing)
        return old_cal, (f"thresholds kept: {len(missing)} of the {total} held-aside good frames not found "
                         f"under {where_looked(old_cal, data_root)} (e.g. {missing[0] if missing else '-'}); "
                         "pass --data-root or run 'patchsearch calibrate'")
    embedder_for(built, weights)
    cal = refit_bounded(built, old_cal, frames, batch_size) if grown else None
    how = ""
    if cal is None:
        cal = _fit_all(built, old_cal, frames, batch_size)
    else:
        how = (f" ({cal.pop('rescored')} re-scored; the others' bounds s* and map maximum, which cannot grow "
               "with the bank, stay below the new maxima)")
    cal = _carry_paths(cal, old_cal)
    cal["source"] = _source(old_cal, what)
    return cal, _note(old_cal, cal, len(frames), how)


def refit_rebuilt(built, old_cal: dict, data_root: Path | None, batch_size: int = 16,
                  weights: str | None = None, why: str = "the memory bank changed") -> tuple[dict, str]:
    """Re-fit the calibration of a rebuilt index whose memory bank changed, on every recorded frame.

    Args:
        built: the rebuilt :class:`~patchsearch.index.PatchIndex` (backbone loaded here).
        old_cal: the calibration record of the version it was rebuilt from.
        data_root, weights, batch_size: as :func:`refit`.
        why: what changed, for the messages.

    Returns:
        (the new calibration record, a sentence for the log).

    Raises:
        InputError: it cannot be re-fitted (one line saying why and what to do): the image
            threshold was picked F1-optimal on defect frames that are not recorded, or
            recorded frames are not found, or one cannot be read.
    """
    from .embedders import embedder_for

    problem = refit_problem(old_cal, data_root)
    if problem:
        raise InputError(f"{why}, so its thresholds must be re-fitted, and {problem}; nothing was installed")
    frames, _ = calibration_frames(old_cal, data_root)
    embedder_for(built, weights)
    cal = _carry_paths(_fit_all(built, old_cal, frames, batch_size), old_cal)
    cal["source"] = _source(old_cal, "patchsearch rebuild")
    return cal, _note(old_cal, cal, len(frames))


def refit_problem(old_cal: dict, data_root: Path | None) -> str | None:
    """Why ``old_cal`` cannot be re-fitted on its recorded frames (None: it can)."""
    if str((old_cal.get("image") or {}).get("rule", "")).startswith(F1_RULE):
        return ("the image threshold was picked F1-optimal on labelled defect frames, which are not recorded: "
                "run 'patchsearch calibrate --pick fpr' first (or rebuild with the recorded coreset ratio and seed)")
    frames, missing = calibration_frames(old_cal, data_root)
    if not frames and not missing:
        return "no calibration frames are recorded: run 'patchsearch calibrate --good FRAMES' first"
    if missing:
        return (f"{len(missing)} of the {len(frames) + len(missing)} recorded held-aside good frames are not found "
                f"under {where_looked(old_cal, data_root)} (e.g. {missing[0]}): pass --data-root, or run "
                "'patchsearch calibrate --good FRAMES' first")
    return None


def rebuilt_calibration(built, old_cal: dict, old_bank_file: Path, data_root: Path | None, batch_size: int = 16,
                        weights: str | None = None, why: str | None = None) -> tuple[dict, str | None]:
    """The calibration of a rebuilt index: ``old_cal`` where the new memory bank equals the old
    one (``old_bank_file``) row for row, else :func:`refit_rebuilt`'s.

    Args:
        why: what changed (coreset ratio or seed), for the messages; None: the same coreset
            options, and the banks are compared.

    Returns:
        (the calibration record, the re-fit's sentence for the log or None where kept).

    Raises:
        InputError: as :func:`refit_rebuilt`.
    """
    from .bank import read_bank
    from .errors import IndexFormatError

    if why is None:
        try:
            if np.array_equal(read_bank(old_bank_file).embeddings, built.bank):
                return old_cal, None  # the same memory bank: the thresholds hold
        except (IndexFormatError, OSError, KeyError, TypeError):  # a damaged old bank: cannot tell
            pass
        why = "the new coreset differs from the memory bank it replaces (grown by add, shrunk by remove, or damaged)"
    return refit_rebuilt(built, old_cal, data_root, batch_size, weights, why)
