#!/usr/bin/env python
"""Peak memory of building a 1.6M x 1536 memory bank from an Arrow patch store.

Writes a patch store of 1,600,000 x 1536 float32 (10 GB; the 1536-d stand-in patches of
benchdata.py, in batches of 16 images of 784 patches), then runs the build's store ->
coreset (ratio 0.1) -> memory bank -> support sets -> flat index stage on it, writes the
bank, shard and manifest as a build does, and prints a table of each stage's time and
peak anonymous memory (sampled RssAnon: what must fit in RAM; each stage's own peak) and
the process's peak RSS so far (which also counts pages of the memory-mapped store,
reclaimable page cache). The store is read memory-mapped.

    python scripts/bench_memory.py [--dir /tmp/ps-mem] [--rows 1600000 --dim 1536 --ratio 0.1]
    python scripts/bench_memory.py --rows 10000000 --dim 152      # the 10M x 152 store
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import numpy as np

import benchdata
from patchsearch.pipeline import index_from_store
from patchsearch.store import ImageRecord, PatchStoreWriter


MEMORY: benchdata.PeakMemory | None = None


def peak_gb() -> str:
    """Peak anonymous (heap) memory so far, and peak RSS including memory-mapped file pages."""
    return (f"{MEMORY.peak:.2f} GiB anonymous (RSS incl. mapped file pages "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ps-mem"))
    ap.add_argument("--rows", type=int, default=1_600_000)
    ap.add_argument("--dim", type=int, default=1536, choices=(152, 1536),
                    help="1536: the lifted stand-in patches; 152: the real 152-d patches (beyond 1.6M: "
                         "the 1.6M augmented bottle patches repeated, each repeat with N(0, 0.05^2) jitter)")
    ap.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    args = ap.parse_args()
    global MEMORY
    MEMORY = benchdata.PeakMemory()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    t = time.perf_counter()
    per = 16 * 784
    if args.dim == 1536:
        base = benchdata.augmented_patches(args.rows)
        data = benchdata.lift(base, 1536, path=benchdata.CACHE / f"bank_{args.rows}_1536.npy")
        chunks = (np.asarray(data[s:s + per], dtype=np.float32) for s in range(0, args.rows, per))
    else:
        chunks = benchdata.jittered_chunks(args.rows, per)
    with PatchStoreWriter(args.dir, args.dim) as w:
        for s, chunk in zip(range(0, args.rows, per), chunks):
            n = len(chunk) // 784
            w.write([ImageRecord(f"img{s // 784 + i}.png", 0, "", 224, 224) for i in range(n)],
                    chunk[: n * 784].reshape(n, 28, 28, args.dim))
    size = sum((args.dir / f).stat().st_size for f in w.files)
    print("| stage | seconds | peak memory |\n|---|---|---|")
    print(f"| store written ({w.num_patches:,} x {args.dim}, {size / 2**30:.1f} GiB) | "
          f"{time.perf_counter() - t:.0f} | {peak_gb()} |", flush=True)
    timings, stage_peak = {}, {}

    def log(msg: str):
        if msg.startswith("coreset:"):  # the end of the coreset stage: its peak, then a new window
            stage_peak["coreset"] = peak_gb()
            MEMORY.reset()
        print("   " + msg, flush=True)

    MEMORY.reset()
    t = time.perf_counter()
    built = index_from_store(args.dir, {"category": "synthetic"}, timings, args.ratio, 0, 1, "flat", None, True, log)
    print(f"| coreset ({built.size:,} of {w.num_patches:,}, ratio {args.ratio}) | "
          f"{timings['coreset']:.0f} | {stage_peak['coreset']} |")
    print(f"| memory bank, support sets, flat index | {timings['index']:.0f} | {peak_gb()} |", flush=True)
    MEMORY.reset()
    t_write = time.perf_counter()
    built.write(args.dir)  # bank, FAISS shard, manifest with every file's SHA-256 (the store's too)
    write = time.perf_counter() - t_write
    total = time.perf_counter() - t
    print(f"| write bank, shard, manifest (SHA-256 of every file) | {write:.0f} | {peak_gb()} |", flush=True)
    print(f"| total after the store: coreset {timings['coreset'] / total:.0%} of {total:.0f} s, "
          f"everything else {1 - timings['coreset'] / total:.0%} | {total:.0f} | |", flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
