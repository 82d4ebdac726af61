#!/usr/bin/env python
"""Interleaved A/B of the two fastest IVF layouts at 160k x 152 (real bottle patches):
rabitqfs vs pq, both tuned by the library on benchdata.held_patches, then 5 alternating
search repetitions of the 3,136 benchmark queries (cancels slow drifts of a shared machine).

    python scripts/bench_ivf_ab.py
"""
import sys, time, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import benchdata, bench_search as bs
from patchsearch import PatchIndex
from patchsearch.searchers import KnnSearcher
q = benchdata.test_patches(4).reshape(-1, 152); held = benchdata.held_patches(1000)
bank = bs.bank_for(163840, 152)
truth = KnnSearcher(bank).search(q, 9)[1]
idx = {}
for lay in ("rabitqfs", "pq"):
    t0 = time.perf_counter()
    idx[lay] = PatchIndex.from_embeddings(bank, index="ivf", layout=lay, recall_queries=held, support_sets=False)
    print(lay, "build", round(time.perf_counter() - t0, 1), idx[lay].params, flush=True)
ts = {k: [] for k in idx}
for rep in range(5):
    for lay, ix in idx.items():
        t = time.perf_counter(); rows = ix.knn(q, 9)[1]; ts[lay].append(time.perf_counter() - t)
for lay in idx:
    print(lay, "q/s per rep", [round(len(q) / t) for t in ts[lay]], "median", round(len(q) / np.median(ts[lay])), "recall", round(bs.recall(idx[lay].knn(q, 9)[1], truth), 4))
