#!/usr/bin/env python
"""Search benchmark: patch queries per second for k = 9 over PatchCore memory banks.

Compares, in one process on the same real data (see benchdata.py):

* torch brute force, as anomalib computes it: squared-distance matrix by matmul
  (``||x||^2 - 2 x.y + ||y||^2``), clamp, sqrt, ``topk``; chunked over queries and bank
  so that it fits in memory;
* patchsearch flat (``faiss.IndexFlatL2``), flat with 4 shards (``faiss.IndexShards``),
  bf16 / int8 candidates + exact fp32 re-ranking (patchsearch.lowp.LowpSearcher, ``exact="bf16"``
  / ``exact="int8"``),
  and IVF in each layout of ``--layouts`` (``PatchIndex.from_embeddings(index="ivf",
  layout=...)``: automatic parameters, nprobe tuned by the library to recall@9 >= 0.95
  on 1,000 held-aside patches of bottle test images that are never queries here
  (benchdata.held_patches), exact re-ranking of 8 x 9 candidates).

recall@9 is measured on the benchmark's queries against exact (faiss.knn) search;
bytes/vector is the index's serialized size per memory-bank vector (flat: 4 d; the IVF
indexes also need the memory bank itself, 4 d, for re-ranking). "vs flat" is against
IndexFlatL2 (1 shard) in the same run. "of fp32 mm" is 2 * queries * bank * d / time
divided by the machine's measured fp32 matmul rate. "peak GiB" is the peak anonymous
memory (sampled RssAnon, benchdata.PeakMemory) while the method was built and searched,
above the level before it: what the index and its search add to the bank (which is
file-backed, memory-mapped, from 4 GiB).

The second table is the PatchCore query itself (k = 9 for every patch plus the Eq. 7
image score) for 4 test images of 784 patches: torch brute force (two searches, as
anomalib) against PatchIndex.search (precomputed support sets: one search).

    python scripts/bench_search.py                       # 16k, 160k, 1.6M x 152, 1536
    python scripts/bench_search.py --sizes 160k,1.6m --dims 152 --methods flat,ivf
    python scripts/bench_search.py --sizes 16k --dims 1536
    python scripts/bench_search.py --sizes 160k,1.6m,10m --dims 152,1536 --methods torch,flat,ivf --layouts rabitqfs
                                    # issue 10's table; 10m x 1536 is skipped (152-d only beyond 1.6M)
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

import benchdata
from patchsearch import PatchIndex
from patchsearch.lowp import LowpSearcher
from patchsearch.searchers import KnnSearcher, ShardedSearcher, build_flat_shards, faiss

K = 9


def best_time(fn, repeat=3):
    out, best = None, float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def matmul_rate(q: int, m: int, d: int) -> float:
    """The machine's fp32 matmul rate in GFLOP/s at a (q x d) @ (d x m) shape (m capped at
    65536): the better of torch (oneDNN/MKL) and numpy (OpenBLAS, as in faiss-cpu)."""
    m = min(m, 65536)
    a, b = torch.randn(q, d), torch.randn(m, d)
    t_torch, _ = best_time(lambda: a @ b.T)
    an, bn = a.numpy(), b.numpy()
    t_np, _ = best_time(lambda: an @ bn.T)
    return 2 * q * m * d / min(t_torch, t_np) / 1e9


def torch_knn(bank: torch.Tensor, q: torch.Tensor, k: int, q_chunk=4096, b_chunk=262144):
    """anomalib's euclidean_dist + topk, chunked; returns (L2 (n, k), rows (n, k))."""
    bn = bank.pow(2).sum(-1)
    out_d, out_i = [], []
    for s in range(0, len(q), q_chunk):
        x = q[s:s + q_chunk]
        xn = x.pow(2).sum(-1, keepdim=True)
        best_d = best_i = None
        for t in range(0, len(bank), b_chunk):
            y = bank[t:t + b_chunk]
            dist = (xn - 2 * x @ y.T + bn[t:t + b_chunk][None]).clamp_min_(0).sqrt_()
            d, i = dist.topk(min(k, len(y)), largest=False, dim=1)
            i = i + t
            if best_d is not None:
                d, j = torch.cat([best_d, d], 1).topk(k, largest=False, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_d, best_i = d, i
        out_d.append(best_d)
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


def torch_patchcore(bank: torch.Tensor, patches: torch.Tensor, k=9, b=9):
    """PatchCore query as anomalib computes it: k-NN of every patch, then Eq. 7."""
    n, p, d = patches.shape
    dist, loc = torch_knn(bank, patches.reshape(-1, d), k)
    dist, loc = dist.reshape(n, p, k), loc.reshape(n, p, k)
    top = dist[..., 0].argmax(1)
    ar = torch.arange(n)
    s_star, m_star = dist[ar, top, 0], loc[ar, top, 0]
    _, support = torch_knn(bank, bank[m_star], b)  # second search: N_b(m*)
    test = patches[ar, top]
    sd = torch.cdist(test[:, None], bank[support])[:, 0]
    weights = 1 - torch.softmax(sd, 1)[:, 0]
    return dist, loc, weights * s_star


MEMORY: benchdata.PeakMemory | None = None


class LoggedDict(dict):
    """Method -> (build s, search s, recall@9, bytes/vector, peak GiB): the peak is that of
    the window since :meth:`start` (called, after collecting garbage, before each method),
    above the level it started at."""

    def start(self):
        gc.collect()
        self._base = MEMORY.reset()

    def __setitem__(self, key, value):
        value = (*value, MEMORY.peak - self._base)
        print(f"   {key}: build {value[0]:.1f} s, search {value[1]:.2f} s, recall {value[2]:.4f}, "
              f"peak +{value[4]:.2f} GiB", flush=True)
        super().__setitem__(key, value)


def recall(rows, truth):
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(rows, truth)]))


def parse_size(s: str) -> int:
    s = s.lower()
    mult = {"k": 1_000, "m": 1_000_000}
    if s[-1] in mult:
        return int(round(float(s[:-1]) * mult[s[-1]] * (1.024 if s[-1] == "k" else 1)))
    return int(s)


def bank_for(m: int, d: int) -> np.ndarray:
    if m > benchdata.AUGMENTED:  # the jittered repeats (152-d only), memory-mapped
        return benchdata.jittered_patches(m)
    base = benchdata.train_patches() if m <= 163_856 else benchdata.augmented_patches(m)
    rows = np.sort(np.random.default_rng(1).choice(len(base), m, replace=False)) if m < len(base) else np.arange(m)
    big = m * d * 4 > 2 ** 32  # > 4 GiB: keep it in a memory-mapped file
    return benchdata.lift(np.asarray(base[rows]), d, path=benchdata.CACHE / f"bank_{m}_{d}.npy" if big else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16k,160k,1.6m")
    ap.add_argument("--dims", default="152,1536")
    ap.add_argument("--images", type=int, default=4, help="query images (784 patches each)")
    ap.add_argument("--methods", default="torch,flat,flat4,bf16,int8,ivf")
    ap.add_argument("--layouts", default="rabitqfs,rabitq,pqfs,pq", help="IVF layouts (method ivf)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    global MEMORY
    MEMORY = benchdata.PeakMemory()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    queries_all = benchdata.test_patches(args.images)          # (n, 784, 152), real test images
    held = benchdata.held_patches(1000)  # nprobe tuning: patches of other test images, never queries
    rows_out, eq7_out = [], []
    for d in [int(x) for x in args.dims.split(",")]:
        patches = benchdata.lift(queries_all, d)
        q = patches.reshape(-1, d)
        for m in [parse_size(s) for s in args.sizes.split(",")]:
            if m > benchdata.AUGMENTED and d != 152:
                print(f"\n== bank {m:,} x {d} skipped: beyond {benchdata.AUGMENTED:,} rows only 152-d", flush=True)
                continue
            bank = bank_for(m, d)
            rate = matmul_rate(len(q), m, d)
            flops = 2 * len(q) * m * d
            print(f"\n== bank {m} x {d}, {len(q)} queries; fp32 matmul {rate:.0f} GFLOP/s", flush=True)
            res = LoggedDict()
            res.start()
            repeat = 3 if flops < 2e12 else 1
            t, (_, truth) = best_time(lambda: KnnSearcher(bank).search(q, K), repeat)
            res["faiss.knn (brute force, no index)"] = (0.0, t, 1.0, 4 * d)
            if "torch" in methods:
                res.start()
                bt, qt = torch.from_numpy(bank), torch.from_numpy(q)
                t, (_, rows) = best_time(lambda: torch_knn(bt, qt, K), repeat)
                res["torch brute force (anomalib)"] = (0.0, t, recall(rows.numpy(), truth), 4 * d)
                del bt, qt
            for name, shards in (("flat", 1), ("flat4", 4)):
                if name in methods:
                    res.start()
                    t0 = time.perf_counter()
                    searcher = ShardedSearcher(build_flat_shards(bank, shards))
                    bt_ = time.perf_counter() - t0
                    t, (_, rows) = best_time(lambda: searcher.search(q, K), repeat)
                    res[f"flat (IndexFlatL2), {shards} shard{'s' * (shards > 1)}"] = (bt_, t, recall(rows, truth), 4 * d)
                    del searcher
                    gc.collect()
            for kind in [x for x in ("bf16", "int8") if x in methods]:
                res.start()
                t0 = time.perf_counter()
                fast = LowpSearcher(bank, KnnSearcher(bank), kind)
                fast.prepare()  # built lazily on first search in the library; timed here as build
                bt_ = time.perf_counter() - t0
                t, (_, rows) = best_time(lambda: fast.search(q, K), repeat)
                res[f"flat, {kind} candidates + exact re-rank ({fast.stats['fallbacks'] // repeat} fallbacks)"] = \
                    (bt_, t, recall(rows, truth), 4 * d + (d if kind == "int8" else 2 * d + 16))
                del fast
                gc.collect()
            for layout in (args.layouts.split(",") if "ivf" in methods or "ivfpq" in methods else []):
                res.start()
                t0 = time.perf_counter()
                index = PatchIndex.from_embeddings(bank, index="ivf", layout=layout,
                                                   recall_queries=benchdata.lift(held, d), support_sets=False)
                bt_ = time.perf_counter() - t0
                t, (_, rows) = best_time(lambda: index.knn(q, K), repeat)
                per_vec = sum(faiss().serialize_index(s).size for s in index.shards) / m
                p = index.params
                pq = f" m={p['pq_m']}x{p['pq_bits']}b" if "pq_m" in p else ""
                res[f"IVF {layout}{pq} nlist={p['nlist']} nprobe={p['nprobe']} rerank={p['rerank']} "
                    f"(held-aside recall {p['recall_at_9']:.3f})"] = (bt_, t, recall(rows, truth), per_vec)
                del index
                gc.collect()
            base_t = res.get("torch brute force (anomalib)", res["faiss.knn (brute force, no index)"])[1]
            flat_t = res.get("flat (IndexFlatL2), 1 shard", (0, base_t))[1]
            print(f"-- bank {m} x {d} done", flush=True)
            for name, (build_s, t, rec, bpv, peak) in res.items():
                row = (f"| {m:,} x {d} | {name} | {build_s:.1f} | {len(q) / t:,.0f} | {base_t / t:.2f}x | "
                       f"{flat_t / t:.2f}x | {rec:.4f} | {bpv:,.0f} | {peak:.2f} | {flops / t / 1e9 / rate:.0%} |")
                rows_out.append(row)
                print(row, flush=True)
            if m <= 20_000:
                bt, pt = torch.from_numpy(bank), torch.from_numpy(patches)
                t_torch, (_, tl, ts) = best_time(lambda: torch_patchcore(bt, pt))
                truth64 = torch.cdist(pt.reshape(-1, d).double(), bt.double()).topk(K, largest=False).indices
                truth64 = truth64.numpy().reshape(tl.shape)
                torch_exact = float((tl.numpy() == truth64).all(-1).mean())
                for exact in ("fp32", "bf16", "int8"):
                    index = PatchIndex.from_embeddings(bank, exact=exact)
                    t_ours, r = best_time(lambda: index.search(patches))
                    same = float((r.locations == tl.numpy()).all(-1).mean())
                    exact64 = float((r.locations == truth64).all(-1).mean())
                    diff = float(np.max(np.abs(r.image_scores - ts.numpy()) / ts.numpy()))
                    row = (f"| {m:,} x {d} | flat ({exact}) + precomputed support sets | {t_torch * 1000:.0f} | "
                           f"{t_ours * 1000:.0f} | {t_torch / t_ours:.2f}x | {same:.5f} | {diff:.1e} | "
                           f"{torch_exact:.5f} / {exact64:.5f} |")
                    eq7_out.append(row)
                    print(row, flush=True)
            del bank
            gc.collect()
    print("\n| bank | method | build s | patch queries/s | vs torch | vs flat | recall@9 | bytes/vector | "
          "peak GiB | of fp32 mm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))
    if eq7_out:
        print("\nPatchCore query (k=9 for every patch + Eq. 7 image score):\n")
        print("| bank | patchsearch | torch ms | patchsearch ms | speed-up | same 9 locations as torch | "
              "max rel. image-score diff | 9 locations = float64 exact (torch / patchsearch) |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(eq7_out))


if __name__ == "__main__":
    main()
