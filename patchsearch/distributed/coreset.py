"""Composable greedy k-center coreset for patch stores beyond one node's memory.

Two rounds (the composable-coreset scheme for k-center, e.g. Malkomes et al., NeurIPS 2015):
the store's rows are cut into contiguous parts (its partitions, or ``parts`` row ranges);
each Ray task runs the exact greedy k-center (:func:`patchsearch.coreset.kcenter_greedy`,
same seed, hence the same random projection) on its part, keeping ``oversample`` times
its share of the budget; the head then runs greedy k-center over the union of those
centres down to the budget ``max(1, int(N * ratio))``. Every row is within r_part of a
part centre and every part centre within r_head of a final centre, so the covering radius
is at most r_part + r_head; each greedy is a 2-approximation of its own optimum. A task
reads only its rows of the store (memory-mapped from storage every node mounts), and the
head only the union (``oversample * ratio * N`` rows).
"""

from __future__ import annotations

import os
import numpy as np

from . import connect
from ..coreset import PROJECTION_DIM, check_ratio, kcenter_greedy
from ..errors import InputError
from ..store import PatchStore, StoreArray


def part_bounds(store: PatchStore, parts: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) store rows of each part: the store's partitions (``parts`` None) or
    ``parts`` near-equal row ranges.

    Raises:
        InputError: parts outside [1, store rows].
    """
    if parts is None:
        return _partition_rows(store)
    if not 1 <= parts <= store.num_patches:
        raise InputError(f"parts must be between 1 and the {store.num_patches} store rows, got {parts}")
    edges = np.linspace(0, store.num_patches, parts + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _partition_rows(store: PatchStore) -> list[tuple[int, int]]:
    """[start, stop) store rows of each partition of ``store`` (one range for a version-1 store)."""
    names = [f for f in store.files if f.startswith("patches-")]
    if not names:
        return [(0, store.num_patches)]
    out, start = [], 0
    for name in names:
        n = PatchStore(store.directory, partitions=[int(name[8:13])]).num_patches
        out.append((start, start + n))
        start += n
    return out


def part_kcenter(directory: str, partitions: list[int] | None, start: int, stop: int, budget: int, seed: int,
                 projection_dim: int = PROJECTION_DIM) -> np.ndarray:
    """Greedy k-center on store rows [start, stop): int64 store rows of its ``budget`` centres
    (in selection order)."""
    store = PatchStore(directory, partitions=partitions)
    rows = StoreArray(store)
    n = stop - start
    ratio = min(1.0, (budget + 0.5) / n)

    class _Slice:  # rows [start, stop) of the store, read chunk by chunk
        shape, ndim, dtype = (n, store.dim), 2, np.dtype(np.float32)

        def __len__(self):
            return n

        def __getitem__(self, key):
            a, b, _ = key.indices(n)
            return rows[start + a:start + b]

    return start + kcenter_greedy(_Slice(), ratio, seed=seed, projection_dim=projection_dim)


def composable_kcenter(directory: str | os.PathLike, ratio: float, seed: int = 0, *, parts: int | None = None,
                       oversample: float = 2.0, address: str | None = None,
                       partitions: list[int] | None = None) -> np.ndarray:
    """Two-round composable greedy k-center coreset of the patch store in ``directory``.

    Args:
        directory: a version directory holding the store (or a store directory).
        ratio: coreset ratio in (0, 1]; ``max(1, int(N * ratio))`` rows are selected.
        seed: seeds every greedy (the same Gaussian projection everywhere).
        parts: row ranges worked on in parallel (default: the store's partitions).
        oversample: each part keeps ``ceil(oversample * ratio * part rows)`` centres.
        address: the Ray cluster (:func:`patchsearch.distributed.connect`).
        partitions: the store partitions to read (default all).

    Returns:
        int64 (n_select,) store rows, in the head greedy's selection order.

    Raises:
        InputError: bad ratio, parts or oversample.
        DistributedError: Ray missing or unreachable.
    """
    check_ratio(ratio)
    if oversample < 1:
        raise InputError(f"oversample must be >= 1, got {oversample}")
    store = PatchStore(directory, partitions=partitions)
    n_select = max(1, int(store.num_patches * ratio))
    bounds = part_bounds(store, parts)
    budgets = [max(1, min(b - a, int(np.ceil(oversample * ratio * (b - a))))) for a, b in bounds]
    ray = connect(address)
    task = ray.remote(part_kcenter).options(num_cpus=1)
    refs = [task.remote(str(store.directory), partitions, a, b, k, seed) for (a, b), k in zip(bounds, budgets)]
    union = np.concatenate(ray.get(refs))
    if len(union) <= n_select:
        return union
    head = kcenter_greedy(store.embeddings(union), min(1.0, (n_select + 0.5) / len(union)), seed=seed)
    return union[head]
