"""FAISS shards of an index after its memory bank changed (``patchsearch add``, ``remove``):
flat shards rebuilt, IVF shards keep their trained quantizer and codebooks."""

from __future__ import annotations

import numpy as np

from .searchers import build_flat_shards, faiss, shard_bounds


def shards_after_add(index, bank: np.ndarray, start: int) -> list:
    """The FAISS shards of ``index`` (a :class:`~patchsearch.index.PatchIndex`; its
    ``index_type`` and ``shards``) after float32 bank rows ``start..`` were appended.
    Flat: shards rebuilt from the bank (contiguous row ranges). IVF: the new rows
    ``start..`` added with their bank-row ids to a clone of the last trained shard."""
    if index.index_type == "flat":
        return build_flat_shards(bank, len(index.shards))
    shards = list(index.shards)  # the others are shared, not changed
    if len(bank) > start:
        shards[-1] = faiss().clone_index(shards[-1])
        shards[-1].add_with_ids(np.ascontiguousarray(bank[start:]), np.arange(start, len(bank), dtype=np.int64))
    return shards


def shards_rebuilt(index, bank: np.ndarray) -> list:
    """The FAISS shards of ``index`` (its ``index_type`` and ``shards``) over a float32 bank
    whose rows were renumbered: flat rebuilt; IVF: the trained quantizer
    and codebooks kept (a reset clone), rows added with their ids per contiguous range."""
    if index.index_type == "flat":
        return build_flat_shards(bank, len(index.shards))
    trained = faiss().clone_index(index.shards[0])
    trained.reset()
    out = []
    for a, b in shard_bounds(len(bank), min(len(index.shards), len(bank))):
        shard = faiss().clone_index(trained)
        shard.add_with_ids(np.ascontiguousarray(bank[a:b]), np.arange(a, b, dtype=np.int64))
        out.append(shard)
    return out
