"""Detection and segmentation metrics: image AUROC and pixel AUROC."""

from __future__ import annotations

import numpy as np

from .errors import InputError


def auroc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U; tied scores count one half).

    Args:
        labels: bool or {0, 1} array, any shape (1 = anomalous).
        scores: float array of the same shape (higher = more anomalous).

    Returns:
        AUROC in [0, 1].

    Raises:
        InputError: shapes differ, or only one class is present.
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise InputError(f"labels ({labels.size}) and scores ({scores.size}) differ in size")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError("AUROC needs both normal and anomalous samples")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average 1-based ranks over runs of tied scores.
    starts = np.concatenate([[0], np.nonzero(np.diff(sorted_scores))[0] + 1])
    ends = np.concatenate([starts[1:], [scores.size]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.repeat(avg_rank, ends - starts)
    pos_rank_sum = ranks[labels[order]].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
