#!/usr/bin/env python
"""Distributed build on Ray, measured on MVTec AD bottle (this machine, CPU).

1. The single-machine build (torch on 2 threads, the default here, and on 1 thread).
2. ``build(..., ray_address=...)`` on a local Ray instance of 2 CPUs with 1 and 2 embedding
   workers (1 CPU, 1 torch thread each): embedding stage seconds and images per second.
3. The 2-worker build's store rows and memory bank against the 1-thread single-machine
   build's (identical?), and both builds' image/pixel AUROC on the 83 test images.
4. Greedy k-center (exact, one node) against the composable two-round coreset
   (:mod:`patchsearch.distributed.coreset`) on that store: covering radius (L2, full
   152-d embeddings) and their ratio.

    python scripts/bench_ray.py [--chunk 64] [--throughput-only]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import benchdata
from patchsearch import PatchIndex
from patchsearch.coreset import covering_radius, kcenter_greedy
from patchsearch.data import train_images
from patchsearch.evaluate import evaluate
from patchsearch.pipeline import build
from patchsearch.store import PatchStore
from patchsearch.versions import current_version


def main():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local nodes bind 127.0.0.1 only
    import ray

    from patchsearch.distributed.coreset import composable_kcenter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=64, help="frames per partition (the build's default: 64)")
    ap.add_argument("--throughput-only", action="store_true", help="steps 1 and 2 only")
    args = ap.parse_args()
    root = benchdata.data_root()
    train = train_images(root, "bottle")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out = tmp / f"local{threads}" / "bottle"
            index = build(train, out, category="bottle", data_root=root / "bottle")
            t = index.manifest.timings["extract"]
            n = index.manifest.store["num_images"]
            backbone = index.manifest.backbone["name"]
            rows.append(f"| this machine, 1 process, torch {threads} threads | {t:.1f} | {n / t:.1f} | - |")
            index.close()
            results[f"local{threads}"] = out
        torch.set_num_threads(2)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for workers in (1, 2):
            parts = []
            out = tmp / f"ray{workers}" / "bottle"
            index = build(train, out, category="bottle", data_root=root / "bottle", ray_address="auto",
                          ray_options={"num_workers": workers, "chunk_images": args.chunk,
                                       "on_partition": parts.append})
            t = index.manifest.timings["extract"]
            n = index.manifest.store["num_images"]
            inside = sum(p["num_images"] for p in parts) / sum(p["seconds"] for p in parts)
            rows.append(f"| Ray, {workers} worker process{'es' if workers > 1 else ''} (1 CPU each) | {t:.1f} | "
                        f"{n / t:.1f} | {inside:.1f} |")
            index.close()
            results[f"ray{workers}"] = out
        print(f"Embedding stage, bottle ({n} training frames, 256 x 256 input, {backbone}, "
              f"{len(parts)} partitions of {args.chunk}):\n")
        print("| embedding on | stage seconds (incl. starting workers) | images/s | images/s per worker, "
              "inside the worker |")
        print("|---|---|---|---|")
        print("\n".join(rows))
        if args.throughput_only:
            ray.shutdown()
            return

        a, b = (results[k] / current_version(results[k]) for k in ("local1", "ray2"))
        sa, sb = PatchStore(a), PatchStore(b)
        same_store = np.array_equal(sa.embeddings(), sb.embeddings())
        ia, ib = PatchIndex.load(results["local1"]), PatchIndex.load(results["ray2"])
        same_bank = np.array_equal(ia.bank, ib.bank)
        ea, eb = evaluate(ia, root, "bottle"), evaluate(ib, root, "bottle")
        print(f"\nstore rows identical (1-thread local vs 2 Ray workers, {len(sb.files) // 2} partitions): "
              f"{same_store}; memory bank identical: {same_bank}")
        print(f"| build | image AUROC | pixel AUROC |\n|---|---|---|\n"
              f"| this machine (1 thread) | {ea['image_auroc']:.4f} | {ea['pixel_auroc']:.4f} |\n"
              f"| Ray, 2 workers | {eb['image_auroc']:.4f} | {eb['pixel_auroc']:.4f} |")
        ia.close(), ib.close()

        emb = sb.embeddings()
        print(f"\nCoreset at ratio 0.1 of the {len(emb):,} x {emb.shape[1]} store (seed 0):\n")
        print("| method | seconds | selected | covering radius (L2) | vs exact greedy |")
        print("|---|---|---|---|---|")
        t0 = time.perf_counter()
        exact = kcenter_greedy(emb, 0.1, seed=0)
        te = time.perf_counter() - t0
        r0 = covering_radius(emb, exact)
        print(f"| exact greedy k-center, one node | {te:.1f} | {len(exact):,} | {r0:.3f} | 1.000 |")
        for parts, label in ((None, f"{len(sb.files) // 2} store partitions"), (8, "8 row ranges")):
            t0 = time.perf_counter()
            sel = composable_kcenter(b, 0.1, seed=0, parts=parts, address="auto")
            tc = time.perf_counter() - t0
            r = covering_radius(emb, sel)
            print(f"| composable (2 rounds, oversample 2), {label} on 2 Ray CPUs | {tc:.1f} | {len(sel):,} | "
                  f"{r:.3f} | {r / r0:.3f} |")
        ray.shutdown()


if __name__ == "__main__":
    main()
