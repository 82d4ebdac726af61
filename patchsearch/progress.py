"""Progress bars for the long loops (embedding, evaluation): tqdm where asked for."""

from __future__ import annotations

from typing import Iterable


def progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    """``iterable`` itself, or wrapped in a tqdm bar of ``total`` batches labelled ``desc``
    (on stderr, removed when done) where ``enabled``; tqdm is imported only then."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)
