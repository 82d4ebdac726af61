#!/usr/bin/env python
"""Support sets N_b(m*) of Eq. 7: the bank's exact kNN graph at build vs one exact search
of the m* vectors per query call (PatchIndex.support_sets without stored support sets).

Chooses ``patchsearch.index.SUPPORT_GRAPH_MAX_FLOPS``: the graph is worth precomputing
only while it takes about a second. Timing does not depend on the values, so the banks
are seeded Gaussian.

    python scripts/bench_support.py
"""

from __future__ import annotations

import time

import numpy as np

from patchsearch import PatchIndex
from patchsearch.bank import exact_support_sets
from patchsearch.searchers import KnnSearcher

SHAPES = [(4096, 152), (16384, 152), (32768, 152), (5000, 1536), (16384, 1536)]


def main():
    rng = np.random.default_rng(0)
    print("| bank | M^2 d | kNN graph at build, s | query-time N_b for 4 images (4 m*), ms |")
    print("|---|---|---|---|")
    for m, d in SHAPES:
        bank = rng.standard_normal((m, d)).astype(np.float32)
        t = time.perf_counter()
        exact_support_sets(bank, KnnSearcher(bank))
        graph = time.perf_counter() - t
        index = PatchIndex.from_embeddings(bank, support_sets=False, exact="faiss")
        index.support_sets(rng.choice(m, 4, replace=False))  # warm-up
        index._support_cache.clear()
        t = time.perf_counter()
        index.support_sets(rng.choice(m, 4, replace=False))
        query = time.perf_counter() - t
        print(f"| {m:,} x {d} | {float(m) * m * d:.1e} | {graph:.2f} | {query * 1000:.1f} |", flush=True)


if __name__ == "__main__":
    main()
